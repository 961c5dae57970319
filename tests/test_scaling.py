"""Several devices in the examples: train_gpt.py under DDP (``--devices``), overlap.py's measure of
exposed communication, scaling.py's four runs, and the per-rank names of the memory timeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from deltaswap.callbacks.timeline import rank_filename

import scaling
from overlap import Overlap, intersect, merge, overlap_summary


def kernel(name: str, start_ms: float, end_ms: float, category: str = "kernel") -> dict[str, object]:
    return {"ph": "X", "cat": category, "name": name, "ts": start_ms * 1e3, "dur": (end_ms - start_ms) * 1e3}


def test_overlap_summary_counts_communication_with_no_compute_beside_it_as_exposed() -> None:
    trace = {"traceEvents": [
        kernel("ampere_bf16_gemm", 0, 10), kernel("elementwise", 8, 11),          # compute 0-11
        kernel("ncclDevKernel_AllReduce_Sum_f32", 5, 15),                           # NCCL 5-15: 4 exposed
        kernel("ncclDevKernel_AllReduce_Sum_f32", 14, 16),                          # NCCL to 16: 5 exposed
        kernel("Memcpy DtoH (Device -> Pinned)", 12, 14, "gpu_memcpy"),            # 2 during NCCL
        kernel("Memcpy DtoD (Device -> Device)", 0, 20, "gpu_memcpy"),             # not a host copy
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0},                    # not a span
    ]}
    assert overlap_summary(trace) == Overlap(step_ms=16.0, compute_ms=11.0, comm_ms=11.0, exposed_comm_ms=5.0,
                                             copy_ms=2.0, copy_during_comm_ms=2.0)
    assert "54.5% overlapped, 5.0 ms exposed" in str(overlap_summary(trace))
    assert overlap_summary({"traceEvents": []}) == Overlap(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_interval_union_and_intersection() -> None:
    assert merge([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert intersect([(0, 3), (5, 8)], [(2, 6), (7, 9)]) == [(2, 3), (5, 6), (7, 8)]
    assert intersect([(0, 1)], []) == []


def test_every_rank_names_its_own_timeline() -> None:
    one = SimpleNamespace(world_size=1, global_rank=0)
    assert rank_filename("memory_timeline.png", one) == "memory_timeline.png"  # type: ignore[arg-type]
    second = SimpleNamespace(world_size=2, global_rank=1)
    assert rank_filename("memory_timeline.png", second) == "memory_timeline_rank1.png"  # type: ignore[arg-type]


def test_scaling_runs_each_strategy_on_one_and_two_cpu_processes(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert scaling.main(["--max-steps", "5", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["plain_1", "plain_2", "deltaswap_1", "deltaswap_2"]
    for name, ranks in runs.items():
        assert [r["rank"] for r in ranks] == list(range(int(name[-1])))
        assert all(r["steps"] == 5 and r["samples_per_s"] > 0 for r in ranks), name
    # steps 3-4 are timed (step 5 is profiled); a DDP run counts the samples of both ranks
    for name, samples in (("plain_1", 8), ("plain_2", 16), ("deltaswap_1", 8), ("deltaswap_2", 16)):
        assert (runs[name][0]["timed_steps"], runs[name][0]["timed_samples"]) == (2, samples), name
    assert runs["deltaswap_1"][0]["predicted_peak"] > 0 and "predicted_peak" not in runs["plain_1"][0]
    assert set(results["ratios"]) == {"plain_scaling", "deltaswap_scaling", "deltaswap_vs_plain_1",
                                      "deltaswap_vs_plain_2"}
    out = capsys.readouterr().out
    assert "deltaswap_scaling:" in out and "deltaswap_2" in out


def test_scaling_refuses_a_single_device() -> None:
    with pytest.raises(SystemExit):
        scaling.parse_args(["--devices", "1"])
