"""examples/bench_models.py on a CPU: tiny GPT-2 (KV cache on, its default) and ResNet-50 through every
mode, with finite numbers and gradients bitwise equal to the plain run's (on a CPU in fp32 deltaswap
must be exact; its swaps fall back to keeping the tensors)."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

import bench_models

FINITE = ("step_ms", "x_plain", "act_peak_bytes", "act_peak_gib", "loss", "exact_peak_bytes")
FINITE_DS = ("predicted_peak_bytes", "predicted_fwd_bwd_ms", "measured_fwd_bwd_ms", "blocks_planned")


def test_tiny_models_run_every_mode_with_exact_gradients(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deltaswap's CPU, KV-cache and over-budget warnings
        rc = bench_models.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--models", "gpt2",
                                "resnet50", "--warmup", "0", "--steps", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"gpt2", "resnet50"}
    for name, model in data["models"].items():
        assert list(model["modes"]) == list(bench_models.MODES), name
        assert model["n_blocks"] == {"gpt2": 2, "resnet50": 16}[name]
        for mode, r in model["modes"].items():
            where = f"{name}/{mode}: {r}"
            assert not {"oom", "error", "skipped"} & set(r), where
            keys = FINITE + (FINITE_DS if mode.startswith(("ds_", "auto_")) else ())
            for key in keys:
                assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, where)
            assert r["act_peak_bytes"] > 0 and r["step_ms"] > 0, where
            assert r["exact"] is True, where
            if name == "gpt2":  # the KV cache's model: also equal to the plain run without the cache
                assert model["kv_cache"] and r["exact_no_cache"] is True, where
            if mode.startswith(("ds_", "auto_")):
                assert r["exact_step_profiling"] is False, where  # the compared step ran a plan
                assert r["blocks_planned"] == model["n_blocks"], where
        assert model["modes"]["plain"]["x_plain"] == 1.0
        budgets = {m: model["modes"][m]["budget"] for m in ("auto_fits", "auto_ckpt", "auto_mid")}
        peaks = {m: model["modes"][m]["act_peak_bytes"] for m in ("plain", "checkpoint")}
        assert budgets["auto_ckpt"] == peaks["checkpoint"]
        assert budgets["auto_mid"] == (peaks["plain"] + peaks["checkpoint"]) // 2
        assert budgets["auto_fits"] > peaks["plain"]
    printed = capsys.readouterr().out
    assert printed.count("| mode | activation peak GiB |") == 2


def test_rounds_time_every_mode_again_and_report_the_median(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = bench_models.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--models", "gpt2",
                                "--modes", "plain", "checkpoint", "ds_recompute", "--warmup", "0",
                                "--steps", "2", "--rounds", "3", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["rounds"] == 3
    modes = data["models"]["gpt2"]["modes"]
    for mode, r in modes.items():
        assert len(r["step_ms_all"]) == 6 and len(r["round_ms"]) == 3, mode
        assert r["step_ms"] == statistics.median(r["step_ms_all"]), mode
        assert r["x_plain"] == r["step_ms"] / modes["plain"]["step_ms"], mode
        assert r["best_ms"] == min(r["step_ms_all"]), mode
        assert r["x_plain_best"] == r["best_ms"] / modes["plain"]["best_ms"], mode


def test_interleave_times_the_modes_step_by_step_each_on_its_own_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models: list[int] = []  # the model each step trained, in order
    step = bench_models.train_step

    def recorded(bench: bench_models.Bench, *args: object, **kwargs: object) -> object:
        models.append(id(bench.model))
        return step(bench, *args, **kwargs)

    monkeypatch.setattr(bench_models, "train_step", recorded)
    out = tmp_path / "models.json"
    modes = ["plain", "checkpoint", "ds_recompute"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = bench_models.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--models", "gpt2",
                                "--modes", *modes, "--warmup", "0", "--steps", "2", "--rounds", "2",
                                "--interleave", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["interleave"] is True
    result = data["models"]["gpt2"]["modes"]
    for mode, r in result.items():
        assert r["timing"] == "interleaved" and len(r["step_ms_all"]) == 4, mode
        assert r["step_ms"] == statistics.median(r["step_ms_all"]) and r["best_ms"] == min(r["step_ms_all"])
        assert r["x_plain"] == r["step_ms"] / result["plain"]["step_ms"], mode
        assert r["sequential_ms"] > 0, mode
    # the last 4 x 3 steps: the three modes by turns, each on a model of its own
    timed = models[-12:]
    assert len(set(timed[:3])) == 3 and timed == timed[:3] * 4
    first_round = models[:len(models) - 12 - bench_models.DS_WARMUP]  # before ds_recompute's warm-up
    assert not set(timed[:3]) & set(first_round)


def test_trace_modes_counts_the_same_ops_for_keeping_everything_as_for_plain(tmp_path: Path) -> None:
    import trace_modes

    out = tmp_path / "trace.json"
    rc = trace_modes.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--model", "bert", "--modes",
                           "plain", "wrapped", "auto_fits", "ds_recompute", "--rounds", "1", "--steps", "1",
                           "--warmup", "3", "--out", str(out)])
    assert rc == 0
    modes = json.loads(out.read_text())["modes"]
    ops = {mode: r["launches_per_step"] for mode, r in modes.items()}
    assert ops["plain"] > 0
    # the wrapper alone and a plan that moves nothing run exactly plain's ops; recomputing runs more
    assert ops["wrapped"] == ops["auto_fits"] == ops["plain"], ops
    assert ops["ds_recompute"] > ops["plain"], ops
    for mode, r in modes.items():
        assert r["step_ms"] > 0 and r["act_peak_bytes"] > 0 and len(r["step_ms_all"]) == 1, mode
        assert r["host_backward_ms"] >= r["host_forward_ms"] > 0, mode
