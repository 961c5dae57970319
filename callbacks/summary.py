"""``SwapPlanSummary``: print deltaswap's plan as a table, in the style of Lightning's ``ModelSummary``,
once the profiling step has made it and again whenever a new plan replaces it."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from deltaswap.strategy.lightning import PlannedTraining
from deltaswap.swap import Plan, format_bytes
from deltaswap.swap.config import format_budget
from deltaswap.swap.manager import PLAN_CACHE_SIZE
from deltaswap.swap.planner import BlockMode, BlockPlan, Workload

COLUMNS = ("", "Name", "Mode", "Kept", "Swapped", "Recomputed", "Recompute ms")
"""The table's columns: block call index, block name, mode, bytes kept / swapped / recomputed, and the
plan's predicted recompute time."""




def block_mode(block: BlockPlan) -> str:
    """``keep``, ``swap`` or ``checkpoint``, with ``+in`` when the block's input is swapped."""
    return block.mode.value + ("+in" if block.swap_input else "")


def recomputed_bytes(block: BlockPlan, saved_bytes: int) -> int:
    """Bytes a block recomputes in the backward pass: what it saves when run plainly (``saved_bytes``)
    less what the plan keeps and swaps, for a checkpointed block; 0 for the others."""
    if block.mode is not BlockMode.CHECKPOINT:
        return 0
    return max(0, saved_bytes - block.kept_bytes - block.swapped_bytes)


def format_plan(plan: Plan, names: Sequence[str], workload: Workload | None) -> str:
    """The plan as a table: one row per block call (index, name, mode, kept, swapped and recomputed
    bytes, predicted recompute ms), a total row, then the budget, the predicted peak and the predicted
    step time against keeping everything.

    Args:
        plan: the plan (e.g. ``trainer.strategy.plan``).
        names: the blocks' names in call order (``ActivationManager.block_names``); a call without a
            name (a block called more than once) shows ``-``.
        workload: what the plan was made from (``ActivationManager.workload``), for the recomputed bytes;
            ``None`` shows ``-`` there.

    Example::

        >>> print(format_plan(mgr.plan, mgr.block_names, mgr.workload))    # doctest: +SKIP
          | Name           | Mode       | Kept       | Swapped    | Recomputed | Recompute ms
        -------------------------------------------------------------------------------------
        0 | model.blocks.0 | swap       | 0 B        | 286.10 MiB | 0 B        | 0.00
        1 | model.blocks.1 | checkpoint | 166.89 MiB | 0 B        | 119.21 MiB | 0.40
        2 | model.blocks.2 | keep       | 286.10 MiB | 0 B        | 0 B        | 0.00
        -------------------------------------------------------------------------------------
          | Total          |            | 453.00 MiB | 286.10 MiB | 119.21 MiB | 0.40
        -------------------------------------------------------------------------------------
        auto        Policy
        5           Ops recomputed per step
        1.00 GiB    Budget
        980.00 MiB  Predicted activation peak
        49.6 ms     Predicted forward+backward
        1.008x      Predicted time / keeping everything
    """
    rows: list[tuple[str, ...]] = []
    recomputed_total: int | None = 0
    for k, block in enumerate(plan.blocks):
        recomputed: int | None = None
        if workload is not None and k < len(workload.blocks):
            recomputed = recomputed_bytes(block, workload.blocks[k].saved_bytes)
        recomputed_total = None if recomputed is None or recomputed_total is None else (
            recomputed_total + recomputed)
        rows.append((
            str(k), names[k] if k < len(names) else "-", block_mode(block), format_bytes(block.kept_bytes),
            format_bytes(block.swapped_bytes), "-" if recomputed is None else format_bytes(recomputed),
            f"{block.recompute_ms:.2f}",
        ))
    total = ("", "Total", "", format_bytes(sum(b.kept_bytes for b in plan.blocks)),
             format_bytes(sum(b.swapped_bytes for b in plan.blocks)),
             "-" if recomputed_total is None else format_bytes(recomputed_total), f"{plan.recompute_ms:.2f}")
    widths = [max(len(row[i]) for row in (COLUMNS, *rows, total)) for i in range(len(COLUMNS))]

    def line(row: tuple[str, ...]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

    rule = "-" * len(line(tuple("x" * w for w in widths)))
    ratio = f"{plan.predicted_ms / plan.plain_ms:.3f}x" if plan.plain_ms > 0 else "-"
    footer = [
        (plan.policy, "Policy"),
        (str(plan.recompute_ops), "Ops recomputed per step"),
        (format_budget(plan.budget), "Budget"),
        (format_bytes(plan.predicted_peak), "Predicted activation peak"),
        (f"{plan.predicted_ms:.1f} ms", "Predicted forward+backward"),
        (ratio, "Predicted time / keeping everything"),
    ]
    value_width = max(len(value) for value, _ in footer)
    return "\n".join([
        line(COLUMNS), rule, *(line(row) for row in rows), rule, line(total), rule,
        *(f"{value.ljust(value_width)}  {label}" for value, label in footer),
    ])


class SwapPlanSummary(Callback):
    """Print :class:`~deltaswap.strategy.SwapStrategy`'s plan as a table: per block, how it runs (keep,
    swap or checkpoint), what it keeps, swaps and recomputes and the predicted recompute time; then the
    totals, the budget, the predicted peak and the predicted step time against keeping everything.

    Use it to see what deltaswap decided for your model and budget. The first training step of an input
    shape profiles the model; the table is printed (through ``rank_zero_info``) at the end of the first
    training batch after which a plan exists, and again at the end of each batch whose plan decides
    differently from the last eight it printed in this fit (a new input shape, or a re-plan after the
    first planned step that changed the decisions, not only the predictions). The text comes from
    :func:`format_plan`.

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.callbacks import SwapPlanSummary
        >>> from deltaswap.strategy import SwapStrategy
        >>> trainer = Trainer(strategy=SwapStrategy(memory_budget="12GiB"), callbacks=[SwapPlanSummary()])
        >>> trainer.fit(model, loader)                                   # doctest: +SKIP

    .. warning::
        With a strategy other than deltaswap's (``SwapStrategy``, ``SwapDDPStrategy``) it warns once at
        fit start and prints nothing.
        Reading the plan right after a profiling step finishes the planning there (measuring PCIe
        bandwidth once, on CUDA) instead of at the start of the next step.
    """

    def __init__(self) -> None:
        self._strategy: PlannedTraining | None = None
        self._printed: deque[tuple[Any, ...]] = deque(maxlen=PLAN_CACHE_SIZE)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        self._printed.clear()  # a new fit prints its plan again
        if isinstance(strategy, PlannedTraining):
            self._strategy = strategy
            return
        self._strategy = None
        rank_zero_warn(f"SwapPlanSummary has no plan to print: the Trainer's strategy is "
                       f"{type(strategy).__name__}, not one of deltaswap's strategies.")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        strategy = self._strategy
        if strategy is None or strategy.manager is None:
            return
        plan = strategy.plan
        if plan is None:
            return
        blocks = tuple((b.mode, b.decisions, b.swap_input) for b in plan.blocks)
        decisions = (blocks, plan.budget, plan.policy)
        if decisions in self._printed:
            return
        self._printed.append(decisions)
        manager = strategy.manager
        rank_zero_info("deltaswap plan:\n" + format_plan(plan, manager.block_names, manager.workload))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy = None
