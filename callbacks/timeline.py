"""``MemoryTimeline``: record GPU memory over one training step and plot it against the plan's predicted
activation timeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from deltaswap.strategy.lightning import PlannedTraining
from deltaswap.swap import format_bytes

GIB = 2**30

NEEDS_MATPLOTLIB = "MemoryTimeline needs matplotlib: pip install 'deltaswap[plot]'"


def plot_timeline(measured: Sequence[tuple[float, int]], predicted: Sequence[tuple[float, int]],
                  path: str | os.PathLike[str], title: str, measured_peak: int | None = None) -> Path:
    """Plot measured and predicted activation memory over a step into a PNG file; returns its path.

    Each point is ``(ms since the step began, bytes)``; ``measured_peak`` (bytes), if given, is drawn as
    a horizontal line. The folder is created if needed. Uses
    matplotlib's object-oriented API only (no ``pyplot``), so the global backend is left alone.

    Example::

        >>> measured = [(1.0, 2 << 30), (3.0, 1 << 30)]
        >>> plot_timeline(measured, plan.timeline, "tl.png", "step 3")       # doctest: +SKIP
        PosixPath('tl.png')

    Raises:
        ImportError: without matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(NEEDS_MATPLOTLIB) from err
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for points, style, label in ((predicted, "--", "predicted (plan)"), (measured, "o-", "measured")):
        if points:
            ax.plot([ms for ms, _ in points], [b / GIB for _, b in points], style, label=label, markersize=4)
    if measured_peak is not None:
        ax.axhline(measured_peak / GIB, color="tab:red", linestyle=":", label="measured peak")
    ax.set_xlabel("ms since the step began")
    ax.set_ylabel("activation memory (GiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if measured or predicted:
        ax.legend()
    fig.savefig(out, dpi=120)
    return out


def rank_filename(filename: str, trainer: Trainer) -> str:
    """``filename``, with ``_rank{R}`` before its suffix when several ranks train (each writes its own)."""
    if trainer.world_size <= 1:
        return filename
    path = Path(filename)
    return f"{path.stem}_rank{trainer.global_rank}{path.suffix}"


def _grad_tensor(output: Any) -> torch.Tensor | None:
    """The block's output tensor that receives a gradient (the first one, for tuple outputs)."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor) and t.requires_grad), None)
    return None


class _Recording:
    """Hooks that mark (CUDA event, bytes allocated over the baseline) at each block's end in the forward
    pass and at each block's start in the backward pass. Nothing here waits for the device."""

    def __init__(self, device: torch.device, blocks: Sequence[nn.Module], step: int) -> None:
        self.device = device
        self.step = step
        self.baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.peak: int | None = None
        self.start = self._event()
        self.marks: list[tuple[torch.cuda.Event, int]] = []
        self.handles: list[RemovableHandle] = [b.register_forward_hook(self._block_end) for b in blocks]

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _mark(self) -> None:
        self.marks.append((self._event(), torch.cuda.memory_allocated(self.device) - self.baseline))

    def _block_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._mark()
        tensor = _grad_tensor(output)
        if tensor is not None:  # its gradient arrives when the block's backward starts
            self.handles.append(tensor.register_hook(self._backward_start))

    def _backward_start(self, grad: torch.Tensor) -> None:
        self._mark()

    def backward_done(self) -> None:
        """The step's backward is over: its peak, before the optimizer's temporaries."""
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.baseline

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def finish(self) -> list[tuple[float, int]]:
        """Remove the hooks, wait for the device and return ``(ms since the start, bytes)`` in time
        order."""
        self.remove()
        if self.peak is None:
            self.backward_done()
        torch.cuda.synchronize(self.device)
        return sorted((self.start.elapsed_time(event), nbytes) for event, nbytes in self.marks)


class MemoryTimeline(Callback):
    """Record GPU memory over one training step and save a PNG of measured against predicted activation
    memory (ms on x, GiB on y).

    Use it to see where in the step the memory goes and whether :class:`~deltaswap.strategy.SwapStrategy`'s
    plan predicts it: its ``plan.timeline`` gives the activation bytes the planner expects at each block's
    end in the forward pass and each block's start in the backward pass; the callback measures
    ``torch.cuda.memory_allocated()`` over the batch's start at the same moments, timed with CUDA events
    from the batch's start (the prediction's clock starts at the forward pass, a little later).

    The chosen step is global training step ``step`` (``trainer.global_step`` when its batch starts). If
    that step runs no plan (it is a profiling step: the first of an input shape), the next step that runs
    one is recorded instead. The PNG goes to ``dirpath``, else the Trainer's ``log_dir`` (else its
    ``default_root_dir``). The points stay in :attr:`measured` (and the plan's in :attr:`predicted`).

    Args:
        step: the global training step to record.
        dirpath: folder for the PNG (default: ``trainer.log_dir``).
        filename: the PNG's file name; under DDP each rank writes its own, ``_rank{R}`` added before the
            suffix.

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.callbacks import MemoryTimeline
        >>> from deltaswap.strategy import SwapStrategy
        >>> timeline = MemoryTimeline(step=3)
        >>> trainer = Trainer(strategy=SwapStrategy(memory_budget="12GiB"), callbacks=[timeline])
        >>> trainer.fit(model, loader)                                   # doctest: +SKIP
        >>> timeline.path, timeline.measured[:2]                         # doctest: +SKIP

    .. warning::
        The memory is measured against what was allocated when the batch started, which includes the
        previous step's gradients: Lightning frees those (``zero_grad``) before the backward pass, so the
        measured backward runs below the prediction by up to the gradients' size. The recorded step
        resets CUDA's peak-memory counter when its batch starts (to measure the step's peak). The forward
        pass is never synchronized (events and the allocator's counters only); the recorded step waits
        for the device once, at its end.

    .. warning::
        Needs matplotlib (``pip install 'deltaswap[plot]'``). On a CPU, or with a strategy other than
        deltaswap's (``SwapStrategy``, ``SwapDDPStrategy``), it warns once at fit start and records nothing.

    Raises:
        ImportError: at construction, without matplotlib.
    """

    def __init__(self, step: int = 3, dirpath: str | os.PathLike[str] | None = None,
                 filename: str = "memory_timeline.png") -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(NEEDS_MATPLOTLIB) from err
        if step < 0:
            raise ValueError(f"step must be a global training step (>= 0), got {step}")
        self.step = step
        self.dirpath = dirpath
        self.filename = filename
        self.measured: list[tuple[float, int]] = []
        """``(ms since the batch started, bytes allocated over the batch's start)`` of the recorded step:
        each block's end in the forward pass, then each block's start in the backward pass."""
        self.predicted: list[tuple[float, int]] = []
        """The plan's ``timeline`` for the recorded step."""
        self.measured_peak: int | None = None
        """The recorded step's peak over the batch's start, measured through its backward pass."""
        self.recorded_step: int | None = None
        """The global step that was recorded (``None`` until one was)."""
        self.path: Path | None = None
        """The PNG written (``None`` until then)."""
        self._strategy: PlannedTraining | None = None
        self._recording: _Recording | None = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        self._strategy = None
        if not isinstance(strategy, PlannedTraining):
            rank_zero_warn(f"MemoryTimeline has nothing to record: the Trainer's strategy is "
                           f"{type(strategy).__name__}, not one of deltaswap's strategies.")
        elif strategy.root_device.type != "cuda" or not torch.cuda.is_available():
            rank_zero_warn(f"MemoryTimeline: training runs on {strategy.root_device}, with no device memory "
                           f"to record; it records nothing.")
        elif self.recorded_step is None:
            self._strategy = strategy

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        strategy = self._strategy
        if strategy is None or strategy.manager is None or trainer.global_step < self.step:
            return
        if strategy.plan is None:  # still profiling: try the next step
            return
        self._recording = _Recording(strategy.root_device, strategy.manager.blocks, trainer.global_step)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recording is not None:
            self._recording.backward_done()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        recording, strategy = self._recording, self._strategy
        if recording is None or strategy is None:
            return
        self._recording = None
        points = recording.finish()
        stats, plan = strategy.stats, strategy.plan
        if stats is None or stats.profiling or plan is None or not points:
            return  # a new input shape was profiled here: try the next step
        self.measured, self.predicted = points, list(plan.timeline)
        self.measured_peak = recording.peak
        self.recorded_step = recording.step
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        title = (f"deltaswap activation memory, step {recording.step} (policy {plan.policy}, budget "
                 f"{format_bytes(plan.budget)}, predicted peak {format_bytes(plan.predicted_peak)})")
        self.path = plot_timeline([(0.0, 0), *points], self.predicted,
                                  Path(folder) / rank_filename(self.filename, trainer), title,
                                  measured_peak=recording.peak)
        self._strategy = None  # done
        rank_zero_info(f"MemoryTimeline: step {recording.step} written to {self.path}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._drop()

    def _drop(self) -> None:
        if self._recording is not None:
            self._recording.remove()
            self._recording = None
        self._strategy = None
