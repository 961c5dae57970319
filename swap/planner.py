"""Choose keep / swap / recompute for every block (and every op inside a checkpointed block) under a
memory budget, from measured op costs and measured PCIe bandwidth; predict peak memory and step time.

The model (DESIGN.md, "How the planner decides"):

- The forward pass runs the blocks one after another (``ms`` measured per op). Swapped bytes enter a
  device->host queue as their block finishes and leave it at the measured rate; bytes whose copy has not
  finished when the forward pass ends still occupy the GPU at the peak.
- The backward pass visits the blocks in reverse, each taking ``backward_ratio`` x its forward time plus
  what it recomputes. A swapped block's bytes come back on a host->device queue, started ``lookahead``
  of backward progress early; when they arrive late the compute stream stalls.
- A recomputed op costs its measured time again. Keeping costs memory and no time.

``auto`` starts from keeping everything, swaps the first blocks while the copies hide (the simulation
says so), then moves to checkpointed blocks where each stored op output is the one with the most compute
per byte, taking at each step the move that frees memory for the least time, until the peak fits.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import format_bytes
from .profile import Bandwidth, OpRecord
from .recompute import OpDecision, OpPolicy

BACKWARD_RATIO = 2.0
"""Backward time of a block over its forward time, when not measured (two matmuls per forward one)."""


class BlockMode(enum.Enum):
    """How a block runs."""

    KEEP = "keep"
    """Plainly; what it saves stays on the GPU."""
    SWAP = "swap"
    """Plainly; what it saves is swapped to host memory."""
    CHECKPOINT = "checkpoint"
    """Checkpointed: its input is saved (kept, or swapped if ``swap_input``), each op output is kept,
    swapped or recomputed as ``decisions`` say."""


@dataclass(frozen=True)
class BlockCost:
    """What one block call costs, measured in the profiling step."""

    ops: tuple[OpRecord, ...]
    """Its ops in order (time, output bytes, whether storable)."""
    input_bytes: int
    """Bytes of its input: what a checkpointed block keeps (or swaps) at the least."""
    saved_bytes: int
    """Bytes autograd saves when the block runs plainly."""

    @property
    def forward_ms(self) -> float:
        return sum(op.ms for op in self.ops)


@dataclass(frozen=True)
class BlockPlan:
    """The plan of one block call, with what it is predicted to hold, move and recompute."""

    mode: BlockMode
    decisions: dict[int, OpDecision] = field(default_factory=dict)
    """Per op index (CHECKPOINT only); ops not listed are recomputed."""
    swap_input: bool = False
    kept_bytes: int = 0
    swapped_bytes: int = 0
    recompute_ms: float = 0.0

    def policy(self) -> OpPolicy:
        """The per-op policy for :func:`~deltaswap.swap.recompute.checkpoint_with_policy`."""
        decisions = self.decisions

        def decide(index: int, op: object) -> OpDecision:
            return decisions.get(index, OpDecision.RECOMPUTE)

        return decide


@dataclass(frozen=True)
class Plan:
    """Per-block plans and what they are predicted to cost."""

    blocks: tuple[BlockPlan, ...]
    budget: int
    predicted_peak: int
    """Activation bytes on the GPU at the peak (end of the forward pass, plus one block's recompute)."""
    predicted_ms: float
    """Forward plus backward time."""
    plain_ms: float
    """Forward plus backward time with everything kept (the reference)."""
    policy: str

    def __str__(self) -> str:
        head = f"{'block':>5}  {'mode':<10}{'kept':>12}{'swapped':>12}{'recompute ms':>14}"
        rows = [head, "-" * len(head)]
        for i, b in enumerate(self.blocks):
            mode = b.mode.value + ("+in" if b.swap_input else "")
            rows.append(f"{i:>5}  {mode:<10}{format_bytes(b.kept_bytes):>12}"
                        f"{format_bytes(b.swapped_bytes):>12}{b.recompute_ms:>14.2f}")
        kept = sum(b.kept_bytes for b in self.blocks)
        swapped = sum(b.swapped_bytes for b in self.blocks)
        rows.append("-" * len(head))
        rows.append(f"{'total':>5}  {'':<10}{format_bytes(kept):>12}{format_bytes(swapped):>12}"
                    f"{sum(b.recompute_ms for b in self.blocks):>14.2f}")
        rows.append(f"policy {self.policy}; budget {format_bytes(self.budget)}; predicted peak "
                    f"{format_bytes(self.predicted_peak)}; predicted step {self.predicted_ms:.1f} ms "
                    f"({self.predicted_ms / self.plain_ms:.3f} x keeping everything)")
        return "\n".join(rows)


@dataclass(frozen=True)
class Workload:
    """Everything the planner needs about one step."""

    blocks: tuple[BlockCost, ...]
    other_bytes: int
    """Activation bytes saved outside the blocks (embeddings, head, loss): always kept."""
    other_ms: float
    """Forward time outside the blocks."""
    bandwidth: Bandwidth
    min_bytes: int = 1 << 20
    lookahead: int = 0
    """Prefetch look-ahead in bytes of backward progress."""
    backward_ratio: float = BACKWARD_RATIO
    peak_offset: int = 0
    """Added to every predicted peak: measured peak minus the model's peak for the profiling step's plan
    (gradient buffers, temporaries and whatever else the model does not see)."""


# -- the options of one block -----------------------------------------------------------------------
def keep_block(cost: BlockCost) -> BlockPlan:
    return BlockPlan(BlockMode.KEEP, kept_bytes=cost.saved_bytes)


def swap_block(cost: BlockCost) -> BlockPlan:
    return BlockPlan(BlockMode.SWAP, swapped_bytes=cost.saved_bytes)


def checkpoint_block(cost: BlockCost, stored: dict[int, OpDecision], swap_input: bool = False) -> BlockPlan:
    """A checkpointed block that stores the ops in ``stored`` and recomputes the rest."""
    by_index = {op.index: op for op in cost.ops}
    kept = sum(by_index[i].out_bytes for i, d in stored.items() if d is OpDecision.KEEP)
    swapped = sum(by_index[i].out_bytes for i, d in stored.items() if d is OpDecision.SWAP)
    recompute = sum(op.ms for op in cost.ops if op.index not in stored)
    if swap_input:
        swapped += cost.input_bytes
    else:
        kept += cost.input_bytes
    return BlockPlan(BlockMode.CHECKPOINT, dict(stored), swap_input, kept, swapped, recompute)


def frontier(cost: BlockCost, min_bytes: int) -> list[BlockPlan]:
    """Checkpointed variants of a block from most memory to least: store the op outputs with the most
    compute per byte first (a matmul's output is worth keeping; a cast's or an add's is not)."""
    candidates = sorted(
        (op for op in cost.ops if op.storable and op.out_bytes >= max(min_bytes, 1)),
        key=lambda op: op.ms / op.out_bytes,
        reverse=True,
    )
    plans = []
    for n in range(len(candidates), -1, -1):
        plans.append(checkpoint_block(cost, {op.index: OpDecision.KEEP for op in candidates[:n]}))
    return plans


# -- simulation ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    peak: int
    ms: float
    stall_ms: float


def simulate(work: Workload, plans: Sequence[BlockPlan]) -> Prediction:
    """Peak activation memory and forward+backward time of ``plans`` (see the module docstring)."""
    d2h_rate = work.bandwidth.d2h_gbps * 1e6  # bytes per ms
    h2d_rate = work.bandwidth.h2d_gbps * 1e6
    blocks = list(zip(work.blocks, plans, strict=True))
    # forward: each block's swapped bytes join the D2H queue when the block ends
    t, queue_free = work.other_ms / 2, 0.0
    copy_start, copy_end = [], []
    for cost, plan in blocks:
        t += cost.forward_ms
        begin = max(t, queue_free)
        queue_free = begin + plan.swapped_bytes / d2h_rate
        copy_start.append(begin)
        copy_end.append(queue_free)
    forward_end = t + work.other_ms / 2
    in_flight = sum(
        min(plan.swapped_bytes, (end - max(begin, forward_end)) * d2h_rate)
        for (_, plan), begin, end in zip(blocks, copy_start, copy_end, strict=True)
        if end > forward_end
    )
    kept = sum(plan.kept_bytes for plan in plans)
    checkpointed = [(cost, plan) for cost, plan in blocks if plan.mode is BlockMode.CHECKPOINT]
    transient = max((max(0, cost.saved_bytes - plan.kept_bytes) for cost, plan in checkpointed), default=0)
    peak = int(work.other_bytes + kept + in_flight + transient + work.peak_offset)
    # backward: blocks in reverse; a swapped block's bytes are issued when the backward's progress (bytes
    # of saved tensors consumed) is within `lookahead` of them, and must land before the block starts
    sizes = [plan.kept_bytes + plan.swapped_bytes for plan in plans]
    t = forward_end + work.other_ms * work.backward_ratio / 2
    h2d_free, stall, consumed = 0.0, 0.0, 0
    reached: list[tuple[int, float]] = []  # (bytes consumed when a block started, its start time)
    for k in range(len(plans) - 1, -1, -1):
        cost, plan = blocks[k]
        if plan.swapped_bytes:
            due = consumed - work.lookahead
            issue = next((when for at, when in reached if at >= due), t)
            begin = max(issue, copy_end[k], h2d_free)
            h2d_free = begin + plan.swapped_bytes / h2d_rate
            if h2d_free > t:
                stall += h2d_free - t
                t = h2d_free
        reached.append((consumed, t))
        t += cost.forward_ms * work.backward_ratio + plan.recompute_ms
        consumed += sizes[k]
    t += work.other_ms * work.backward_ratio / 2
    return Prediction(peak=peak, ms=t, stall_ms=stall)


def profiling_plans(work: Workload) -> list[BlockPlan]:
    """The plan the profiling step runs: the first block plainly, every other block checkpointed with
    everything recomputed and its input kept."""
    return [keep_block(work.blocks[0])] + [checkpoint_block(c, {}) for c in work.blocks[1:]]


# -- policies -----------------------------------------------------------------------------------------
def _finish(work: Workload, plans: list[BlockPlan], budget: int, policy: str) -> Plan:
    pred = simulate(work, plans)
    plain = simulate(work, [keep_block(c) for c in work.blocks])
    return Plan(tuple(plans), budget, pred.peak, pred.ms, plain.ms, policy)


def plan_fixed(work: Workload, policy: str, budget: int) -> Plan:
    """``keep``, ``swap`` or ``recompute`` for every block, or DELTA's rule (``delta``)."""
    if policy == "keep":
        plans = [keep_block(c) for c in work.blocks]
    elif policy == "swap":
        plans = [swap_block(c) for c in work.blocks]
    elif policy == "recompute":
        plans = [checkpoint_block(c, {}) for c in work.blocks]
    elif policy == "delta":
        plans = [delta_block(c, work.bandwidth, work.min_bytes) for c in work.blocks]
    else:
        raise ValueError(f"unknown fixed policy {policy!r}")
    return _finish(work, plans, budget, policy)


def delta_block(cost: BlockCost, bandwidth: Bandwidth, min_bytes: int) -> BlockPlan:
    """DELTA's rule per op output: recompute when 2 x swap time > compute time, else swap (the measured
    bandwidth, no overlap model)."""
    rate = min(bandwidth.d2h_gbps, bandwidth.h2d_gbps) * 1e6
    stored = {
        op.index: OpDecision.SWAP
        for op in cost.ops
        if op.storable and op.out_bytes >= max(min_bytes, 1) and 2 * (op.out_bytes / rate) <= op.ms
    }
    return checkpoint_block(cost, stored)


SWAP_TOLERANCE = 0.005
"""Swapping whole blocks is taken while the predicted step stays within this fraction of keeping all."""


def plan_auto(work: Workload, budget: int) -> Plan:
    """The cheapest mix found for ``budget`` (see the module docstring)."""
    plans = [keep_block(c) for c in work.blocks]
    pred = simulate(work, plans)
    plain_ms = pred.ms
    # 1. swap the first blocks while their copies hide in the forward and backward passes
    for k in range(len(plans)):
        if pred.peak <= budget:
            return _finish(work, plans, budget, "auto")
        trial = [*plans[:k], swap_block(work.blocks[k]), *plans[k + 1 :]]
        trial_pred = simulate(work, trial)
        if trial_pred.peak >= pred.peak or trial_pred.ms > plain_ms * (1 + SWAP_TOLERANCE):
            break
        plans, pred = trial, trial_pred
    # 2. checkpoint the kept blocks: repeatedly take the frontier move that frees memory for the least
    #    recompute time per byte (judged locally, then the whole plan is simulated again)
    fronts = {k: frontier(work.blocks[k], work.min_bytes) for k in range(len(plans))
              if plans[k].mode is BlockMode.KEEP}
    position = dict.fromkeys(fronts, -1)  # -1: still KEEP
    while pred.peak > budget:
        best: tuple[float, int, int] | None = None
        for k, front in fronts.items():
            current = plans[k]
            for j in range(position[k] + 1, len(front)):
                freed = current.kept_bytes - front[j].kept_bytes
                if freed > 0:
                    score = (front[j].recompute_ms - current.recompute_ms) / freed
                    if best is None or score < best[0]:
                        best = (score, k, j)
        if best is None:
            break
        _, k, j = best
        plans[k], position[k] = fronts[k][j], j
        pred = simulate(work, plans)
    # 3. still over: swap the inputs of checkpointed blocks, earliest first
    for k in range(len(plans)):
        if pred.peak <= budget:
            break
        if plans[k].mode is BlockMode.CHECKPOINT and not plans[k].swap_input:
            trial = [*plans[:k], checkpoint_block(work.blocks[k], plans[k].decisions, True), *plans[k + 1 :]]
            trial_pred = simulate(work, trial)
            if trial_pred.peak < pred.peak:
                plans, pred = trial, trial_pred
    return _finish(work, plans, budget, "auto")


def make_plan(work: Workload, policy: str, budget: int) -> Plan:
    """The plan for ``policy`` (one of :data:`~deltaswap.swap.config.POLICIES`) under ``budget`` bytes."""
    if policy == "auto":
        return plan_auto(work, budget)
    return plan_fixed(work, policy, budget)


__all__ = [
    "BlockCost",
    "BlockMode",
    "BlockPlan",
    "Plan",
    "Prediction",
    "Workload",
    "delta_block",
    "frontier",
    "make_plan",
    "profiling_plans",
    "simulate",
]
