"""``SwapMonitor``: log what deltaswap did in each training step (bytes moved, copy rates, stalls,
recompute, measured and predicted peak and time) to the Trainer's loggers."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from deltaswap.strategy.lightning import PlannedTraining
from deltaswap.swap import ManagerStats

GIB = 2**30

KEYS = (
    "deltaswap/offloaded_gib",
    "deltaswap/recomputed_ops",
    "deltaswap/recompute_ms_predicted",
    "deltaswap/d2h_gbps",
    "deltaswap/h2d_gbps",
    "deltaswap/stall_ms",
    "deltaswap/peak_activation_gib",
    "deltaswap/predicted_peak_gib",
    "deltaswap/step_ms",
    "deltaswap/predicted_step_ms",
)
"""Every key :class:`SwapMonitor` may log (its docstring says what each one means)."""


def lightning_writes_now(trainer: Trainer, interval: int) -> bool:
    """Whether the current training batch ends a logging step, with one logging step every ``interval``
    optimizer steps: the optimizer steps after this batch (in automatic optimization, it is not a
    gradient-accumulation batch) and the number of optimizer steps is then a multiple of ``interval``.
    Valid from ``on_train_batch_start`` to ``on_train_batch_end``.

    With ``interval = trainer.log_every_n_steps`` this is when Lightning writes its own step metrics
    (its logger connector's rule), read from the loop counters its own ``LearningRateMonitor`` and
    ``DeviceStatsMonitor`` read.
    """
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization and loop._should_accumulate():
        return False
    return interval > 0 and (loop._batches_that_stepped + 1) % interval == 0


def logger_step(trainer: Trainer) -> int:
    """The step Lightning writes the current batch's metrics at (optimizer steps before it)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def step_metrics(stats: ManagerStats, peak_bytes: int | None) -> dict[str, float]:
    """The :class:`SwapMonitor` metrics of one step from its :class:`~deltaswap.swap.ManagerStats`.

    ``peak_bytes`` is the measured activation peak (``None``: not measured, the key is left out). A
    profiling step has no plan: its predicted values, and the recompute the plan would do, are left out.
    A step whose backward has not run (``measured_ms`` 0) has no ``deltaswap/step_ms``.
    """
    engine = stats.engine
    metrics = {
        "deltaswap/offloaded_gib": engine.bytes_offloaded / GIB,
        "deltaswap/d2h_gbps": engine.d2h_gbps,
        "deltaswap/h2d_gbps": engine.h2d_gbps,
        "deltaswap/stall_ms": engine.backward_stall_ms,
    }
    if stats.measured_ms > 0:
        metrics["deltaswap/step_ms"] = stats.measured_ms
    if peak_bytes is not None:
        metrics["deltaswap/peak_activation_gib"] = peak_bytes / GIB
    if not stats.profiling:
        metrics.update({
            "deltaswap/recomputed_ops": float(stats.recompute_ops),
            "deltaswap/recompute_ms_predicted": stats.recompute_ms,
            "deltaswap/predicted_peak_gib": stats.predicted_peak / GIB,
            "deltaswap/predicted_step_ms": stats.predicted_ms,
        })
    return metrics


class SwapMonitor(Callback):
    """Log, every few training steps, what :class:`~deltaswap.strategy.SwapStrategy` did in the step
    and what its plan predicted, so that both can be plotted next to the loss.

    Use it with ``SwapStrategy`` to watch the swap engine (is PCIe saturated, does the backward wait for
    copies?) and to check the plan's predictions of peak memory and step time against measurements.
    Like Lightning's ``LearningRateMonitor``, it writes to every logger of the Trainer
    (``logger.log_metrics``), at the step Lightning writes that batch's own metrics at, and only for the
    batches it measured: a value is never repeated on a later step.

    Keys (GiB are 2**30 bytes, GB/s are 1e9 bytes per second):

    - ``deltaswap/offloaded_gib``: GiB copied device->host in the step's forward pass.
    - ``deltaswap/recomputed_ops``: ops the plan runs again in the backward pass.
    - ``deltaswap/recompute_ms_predicted``: the plan's predicted time of those ops, ms.
    - ``deltaswap/d2h_gbps``, ``deltaswap/h2d_gbps``: achieved device->host and host->device copy rates
      (0 when nothing was copied).
    - ``deltaswap/stall_ms``: time the backward pass waited for host->device copies, ms.
    - ``deltaswap/peak_activation_gib``: measured peak GPU memory of the step's forward and backward,
      less what was allocated when the batch started (weights, optimizer state, the previous step's
      gradients). CUDA only.
    - ``deltaswap/predicted_peak_gib``: the plan's predicted activation peak.
    - ``deltaswap/step_ms``: measured time from the start of the forward pass to the end of the blocks'
      backward, ms (CUDA events; wall clock on a CPU).
    - ``deltaswap/predicted_step_ms``: the plan's predicted forward+backward time, ms.

    A profiling step (the first step of each input shape) has no plan yet: it logs the measured values
    only, and no peak (see the warning).

    Args:
        logging_interval: log every this many optimizer steps, counted as Lightning's loggers count them;
            default: the Trainer's ``log_every_n_steps``. With gradient accumulation, the last batch before
            each optimizer step is the one measured.

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.callbacks import SwapMonitor
        >>> from deltaswap.strategy import SwapStrategy
        >>> trainer = Trainer(strategy=SwapStrategy(memory_budget="12GiB"), callbacks=[SwapMonitor()])
        >>> trainer.fit(model, loader)                                   # doctest: +SKIP

    .. warning::
        To measure the peak, on each logging step on CUDA the monitor calls
        ``torch.cuda.reset_peak_memory_stats()`` in ``on_train_batch_start``: code of yours that reads
        ``torch.cuda.max_memory_allocated()`` across steps sees the counter reset. The peak is read in
        ``on_after_backward`` (or at the batch's end if no backward ran through Lightning), so the
        optimizer step's temporaries are not counted. A profiling step resets the counter itself, so no
        peak is logged for it.

    .. warning::
        Reading the step's stats waits for its copies and timing events (a host synchronization at the
        batch's end). It happens only on logging steps.

    .. warning::
        The values are not in ``trainer.callback_metrics`` (so not usable as a ``monitor`` of
        ``ModelCheckpoint`` or ``EarlyStopping``). With a strategy other than deltaswap's
        (``SwapStrategy``, ``SwapDDPStrategy``) it warns once at fit start and logs nothing.

    Raises:
        MisconfigurationException: at setup, if the Trainer has no logger.
    """

    def __init__(self, logging_interval: int | None = None) -> None:
        if logging_interval is not None and logging_interval < 1:
            raise ValueError(f"logging_interval must be a positive number of steps, got {logging_interval}")
        self.logging_interval = logging_interval
        self._strategy: PlannedTraining | None = None
        self._start_bytes: int | None = None
        self._peak_bytes: int | None = None

    def _logs_now(self, trainer: Trainer) -> bool:
        interval = self.logging_interval if self.logging_interval is not None else trainer.log_every_n_steps
        return lightning_writes_now(trainer, interval)

    def _on_cuda(self) -> bool:
        return (self._strategy is not None and self._strategy.root_device.type == "cuda"
                and torch.cuda.is_available())

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException("Cannot use SwapMonitor with a Trainer that has no logger.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, PlannedTraining):
            self._strategy = strategy
            return
        self._strategy = None
        rank_zero_warn(f"SwapMonitor has nothing to monitor: the Trainer's strategy is "
                       f"{type(strategy).__name__}, not one of deltaswap's strategies; it logs nothing.")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start_bytes, self._peak_bytes = None, None
        strategy = self._strategy
        if strategy is not None and self._on_cuda() and self._logs_now(trainer):
            # reading the plan finishes a pending profile now (its PCIe measurement allocates device
            # buffers) rather than inside the step, where it would count in the step's peak
            _ = strategy.plan
            device = strategy.root_device
            self._start_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start_bytes is not None:
            self._peak_bytes = torch.cuda.max_memory_allocated(self._strategy.root_device)  # type: ignore[union-attr]

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        strategy = self._strategy
        if strategy is None or not self._logs_now(trainer):
            return
        stats = strategy.stats
        if stats is None:
            return
        peak = None
        if self._start_bytes is not None and not stats.profiling:
            top = self._peak_bytes
            if top is None:
                top = torch.cuda.max_memory_allocated(strategy.root_device)
            peak = max(0, top - self._start_bytes)
        metrics = step_metrics(stats, peak)
        step = logger_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy, self._start_bytes, self._peak_bytes = None, None, None
