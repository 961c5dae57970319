"""How much of one training step's gradient communication runs alongside computation, read from a
``torch.profiler`` trace of the step.

DDP all-reduces each bucket of gradients while the backward pass computes the next ones. Anything that
delays those all-reduces (a copy holding a stream, a host wait) shows up as communication that runs with
no computation beside it: *exposed* communication. :class:`CommOverlap` profiles one step of a Lightning
run and :func:`overlap_summary` measures, from the kernels in the trace:

- ``comm_ms``: time some NCCL kernel ran;
- ``exposed_comm_ms``: of that, time no compute kernel ran (lower is better);
- ``copy_during_comm_ms``: time a host<->device copy (deltaswap's swaps) ran during communication.

Compare plain DDP with ``deltaswap_ddp`` at the same batch: ``train_gpt.py --devices 2 --profile-step 5``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

Interval = tuple[float, float]


@dataclass(frozen=True)
class Overlap:
    """What the GPU ran during one profiled step (ms; intervals merged, so concurrent kernels count once)."""

    step_ms: float
    """From the first kernel or copy to the last."""
    compute_ms: float
    """Time at least one kernel other than NCCL's ran."""
    comm_ms: float
    """Time at least one NCCL kernel ran."""
    exposed_comm_ms: float
    """Time NCCL ran and nothing else computed: communication that delays the step."""
    copy_ms: float
    """Time at least one host<->device copy ran."""
    copy_during_comm_ms: float
    """Time a host<->device copy ran while NCCL ran."""

    def __str__(self) -> str:
        hidden = 1.0 - self.exposed_comm_ms / self.comm_ms if self.comm_ms > 0 else 1.0
        return (f"step {self.step_ms:.1f} ms: compute {self.compute_ms:.1f} ms, NCCL {self.comm_ms:.1f} ms "
                f"({hidden:.1%} overlapped, {self.exposed_comm_ms:.1f} ms exposed), host copies "
                f"{self.copy_ms:.1f} ms ({self.copy_during_comm_ms:.1f} ms during NCCL)")


def merge(intervals: list[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[Interval]) -> float:
    """Total length of disjoint ``intervals``."""
    return sum(end - start for start, end in intervals)


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The intersection of two sorted lists of disjoint intervals."""
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_summary(trace: dict[str, Any]) -> Overlap:
    """Measure a Chrome trace written by ``torch.profiler`` (``export_chrome_trace``): its GPU kernels
    (``cat == "kernel"``, NCCL's by name) and host<->device copies (``cat == "gpu_memcpy"``, device to
    device excluded). Times in the trace are microseconds."""
    compute: list[Interval] = []
    comm: list[Interval] = []
    copies: list[Interval] = []
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X" or "dur" not in event:
            continue
        span = (float(event["ts"]) / 1e3, (float(event["ts"]) + float(event["dur"])) / 1e3)
        category, name = event.get("cat", ""), str(event.get("name", ""))
        if category == "kernel":
            (comm if "nccl" in name.lower() else compute).append(span)
        elif category == "gpu_memcpy" and "DtoD" not in name:
            copies.append(span)
    compute_u, comm_u, copies_u = merge(compute), merge(comm), merge(copies)
    everything = merge(compute + comm + copies)
    return Overlap(
        step_ms=everything[-1][1] - everything[0][0] if everything else 0.0,
        compute_ms=length(compute_u),
        comm_ms=length(comm_u),
        exposed_comm_ms=length(comm_u) - length(intersect(comm_u, compute_u)),
        copy_ms=length(copies_u),
        copy_during_comm_ms=length(intersect(comm_u, copies_u)),
    )


class CommOverlap(Callback):
    """Profile training step ``step`` (forward, backward, all-reduces and optimizer step) on CUDA, write
    its trace to ``dirpath/comm_trace_rank{R}.json`` and print its :class:`Overlap` on every rank.

    Args:
        step: the global step to profile (after deltaswap's profiling step and a warm-up).
        dirpath: folder for the traces.

    .. warning::
        The profiled step runs slower than the others (the profiler records every kernel), and it ends
        with a device synchronization. On a CPU it records nothing.
    """

    def __init__(self, step: int = 5, dirpath: str | os.PathLike[str] = ".") -> None:
        self.step, self.dirpath = step, Path(dirpath)
        self.summary: Overlap | None = None
        """The profiled step's overlap (``None`` until then)."""
        self._profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step or pl_module.device.type != "cuda" or self.summary is not None:
            return
        torch.cuda.synchronize(pl_module.device)
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self._profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        torch.cuda.synchronize(pl_module.device)
        profiler.__exit__(None, None, None)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"comm_trace_rank{trainer.global_rank}.json"
        profiler.export_chrome_trace(str(path))
        self.summary = overlap_summary(json.loads(path.read_text()))
        print(f"rank {trainer.global_rank} profiled step {self.step}: {self.summary}", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None

    def as_dict(self) -> dict[str, float] | None:
        """The summary as a dict (``None`` if no step was profiled)."""
        return None if self.summary is None else asdict(self.summary)
