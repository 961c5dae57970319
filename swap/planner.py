"""Choose keep / swap / recompute for every block (and every op inside a checkpointed block) under a
memory budget, from measured op costs and measured PCIe bandwidth; predict peak memory and step time.

The model (DESIGN.md, "How the planner decides"):

- The forward pass runs the blocks one after another (``ms`` measured per op). Swapped bytes enter a
  device->host queue as their block finishes and leave it at the measured rate; bytes whose copy has not
  finished when the forward pass ends still occupy the GPU at the peak.
- The backward pass visits the blocks in reverse, each taking ``backward_ratio`` x its forward time plus
  what it recomputes. A swapped block's bytes come back on a host->device queue, started ``lookahead``
  of backward progress early; when they arrive late the compute stream stalls. Bytes whose copy back
  starts while the head's backward runs (the last blocks', within ``lookahead`` of its end) are on the
  GPU at the head's peak.
- A recomputed op costs its measured time again. Keeping costs memory and no time.
- Kernels run ``copy_slowdown`` (measured) slower while a copy runs beside them: each swapped byte costs
  that fraction of its copy time in each direction, even when the copy itself hides.
- A checkpointed block that stores some outputs runs every op through Python dispatch modes, in the
  forward and in its recompute: its forward (backward) takes the longer of its GPU time and the host's
  time to issue its ops that way (``host``, measured). Other blocks run at their GPU time.

``auto`` starts from keeping everything. For each number of leading blocks to swap (as many as the
simulation says the backward need not wait for, down to none) it checkpoints the other blocks, storing
the op outputs with the most compute per byte, always taking the move that frees memory for the least
time, until the peak fits. Then it spends PCIe to buy back recompute: it swaps the inputs of the first
m checkpointed blocks and lets the blocks store more of their outputs in the memory that frees. The
fastest plan that fits wins.
"""

from __future__ import annotations

import collections
import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .config import format_budget, format_bytes
from .hostcost import NO_HOST_COST, HostCost
from .profile import COMPILED_OP, Bandwidth, OpRecord
from .recompute import OpDecision, OpPolicy

BACKWARD_RATIO = 2.0
"""Backward time of a block over its forward time, when not measured (two matmuls per forward one)."""


PEAK_COPY_RATE = 0.5
"""When predicting the peak, the forward's device->host copies are taken to run at this fraction of the
measured rate. Swapped bytes still being copied occupy the GPU, and a peak predicted too low runs out of
memory, while one predicted too high only costs some speed: on an H100 with GPT2-XL at batch 64, a plan
whose forward swapped 23 GiB at the measured rate ran out of memory by about 6 GiB."""


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
    """Bytes of its input (the storages of its tensor arguments, positional and keyword, each once):
    what a checkpointed block keeps (or swaps) at the least."""
    saved_bytes: int
    """Bytes autograd saves when the block runs plainly."""
    grad_bytes: int = 0
    """Bytes of the gradients of its parameters, allocated during its backward."""
    chained: int = 0
    """Bytes of its input that the previous block call saves as its own output when it runs plainly (a
    CNN block ending in a ReLU saves its output, the next block's input): held once, not by both."""
    chained_saved: int = 0
    """Of :attr:`chained`, the bytes this call saves again when it runs plainly (its first convolution
    or linear layer saves its input)."""
    input_storages: tuple[tuple[int, int], ...] = ()
    """Its input tensors' storages, as ``(id, bytes)`` with ids numbered over the step's calls: calls
    that take the same tensor (an attention mask, a position bias, the encoder's output) share an id,
    and the calls that keep or save it hold it once."""
    saved_inputs: tuple[tuple[int, int], ...] = ()
    """The storages of the inputs it saves when it runs plainly, as ``(id, bytes counted)`` with
    :attr:`input_storages`' ids."""
    peak_offset: int = 0
    """What the profiling step measured at the peak of this call's backward above what the model
    predicts there for the profiling plan (gradients of activations, kernel workspaces, tensors freed
    late: what the model does not see), added to the model's figure at this call in every plan, so
    that the peak is predicted where it happens (0: not measured per call)."""

    @property
    def compiled(self) -> bool:
        """Whether the call ran compiled (profiled whole, as one op that cannot be stored)."""
        return len(self.ops) == 1 and self.ops[0].op == COMPILED_OP

    @functools.cached_property
    def forward_ms(self) -> float:
        """The time of its ops, summed."""
        return sum(op.ms for op in self.ops)

    def scaled(self, factor: float) -> BlockCost:
        """The same block with every op time multiplied by ``factor``."""
        return replace(self, ops=tuple(replace(op, ms=op.ms * factor) for op in self.ops))


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
    recompute_ops: int = 0
    """Ops of the block run again in the backward (casts aside: they are not counted as ops)."""

    @property
    def per_op(self) -> bool:
        """Whether the block runs every op through deltaswap's dispatch modes: checkpointed and storing
        some outputs (a checkpointed block that stores nothing runs under torch's checkpoint alone)."""
        return self.mode is BlockMode.CHECKPOINT and bool(self.decisions)

    def policy(self, expected: Sequence[str] | None = None,
               on_change: Callable[[], None] | None = None) -> OpPolicy:
        """The per-op policy for :func:`~deltaswap.swap.recompute.checkpoint_with_policy`.

        With ``expected`` (the op names of the profiled call, by index), the policy checks each op it is
        asked about: from the first that differs, it recomputes everything (always correct) and calls
        ``on_change`` once, so that a plan made for other ops is never applied to these."""
        decisions = self.decisions
        recompute = OpDecision.RECOMPUTE

        def decide(index: int, op: object) -> OpDecision:
            return decisions.get(index, recompute)

        if expected is None:
            return decide
        diverged: list[bool] = []

        def guarded(index: int, op: object) -> OpDecision:
            if not diverged and index < len(expected) and expected[index] == str(op):
                return decisions.get(index, recompute)
            if not diverged:
                diverged.append(True)
                if on_change is not None:
                    on_change()
            return recompute

        return guarded


@dataclass(frozen=True)
class Plan:
    """Per-block plans and what they are predicted to cost."""

    blocks: tuple[BlockPlan, ...]
    budget: int
    predicted_peak: int
    """Activation bytes on the GPU at the peak: the highest of the forward's end, the head's backward
    and the blocks' backward (gradients, returning swapped bytes, one block's recompute)."""
    predicted_ms: float
    """Forward plus backward time."""
    plain_ms: float
    """Forward plus backward time with everything kept (the reference)."""
    policy: str
    calibration: dict[str, float] = field(default_factory=dict)
    """The measured quantities the model was fitted with (bandwidth, backward ratio, offsets)."""
    timeline: tuple[tuple[float, int], ...] = ()
    """Predicted activation bytes over the step (see :attr:`Prediction.timeline`)."""
    block_names: tuple[str, ...] = ()
    """The qualified name of the block of each call (empty: unnamed)."""
    outside_bytes: int = 0
    """Activation bytes that no block holds (a CNN's stem, embeddings, the head and its logits, the
    loss): always kept, so no plan goes below them."""
    plain_bytes: int = 0
    """Activation bytes of the step with everything kept (inside and outside the blocks)."""

    @functools.cached_property
    def moves_nothing(self) -> bool:
        """Whether the plan swaps nothing: every block kept, or checkpointed with its input and stored
        op outputs on the GPU. The swap engine then has no work (its hooks would keep every tensor), and
        the blocks and torch's checkpoint run as they would without deltaswap."""
        return all(b.mode is not BlockMode.SWAP and not b.swap_input
                   and all(d is not OpDecision.SWAP for d in b.decisions.values())
                   for b in self.blocks)

    @property
    def outside_share(self) -> float:
        """The fraction of the step's activations (everything kept) that no block holds."""
        return self.outside_bytes / self.plain_bytes if self.plain_bytes else 0.0

    @property
    def recompute_ops(self) -> int:
        """Ops the backward pass runs again, over all blocks."""
        return sum(b.recompute_ops for b in self.blocks)

    @property
    def recompute_ms(self) -> float:
        """Predicted time of those ops."""
        return sum(b.recompute_ms for b in self.blocks)

    def __str__(self) -> str:
        names = self.block_names if len(self.block_names) == len(self.blocks) else ()
        width = max((len(n) for n in names), default=0)
        head = f"{'block':>5}  {'name':<{width}}  {'mode':<10}{'kept':>12}{'swapped':>12}{'recompute ms':>14}"
        if not names:
            head = f"{'block':>5}  {'mode':<10}{'kept':>12}{'swapped':>12}{'recompute ms':>14}"
        rows = [head, "-" * len(head)]
        for i, b in enumerate(self.blocks):
            mode = b.mode.value + ("+in" if b.swap_input else "")
            name = f"{names[i]:<{width}}  " if names else ""
            rows.append(f"{i:>5}  {name}{mode:<10}{format_bytes(b.kept_bytes):>12}"
                        f"{format_bytes(b.swapped_bytes):>12}{b.recompute_ms:>14.2f}")
        kept = sum(b.kept_bytes for b in self.blocks)
        swapped = sum(b.swapped_bytes for b in self.blocks)
        rows.append("-" * len(head))
        rows.append(f"{'total':>5}  {'':<10}{format_bytes(kept):>12}{format_bytes(swapped):>12}"
                    f"{sum(b.recompute_ms for b in self.blocks):>14.2f}")
        rows.append(f"policy {self.policy}; budget {format_budget(self.budget)}; predicted peak "
                    f"{format_bytes(self.predicted_peak)}; predicted step {self.predicted_ms:.1f} ms "
                    f"({self.predicted_ms / max(self.plain_ms, 1e-9):.3f} x keeping everything)")
        margin = int(self.calibration.get("peak_margin", 0))
        if margin:
            rows.append(f"the predicted peak includes {'+' if margin > 0 else '-'}"
                        f"{format_bytes(abs(margin))} measured in a step that ran a plan")
        if self.plain_bytes:
            rows.append(f"outside the blocks (always kept): {format_bytes(self.outside_bytes)}, "
                        f"{100 * self.outside_share:.0f}% of the {format_bytes(self.plain_bytes)} of "
                        f"activations with everything kept")
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
    """Prefetch look-ahead in bytes of backward progress (used when ``lookahead_fraction`` is None)."""
    lookahead_fraction: float | None = None
    """The engine's look-ahead as a fraction of the bytes it sees in a step: those depend on the plan
    (a checkpointed block passes only its input and stored outputs through the engine)."""
    backward_ratio: float = BACKWARD_RATIO
    peak_offset: int = 0
    """Added to the peak of the blocks' backward: what the profiling step measured there minus what the
    model predicts for its plan (temporaries the model does not see), after each call's own
    :attr:`BlockCost.peak_offset` (then it is about 0)."""
    peak_margin: int = 0
    """Added to every predicted peak: what the activation peak measured in a step that ran a plan came to
    above (or below: for ``auto`` by at most :data:`~deltaswap.swap.calibration.MARGIN_DOWN`) the
    model's prediction for that plan (see :func:`~deltaswap.swap.calibration.peak_margin`). Not in
    :attr:`Prediction.timeline`, which stays the model's own."""
    other_grad_bytes: int = 0
    """Gradients of the parameters outside the blocks (embeddings, head), allocated first in backward."""
    head_transient: int = 0
    """Bytes the backward of what follows the blocks (the head and loss: logits' gradient) holds on top
    of the forward's activations; measured in the profiling step."""
    other_backward_ms: float | None = None
    """Backward time outside the blocks, measured; ``None``: ``backward_ratio`` x ``other_ms``."""
    peak_copy_rate: float = PEAK_COPY_RATE
    """The fraction of the measured device->host rate at which the forward's copies are assumed to run
    when predicting the peak (not the time)."""
    host: HostCost = NO_HOST_COST
    """Measured host time per op: when it sets the pace of blocks that store some outputs."""
    plain_calls: tuple[int, ...] = (0,)
    """The block calls the profiling step ran plainly (the first of each kind; see
    :mod:`~deltaswap.swap.blockprofile`); it checkpointed the others."""
    block_names: tuple[str, ...] = ()
    """The qualified name of the block of each call, for people (empty: unnamed)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.peak_copy_rate <= 1.0:
            raise ValueError(f"peak_copy_rate={self.peak_copy_rate} must be in (0, 1]: the fraction of the "
                             f"measured device->host rate the peak assumes")

    def scaled(self, factor: float) -> Workload:
        """The same step with every measured op time (and the time outside blocks) times ``factor``."""
        blocks = tuple(b.scaled(factor) for b in self.blocks)
        return replace(self, blocks=blocks, other_ms=self.other_ms * factor)


# -- the options of one block -----------------------------------------------------------------------
def keep_block(cost: BlockCost) -> BlockPlan:
    """Run the block plainly and keep what it saves."""
    return BlockPlan(BlockMode.KEEP, kept_bytes=cost.saved_bytes)


def swap_block(cost: BlockCost) -> BlockPlan:
    """Run the block plainly and swap what it saves."""
    return BlockPlan(BlockMode.SWAP, swapped_bytes=cost.saved_bytes)


def checkpoint_block(cost: BlockCost, stored: dict[int, OpDecision], swap_input: bool = False) -> BlockPlan:
    """A checkpointed block that stores the ops in ``stored`` and recomputes the rest."""
    by_index = {op.index: op for op in cost.ops}
    kept = sum(by_index[i].out_bytes for i, d in stored.items() if d is OpDecision.KEEP)
    swapped = sum(by_index[i].out_bytes for i, d in stored.items() if d is OpDecision.SWAP)
    recomputed = [op for op in cost.ops if op.index not in stored]
    if swap_input:
        swapped += cost.input_bytes
    else:
        kept += cost.input_bytes
    return BlockPlan(BlockMode.CHECKPOINT, dict(stored), swap_input, kept, swapped,
                     sum(op.ms for op in recomputed), len(recomputed))


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
def block_forward_ms(work: Workload, cost: BlockCost, plan: BlockPlan) -> float:
    """One block's forward time under ``plan``: its ops' GPU time, or, for a checkpointed block that
    stores some outputs (every op through the recording mode), the host's time to issue them if longer."""
    if not plan.per_op:
        return cost.forward_ms
    return max(cost.forward_ms, len(cost.ops) * (work.host.launch_ms + work.host.record_ms))


def block_backward_ms(work: Workload, cost: BlockCost, plan: BlockPlan) -> float:
    """One block's backward time under ``plan``, its recompute included; for a checkpointed block that
    stores some outputs (its recompute through the replaying mode), the host's time if longer."""
    gpu = cost.forward_ms * work.backward_ratio + plan.recompute_ms
    if not plan.per_op:
        return gpu
    host = work.host
    return max(gpu, len(cost.ops) * (host.launch_ms * (1 + work.backward_ratio) + host.replay_ms))


def block_ms(work: Workload, cost: BlockCost, plan: BlockPlan) -> float:
    """Forward plus backward time of one block under ``plan``, copies aside: what the planner's moves
    between a block's variants are judged by."""
    return block_forward_ms(work, cost, plan) + block_backward_ms(work, cost, plan)


@dataclass(frozen=True)
class Prediction:
    peak: int
    """Activation bytes at the peak (forward end, or later in the backward)."""
    ms: float
    """Forward plus backward time."""
    stall_ms: float
    """Of ``ms``: time the backward waits for host-to-device copies."""
    forward_ms: float
    forward_end_bytes: int = 0
    """Activation bytes held when the forward pass ends."""
    blocks_peak: int = 0
    """Peak during the blocks' backward, with each call's :attr:`BlockCost.peak_offset` and before
    :attr:`Workload.peak_offset`."""
    block_peaks: tuple[int, ...] = ()
    """The model's own activation bytes at each block call's backward, in call order, before any
    offset: what :func:`~deltaswap.swap.calibration.calibrate` fits each call's offset against."""
    timeline: tuple[tuple[float, int], ...] = ()
    """``(ms since the step began, activation bytes)`` at each block's end in the forward, the forward's
    end, the head's backward, each block's start in the backward and the backward's end (then only the
    gradients remain)."""


def shared_with_previous(previous: tuple[BlockCost, BlockPlan] | None, cost: BlockCost,
                         plan: BlockPlan) -> int:
    """Bytes that block call ``cost`` (run as ``plan``) counts as held and the call before it
    (``previous``) counts too: the storage between them, the earlier block's output, which a kept
    earlier block holds (when it saves its output) and the later one holds again as its kept input
    (checkpointed) or saves again (kept, when it saves its input). Counted once."""
    if previous is None or not cost.chained or previous[1].mode is not BlockMode.KEEP:
        return 0  # a checkpointed earlier block holds its own input only; a swapped one moves its bytes
    if plan.mode is BlockMode.CHECKPOINT and not plan.swap_input:
        return cost.chained
    if plan.mode is BlockMode.KEEP:
        return cost.chained_saved
    return 0


def held_bytes(work: Workload, plans: Sequence[BlockPlan]) -> list[int]:
    """What each block call adds to the activations held: its kept bytes, less what it shares with the
    call before it (:func:`shared_with_previous`) and less the inputs an earlier call already keeps
    or saves (the same mask or bias given to every block)."""
    out, previous = [], None
    held: set[int] = set()  # input storages some earlier call keeps (checkpointed) or saves (kept)
    for cost, plan in zip(work.blocks, plans, strict=True):
        shared = shared_with_previous(previous, cost, plan)
        if plan.mode is BlockMode.CHECKPOINT and not plan.swap_input:
            shared += sum(n for sid, n in cost.input_storages if sid in held)
            held.update(sid for sid, _ in cost.input_storages)
        elif plan.mode is BlockMode.KEEP:
            shared += sum(n for sid, n in cost.saved_inputs if sid in held)
            held.update(sid for sid, _ in cost.saved_inputs)
        out.append(max(0, plan.kept_bytes - shared))
        previous = (cost, plan)
    return out


def simulate(work: Workload, plans: Sequence[BlockPlan]) -> Prediction:
    """Peak activation memory and forward+backward time of ``plans`` (see the module docstring)."""
    d2h_rate = max(work.bandwidth.d2h_gbps, 1e-9) * 1e6  # bytes per ms
    h2d_rate = max(work.bandwidth.h2d_gbps, 1e-9) * 1e6
    blocks = list(zip(work.blocks, plans, strict=True))
    # forward: each block's swapped bytes join the D2H queue when the block ends
    t, queue_free, slow_free = work.other_ms / 2, 0.0, 0.0
    copy_end, slow_start, slow_end = [], [], []
    slowdown = work.bandwidth.copy_slowdown
    slow_rate = d2h_rate * work.peak_copy_rate
    forward_times = []
    for cost, plan in blocks:
        # kernels run slower beside the copies
        t += block_forward_ms(work, cost, plan) + slowdown * plan.swapped_bytes / d2h_rate
        forward_times.append(t)
        queue_free = max(t, queue_free) + plan.swapped_bytes / d2h_rate
        copy_end.append(queue_free)
        slow_start.append(max(t, slow_free))  # the same queue at the rate the peak assumes
        slow_free = slow_start[-1] + plan.swapped_bytes / slow_rate
        slow_end.append(slow_free)
    forward_end = t + work.other_ms / 2

    def in_flight(j: int, when: float) -> float:
        """Bytes of block ``j``'s swap still on the GPU at time ``when`` (their copy not yet done), with
        the copies at ``peak_copy_rate`` of the measured rate."""
        return min(plans[j].swapped_bytes, max(0.0, (slow_end[j] - max(slow_start[j], when)) * slow_rate))

    # activation bytes held after each block's forward: the kept bytes so far and the swaps still being
    # copied (copies finish in queue order, so those form a run of the latest swapped blocks)
    timeline: list[tuple[float, float]] = [(0.0, 0.0)]
    kept, copying = 0.0, collections.deque[int]()
    held = held_bytes(work, plans)
    for k, when in enumerate(forward_times):
        kept += held[k]
        if plans[k].swapped_bytes:
            copying.append(k)
        while copying and slow_end[copying[0]] <= when:
            copying.popleft()
        timeline.append((when, work.other_bytes / 2 + kept + sum(in_flight(j, when) for j in copying)))
    while copying and slow_end[copying[0]] <= forward_end:
        copying.popleft()
    forward_end_bytes = int(work.other_bytes + kept + sum(in_flight(j, forward_end) for j in copying))
    timeline.append((forward_end, forward_end_bytes))
    # backward, timing: blocks in reverse. A swapped block's bytes are issued when the backward's progress
    # (bytes of saved tensors consumed, the head's first) is within `lookahead` of them, and must land
    # about when the block needs them (halfway through its backward, on average).
    sizes = [plan.kept_bytes + plan.swapped_bytes for plan in plans]
    lookahead = work.lookahead
    if work.lookahead_fraction is not None:
        lookahead = max(1, int(work.lookahead_fraction * (work.other_bytes + sum(sizes))))
    other_backward = (work.other_ms * work.backward_ratio if work.other_backward_ms is None
                      else work.other_backward_ms)
    t = forward_end + other_backward
    h2d_free, stall = 0.0, 0.0
    consumed = head_consumed = work.other_bytes // 2
    early = 0  # swapped bytes whose copy back starts in the head's backward: back at the head's peak
    issued: dict[int, float] = {}
    started: dict[int, float] = {}
    reached: list[tuple[int, float]] = []  # (bytes consumed when a block started, its start time)
    for k in range(len(plans) - 1, -1, -1):
        cost, plan = blocks[k]
        if plan.swapped_bytes:
            due = consumed - lookahead
            if due < head_consumed:  # what is still being copied out is counted at the forward's end
                early += int(plan.swapped_bytes - in_flight(k, forward_end))
            issued[k] = next((when for at, when in reached if at >= due), t)
            h2d_free = max(issued[k], copy_end[k], h2d_free) + plan.swapped_bytes / h2d_rate
            # tensors come back in the order the block uses them: on average each is needed halfway in
            deadline = t + cost.forward_ms * work.backward_ratio / 2
            if h2d_free > deadline:
                stall += h2d_free - deadline
                t += h2d_free - deadline
        reached.append((consumed, t))
        started[k] = t
        t += block_backward_ms(work, cost, plan) + slowdown * plan.swapped_bytes / h2d_rate
        consumed += sizes[k]
    # backward, memory, at each block's start: the blocks not yet done, swapped bytes already back,
    # the block's own recompute, and the gradients allocated so far
    head_peak = forward_end_bytes + work.head_transient + early
    timeline.append((forward_end, head_peak))
    kept_below, blocks_peak = 0, 0
    block_peaks = []
    grads_above = work.other_grad_bytes + sum(c.grad_bytes for c in work.blocks)
    for k in range(len(plans)):
        cost, plan = blocks[k]
        kept_below += held[k]
        back = sum(plans[j].swapped_bytes for j, when in issued.items() if j <= k and when <= started[k])
        # its recompute saves again what it saves plainly, less what it holds: its input and stored outputs,
        # kept or (swapped) back by now
        transient = (max(0, cost.saved_bytes - plan.kept_bytes - plan.swapped_bytes)
                     if plan.mode is BlockMode.CHECKPOINT else 0)
        now = work.other_bytes + kept_below + back + transient + grads_above
        block_peaks.append(int(now))
        blocks_peak = max(blocks_peak, now + cost.peak_offset)
        timeline.append((started[k], now + cost.peak_offset + work.peak_offset))
        grads_above -= cost.grad_bytes
    # in the forward pass, swapped bytes whose copy has not finished still occupy the GPU
    forward_peak = max((b for _, b in timeline), default=0.0)
    peak = max(forward_peak, head_peak, blocks_peak + work.peak_offset) + work.peak_margin
    timeline.append((t, work.other_grad_bytes + sum(c.grad_bytes for c in work.blocks)))
    return Prediction(peak=int(peak), ms=t, stall_ms=stall, forward_ms=forward_end,
                      forward_end_bytes=forward_end_bytes, blocks_peak=int(blocks_peak),
                      block_peaks=tuple(block_peaks),
                      timeline=tuple(sorted((ms, int(b)) for ms, b in timeline)))


def profiling_plans(work: Workload) -> list[BlockPlan]:
    """The plan the profiling step runs: the first call of each kind of block plainly
    (:attr:`Workload.plain_calls`), every other call checkpointed with everything recomputed and its
    input kept."""
    plain = set(work.plain_calls)
    return [keep_block(c) if k in plain else checkpoint_block(c, {}) for k, c in enumerate(work.blocks)]


# -- policies -----------------------------------------------------------------------------------------
def _finish(work: Workload, plans: list[BlockPlan], budget: int, policy: str) -> Plan:
    pred = simulate(work, plans)
    plain = simulate(work, [keep_block(c) for c in work.blocks])
    calibration = {
        "d2h_gbps": work.bandwidth.d2h_gbps, "h2d_gbps": work.bandwidth.h2d_gbps,
        "copy_slowdown": work.bandwidth.copy_slowdown,
        "backward_ratio": work.backward_ratio, "other_ms": work.other_ms,
        "other_backward_ms": -1.0 if work.other_backward_ms is None else work.other_backward_ms,
        "other_bytes": float(work.other_bytes), "head_transient": float(work.head_transient),
        "peak_offset": float(work.peak_offset), "peak_margin": float(work.peak_margin),
        "block_forward_ms": sum(b.forward_ms for b in work.blocks),
        "host_launch_ms": work.host.launch_ms, "host_record_ms": work.host.record_ms,
        "host_replay_ms": work.host.replay_ms,
    }
    plain_bytes = work.other_bytes + sum(c.saved_bytes for c in work.blocks)
    return Plan(tuple(plans), budget, pred.peak, pred.ms, plain.ms, policy, calibration, pred.timeline,
                work.block_names, work.other_bytes, plain_bytes)


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


def plan_manual(work: Workload, plans: Sequence[BlockPlan], budget: int) -> Plan:
    """A hand-made plan (one :class:`BlockPlan` per block call), with its predicted peak and time.

    Raises:
        ValueError: if ``plans`` does not have one entry per block call of ``work``.
    """
    if len(plans) != len(work.blocks):
        raise ValueError(f"a plan needs one BlockPlan per block call: got {len(plans)} for "
                         f"{len(work.blocks)} block calls")
    return _finish(work, list(plans), budget, "manual")


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


STALL_TOLERANCE_MS = 0.5
"""Plans that swap more leading blocks are tried while the predicted backward stall stays under this."""
SWAP_MARGIN = 0.03
"""How much faster, as a fraction of the step, ``auto``'s best plan that swaps must be predicted than
its best plan that fits without swapping, to be taken over it. A swap's cost is predicted less surely
than a recompute's: on one H200 swap plans measured 1-16% over their predicted step (GPT-2 large,
bf16, batch 16; more under FSDP), recompute-only plans within 1%."""


def plan_auto(work: Workload, budget: int, *, swap: bool = True) -> Plan:
    """The cheapest mix found for ``budget`` (see the module docstring): for each number of leading
    blocks to swap (as many as the backward need not wait for, down to none), checkpoint the rest
    greedily until the peak fits, then trade swapped inputs for stored outputs; the fastest plan that
    fits wins, or else the one with the smallest peak. ``swap=False``: keep and recompute only."""
    keep = [keep_block(c) for c in work.blocks]
    pred = simulate(work, keep)
    if pred.peak <= budget:
        return _finish(work, keep, budget, "auto")
    hidden = 0  # how many leading blocks can be swapped before the backward waits for their copies
    for k in range(len(keep) if swap else 0):
        trial = [swap_block(c) for c in work.blocks[: k + 1]] + keep[k + 1 :]
        if simulate(work, trial).stall_ms > STALL_TOLERANCE_MS:
            break
        hidden = k + 1
    fronts = _Frontiers(work)
    best: tuple[bool, float, float, list[BlockPlan]] | None = None
    for n_swap in range(hidden, -1, -1):
        plans = [swap_block(c) for c in work.blocks[:n_swap]] + keep[n_swap:]
        plans, pred = _checkpoint_until_fits(work, plans, budget, fronts, swap_inputs=swap)
        if pred.peak <= budget and swap:
            plans, pred = _swap_inputs_and_relax(work, plans, pred, budget, fronts)
        fits = pred.peak <= budget
        candidate = (not fits, pred.ms if fits else float(pred.peak), pred.ms, plans)
        if best is None or candidate[:3] < best[:3]:  # of equal peaks that do not fit, the faster
            best = candidate
    assert best is not None
    plans = best[3]
    if swap and not best[0] and any(p.swapped_bytes for p in plans):
        local, local_pred = _checkpoint_until_fits(work, list(keep), budget, fronts, swap_inputs=False)
        if local_pred.peak <= budget and local_pred.ms * (1 - SWAP_MARGIN) <= best[1]:
            plans = local  # the swaps would gain too little for how surely their cost is known
    return _finish(work, plans, budget, "auto")


class _Frontiers:
    """Every block's checkpointed variants (:func:`frontier`), computed once per planning call."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self._fronts: dict[int, list[BlockPlan]] = {}

    def of(self, k: int) -> list[BlockPlan]:
        front = self._fronts.get(k)
        if front is None:
            front = self._fronts[k] = frontier(self.work.blocks[k], self.work.min_bytes)
        return front

    def at(self, k: int, j: int, swap_input: bool) -> BlockPlan:
        """Variant ``j`` of block ``k``, with its input swapped or kept."""
        plan = self.of(k)[j]
        return _input_swapped(plan, self.work.blocks[k]) if swap_input else plan

    def position(self, k: int, plan: BlockPlan) -> int | None:
        """Where ``plan`` (a checkpointed plan of block ``k``) sits on its frontier, if it does."""
        front = self.of(k)
        j = len(front) - 1 - len(plan.decisions)  # variant j stores len(front) - 1 - j outputs
        return j if 0 <= j < len(front) and front[j].decisions == plan.decisions else None


def _input_swapped(plan: BlockPlan, cost: BlockCost) -> BlockPlan:
    """``plan`` (checkpointed, input kept) with its input swapped instead."""
    return replace(plan, swap_input=True, kept_bytes=plan.kept_bytes - cost.input_bytes,
                   swapped_bytes=plan.swapped_bytes + cost.input_bytes)


def _checkpoint_until_fits(
    work: Workload, plans: list[BlockPlan], budget: int, fronts: _Frontiers, *, swap_inputs: bool = True
) -> tuple[list[BlockPlan], Prediction]:
    """Checkpoint the kept blocks along their frontiers, always taking the move that frees memory for
    the least block time per byte (:func:`block_ms`, judged locally; the plan is simulated again once
    the moves have freed as many bytes as the peak is over); if that is not enough, swap the
    checkpointed blocks' inputs, earliest first."""
    plans = list(plans)
    pred = simulate(work, plans)

    def cheapest(k: int, after: int) -> tuple[float, int, int] | None:
        current, front, cost = plans[k], fronts.of(k), work.blocks[k]
        now = block_ms(work, cost, current)
        best = None
        for j in range(after + 1, len(front)):
            freed = current.kept_bytes - front[j].kept_bytes
            if freed > 0:
                score = (block_ms(work, cost, front[j]) - now) / freed
                if best is None or score < best[0]:
                    best = (score, k, j)
        return best

    moves = {k: cheapest(k, -1) for k in range(len(plans)) if plans[k].mode is BlockMode.KEEP}
    while pred.peak > budget:
        need, freed = pred.peak - budget, 0
        while freed < need:
            move = min((m for m in moves.values() if m is not None), default=None)
            if move is None:
                break
            _, k, j = move
            freed += plans[k].kept_bytes - fronts.of(k)[j].kept_bytes
            plans[k] = fronts.of(k)[j]
            moves[k] = cheapest(k, j)
        if not freed:
            break
        pred = simulate(work, plans)
    for k in range(len(plans) if swap_inputs else 0):
        if pred.peak <= budget:
            break
        if plans[k].mode is BlockMode.CHECKPOINT and not plans[k].swap_input:
            trial = [*plans[:k], _input_swapped(plans[k], work.blocks[k]), *plans[k + 1 :]]
            trial_pred = simulate(work, trial)
            if trial_pred.peak < pred.peak:
                plans, pred = trial, trial_pred
    return plans, pred


def _swap_inputs_and_relax(
    work: Workload, plans: list[BlockPlan], pred: Prediction, budget: int, fronts: _Frontiers
) -> tuple[list[BlockPlan], Prediction]:
    """Spend PCIe to buy back recompute: swap the inputs of the first ``m`` checkpointed blocks (``m`` =
    1, 2, 4, ... all), then let the checkpointed blocks store more (:func:`_relax`) in the memory that
    frees; the fastest of these and ``plans`` wins."""
    checkpointed = [k for k, p in enumerate(plans) if p.mode is BlockMode.CHECKPOINT and not p.swap_input]
    best = (plans, pred)
    m = 1
    while checkpointed and m <= len(checkpointed):
        trial = list(plans)
        for k in checkpointed[:m]:
            trial[k] = _input_swapped(trial[k], work.blocks[k])
        trial, trial_pred = _relax(work, trial, budget, fronts)
        if trial_pred.peak <= budget and trial_pred.ms < best[1].ms:
            best = (trial, trial_pred)
        m = len(checkpointed) if m < len(checkpointed) <= 2 * m else 2 * m
    return best


def _relax(
    work: Workload, plans: list[BlockPlan], budget: int, fronts: _Frontiers
) -> tuple[list[BlockPlan], Prediction]:
    """Move checkpointed blocks back up their frontiers (store more, recompute less) while the peak
    fits, always taking the move that saves the most block time (:func:`block_ms`) per byte it adds.
    Moves are taken while the bytes they add fit the room under the budget, then the plan is simulated
    again; when it does not fit, the longest run of those moves that does is kept and the next move is
    ruled out."""
    plans = list(plans)
    pred = simulate(work, plans)
    position = {k: j for k, p in enumerate(plans)
                if p.mode is BlockMode.CHECKPOINT and (j := fronts.position(k, p)) is not None}
    rejected: set[tuple[int, int]] = set()

    def richest(k: int, room: float) -> tuple[float, int, int, int] | None:
        """Block ``k``'s best move within ``room``: (score, -k, j, bytes added)."""
        front, cost = fronts.of(k), work.blocks[k]
        kept, now = front[position[k]].kept_bytes, block_ms(work, cost, front[position[k]])
        best = None
        for j in range(position[k] - 1, -1, -1):
            if (k, j) in rejected:
                continue
            added = front[j].kept_bytes - kept
            saved = now - block_ms(work, cost, front[j])
            if saved <= 0 or added > room:
                continue
            score = saved / max(added, 1)
            if best is None or score > best[0]:
                best = (score, -k, j, added)
        return best

    while True:
        room = float(budget - pred.peak)
        moves = {k: richest(k, room) for k in position}
        batch: list[tuple[int, int, BlockPlan, int]] = []  # (block, variant, plan before, position before)
        while True:
            move = max((m for m in moves.values() if m is not None), default=None)
            if move is None:
                break
            _, minus_k, j, added = move
            k = -minus_k
            batch.append((k, j, plans[k], position[k]))
            plans[k], position[k] = fronts.at(k, j, plans[k].swap_input), j
            room -= added
            moves = {i: (m if m is not None and m[3] <= room and i != k else richest(i, room))
                     for i, m in moves.items()}
        if not batch:
            return plans, pred
        trial_pred = simulate(work, plans)
        if trial_pred.peak <= budget:
            pred = trial_pred
            continue
        # the batch went over: keep its longest fitting prefix (bisection), rule out the move after it
        for k, _, before, at in reversed(batch):
            plans[k], position[k] = before, at
        low, high = 0, len(batch) - 1  # a prefix of `low` moves fits (none is the current plan)
        while low < high:
            mid = (low + high + 1) // 2
            trial = list(plans)
            for k, j, before, _ in batch[:mid]:
                trial[k] = fronts.at(k, j, before.swap_input)
            if simulate(work, trial).peak <= budget:
                low = mid
            else:
                high = mid - 1
        for k, j, before, _ in batch[:low]:
            plans[k], position[k] = fronts.at(k, j, before.swap_input), j
        pred = simulate(work, plans)
        k, j, _, _ = batch[low]
        rejected.add((k, j))


UNMEASURED_SPEED = 0.25
"""Before a planned step has measured the forward pass, it may run this much faster than profiled."""


def plan_first(work: Workload, budget: int) -> Plan:
    """``auto``'s plan for the first step after profiling, before any step has measured how fast the
    forward pass really runs.

    The profiling step times every op, and with every block in the dispatch modes it runs slower than
    the plan will: a forward measured too slow makes a swap look hidden when its copy would still be in
    flight (on the GPU) when the forward ends. So this plan recomputes rather than swaps; only if
    nothing fits without swapping does it swap, as if the forward ran :data:`UNMEASURED_SPEED` times its
    profiled time. The step that runs it measures the forward, and :func:`plan_auto` takes over.
    """
    plan = plan_auto(work, budget, swap=False)
    if plan.predicted_peak <= budget:
        return plan
    guarded = plan_auto(work.scaled(UNMEASURED_SPEED), budget)
    return _finish(work, list(guarded.blocks), budget, "auto")


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
    "block_backward_ms",
    "block_forward_ms",
    "block_ms",
    "checkpoint_block",
    "delta_block",
    "frontier",
    "keep_block",
    "make_plan",
    "plan_first",
    "plan_manual",
    "profiling_plans",
    "simulate",
    "swap_block",
]
