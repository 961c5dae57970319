"""The planner on synthetic measured costs: fits the budget, spends PCIe where it hides, prefers
recomputing cheap ops, predicts memory and time consistently."""

from __future__ import annotations

import dataclasses

import pytest

from deltaswap.swap.hostcost import HostCost
from deltaswap.swap.planner import (
    BlockMode,
    BlockPlan,
    Plan,
    Workload,
    block_backward_ms,
    block_forward_ms,
    checkpoint_block,
    delta_block,
    frontier,
    keep_block,
    make_plan,
    plan_auto,
    plan_first,
    plan_manual,
    simulate,
    swap_block,
)
from deltaswap.swap.profile import Bandwidth
from deltaswap.swap.recompute import OpDecision

from helpers import MB
from helpers import synthetic_block as block
from helpers import synthetic_workload as workload


def test_keep_predicts_the_plain_peak_and_time() -> None:
    work = workload()
    plan = make_plan(work, "keep", budget=1)
    assert plan.predicted_peak == 100 * MB + 16 * 300 * MB
    assert plan.predicted_ms == pytest.approx(plan.plain_ms)
    assert plan.predicted_ms == pytest.approx(2.0 * 3 + 16 * 2.4 * 3)  # forward + 2x backward


def test_auto_keeps_everything_when_it_fits() -> None:
    work = workload()
    plan = make_plan(work, "auto", budget=10**12)
    assert all(b.mode is BlockMode.KEEP for b in plan.blocks)


@pytest.mark.parametrize("budget_mb", [4500, 3500, 2500, 1500, 1200])
def test_auto_fits_the_budget_and_costs_more_as_it_shrinks(budget_mb: int) -> None:
    work = workload()
    plan = make_plan(work, "auto", budget=budget_mb * MB)
    assert plan.predicted_peak <= budget_mb * MB
    looser = make_plan(work, "auto", budget=(budget_mb + 500) * MB)
    assert plan.predicted_ms >= looser.predicted_ms - 1e-9
    assert plan.predicted_ms <= make_plan(work, "recompute", budget=0).predicted_ms + 1e-9


def test_auto_swaps_early_blocks_when_pcie_hides_and_recomputes_when_it_is_slow() -> None:
    # at 3000 MB recomputing alone costs 6% (128.6 against 121.2 ms): swapping clearly pays
    fast = make_plan(workload(gbps=500.0), "auto", budget=3000 * MB)
    assert fast.blocks[0].mode is BlockMode.SWAP
    assert fast.predicted_ms <= fast.plain_ms * 1.01
    slow = make_plan(workload(gbps=0.5), "auto", budget=3000 * MB)
    assert all(b.mode is not BlockMode.SWAP for b in slow.blocks)
    assert any(b.mode is BlockMode.CHECKPOINT for b in slow.blocks)


def test_auto_does_not_swap_for_a_gain_under_the_swap_margin() -> None:
    """At 4000 MB, swapping would save 2.6% of the step over recomputing alone (121.2 against 124.4 ms
    predicted), under SWAP_MARGIN: a swap's cost is predicted less surely, so auto recomputes; where
    the gain is larger (3000 MB, above) it swaps."""
    from deltaswap.swap.planner import SWAP_MARGIN

    work = workload(gbps=500.0)
    budget = 4000 * MB
    plan = make_plan(work, "auto", budget=budget)
    local = plan_auto(work, budget, swap=False)
    assert all(b.swapped_bytes == 0 for b in plan.blocks)
    assert plan.predicted_peak <= budget
    assert plan.predicted_ms == pytest.approx(local.predicted_ms)
    assert plan.predicted_ms > plan.plain_ms  # a swap plan at plain's speed was there to take
    assert plan.predicted_ms * (1 - SWAP_MARGIN) <= plan.plain_ms


def test_frontier_stores_compute_heavy_outputs_first() -> None:
    plans = frontier(block(), min_bytes=MB)
    assert plans[0].kept_bytes > plans[-1].kept_bytes
    assert plans[-1].decisions == {} and plans[-1].recompute_ms == pytest.approx(2.4)
    one = plans[-2]  # a single stored output: the one with the most compute per byte
    assert one.decisions == {5: OpDecision.KEEP}
    assert [p.recompute_ms for p in plans] == sorted(p.recompute_ms for p in plans)


def test_swapped_bytes_still_being_copied_count_at_the_peak() -> None:
    work = workload(gbps=1.0)  # 1 MB per ms: a block's 300 MB take 300 ms, far longer than the forward
    plans = [swap_block(work.blocks[0])] + [keep_block(c) for c in work.blocks[1:]]
    pred = simulate(work, plans)
    kept_only = 100 * MB + 15 * 300 * MB
    assert kept_only < pred.peak <= kept_only + 300 * MB
    assert pred.stall_ms > 0


def test_swapped_bytes_whose_copy_back_starts_in_the_heads_backward_count_at_its_peak() -> None:
    """The engine starts copying a swapped tensor back once the backward's progress is within the
    look-ahead of it: for the last blocks that happens while the head's backward (logits' gradient)
    still runs, so a swapped input of the last block frees nothing at the head's peak (measured on
    GPT-2: a plan predicted 48 MiB under torch's checkpointing measured its peak)."""
    work = dataclasses.replace(workload(), head_transient=2000 * MB)  # the head's backward sets the peak
    recompute = [checkpoint_block(c, {}) for c in work.blocks]
    base = simulate(work, recompute)
    assert base.peak == base.forward_end_bytes + work.head_transient
    last = [*recompute[:-1], checkpoint_block(work.blocks[-1], {}, swap_input=True)]
    first = [checkpoint_block(work.blocks[0], {}, swap_input=True), *recompute[1:]]
    assert simulate(work, last).peak == base.peak  # its copy back starts in the head's backward
    assert simulate(work, first).peak == base.peak  # all 16 inputs lie within the 1200 MB look-ahead
    short = dataclasses.replace(work, lookahead=MB)
    assert simulate(short, last).peak == base.peak  # the last block's, whatever the look-ahead
    assert simulate(short, first).peak == base.peak - work.blocks[0].input_bytes  # on the host then


def test_delta_rule_swaps_when_the_copy_is_cheap_and_recomputes_when_not() -> None:
    fast = delta_block(block(), Bandwidth(1000.0, 1000.0, 1800.0), min_bytes=MB)
    assert fast.decisions.get(2) is OpDecision.SWAP  # 100 MB at 1 TB/s: 0.1 ms x 2 <= 1 ms
    slow = delta_block(block(), Bandwidth(10.0, 10.0, 18.0), min_bytes=MB)
    assert slow.decisions == {}


def test_the_plan_prints_a_table_with_totals() -> None:
    text = str(make_plan(workload(), "auto", budget=2500 * MB))
    assert "block" in text and "total" in text and "predicted peak" in text and "policy auto" in text


def test_an_impossible_budget_returns_the_smallest_plan_it_found() -> None:
    work = workload()
    plan = make_plan(work, "auto", budget=100 * MB)
    assert plan.predicted_peak > 100 * MB
    assert plan.predicted_peak <= make_plan(work, "recompute", budget=0).predicted_peak


def test_a_fractional_lookahead_follows_the_bytes_the_plan_passes_through_the_engine() -> None:
    """With checkpointed blocks the engine sees few bytes, so a fractional look-ahead is short and the
    swapped bytes come back late: later than a look-ahead sized from keeping everything suggests."""
    base = workload(gbps=5.0)
    plans = [swap_block(base.blocks[0])] + [frontier(c, MB)[-1] for c in base.blocks[1:]]
    absolute = simulate(base, plans)  # 1200 MB of look-ahead
    fraction = simulate(dataclasses.replace(base, lookahead_fraction=0.25), plans)
    assert fraction.stall_ms > absolute.stall_ms


def test_copies_slow_the_kernels_beside_them_by_the_measured_fraction() -> None:
    """Each swapped byte costs ``copy_slowdown`` of its copy time in each direction, even when hidden."""
    base = workload(gbps=500.0)
    plans = [swap_block(base.blocks[0])] + [keep_block(c) for c in base.blocks[1:]]
    clean = simulate(base, plans)
    slowed = simulate(dataclasses.replace(base, bandwidth=Bandwidth(500.0, 500.0, 900.0, 0.05)), plans)
    copy_ms = 300 * MB / (500.0 * 1e6)  # one direction
    assert slowed.ms - clean.ms == pytest.approx(0.05 * 2 * copy_ms)
    assert slowed.stall_ms == clean.stall_ms == 0


def test_auto_stops_swapping_when_the_slowdown_costs_more_than_recomputing() -> None:
    """Copies that hide still slow the kernels; when that costs more than recomputing cheap ops, auto
    recomputes instead of swapping."""
    fast = workload(gbps=500.0)  # at 3000 MB swapping gains 6% over recomputing alone (SWAP_MARGIN: 3%)
    assert make_plan(fast, "auto", budget=3000 * MB).blocks[0].mode is BlockMode.SWAP
    costly = dataclasses.replace(fast, bandwidth=Bandwidth(500.0, 500.0, 900.0, copy_slowdown=5.0))
    plan = make_plan(costly, "auto", budget=3000 * MB)
    assert all(b.mode is not BlockMode.SWAP for b in plan.blocks)
    assert plan.predicted_peak <= 3000 * MB


def test_a_hand_made_plan_is_predicted_like_any_other_and_must_cover_every_block() -> None:
    work = workload()
    blocks = [swap_block(work.blocks[0])] + [checkpoint_block(c, {}) for c in work.blocks[1:]]
    plan = plan_manual(work, blocks, budget=2000 * MB)
    assert plan.policy == "manual" and list(plan.blocks) == blocks
    assert plan.predicted_ms == pytest.approx(simulate(work, blocks).ms)
    with pytest.raises(ValueError, match="one BlockPlan per block call"):
        plan_manual(work, blocks[1:], budget=2000 * MB)


def test_auto_swaps_checkpointed_inputs_to_buy_back_recompute_when_pcie_hides_them() -> None:
    """At a small budget, swapping the inputs of checkpointed blocks frees memory the blocks can spend
    on storing more of their outputs: faster than recomputing with every input kept."""
    fast = make_plan(dataclasses.replace(workload(gbps=50.0), lookahead=300 * MB), "auto", budget=1500 * MB)
    slow = make_plan(dataclasses.replace(workload(gbps=0.01), lookahead=300 * MB), "auto", budget=1500 * MB)
    assert fast.predicted_peak <= 1500 * MB and slow.predicted_peak <= 1500 * MB
    assert any(b.swap_input for b in fast.blocks)
    assert not any(b.swap_input or b.mode is BlockMode.SWAP for b in slow.blocks)
    assert fast.predicted_ms < slow.predicted_ms


@pytest.mark.parametrize("budget_mb", [10**6, 3500, 1500])
def test_the_predicted_timeline_reaches_the_peak_and_ends_with_the_step(budget_mb: int) -> None:
    work = dataclasses.replace(workload(gbps=5.0), head_transient=200 * MB)
    plan = make_plan(work, "auto", budget=budget_mb * MB)
    times = [ms for ms, _ in plan.timeline]
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] == pytest.approx(plan.predicted_ms)
    assert max(b for _, b in plan.timeline) == plan.predicted_peak
    checkpointed = [b for b in plan.blocks if b.mode is BlockMode.CHECKPOINT]
    assert plan.recompute_ops == sum(len(block().ops) - len(b.decisions) for b in checkpointed)


def test_the_first_plan_recomputes_rather_than_trusting_the_profiled_forward_to_hide_swaps() -> None:
    """Profiled op times run slow; the plan before any measured step swaps only if nothing fits without,
    and then as if the forward ran a quarter of its profiled time (so fewer copies look hidden)."""
    work = workload(gbps=50.0)
    trusting = make_plan(work, "auto", budget=3000 * MB)  # swapping gains more than SWAP_MARGIN here
    assert any(b.mode is BlockMode.SWAP for b in trusting.blocks)
    first = plan_first(work, budget=3000 * MB)
    assert first.predicted_peak <= 3000 * MB
    assert not any(b.mode is BlockMode.SWAP or b.swap_input for b in first.blocks)
    tight = dataclasses.replace(work, lookahead=300 * MB)  # at 1100 MB only swapped bytes fit
    assert plan_auto(tight, 1100 * MB, swap=False).predicted_peak > 1100 * MB
    guarded = plan_first(tight, budget=1100 * MB)
    assert guarded.predicted_peak <= 1100 * MB
    swapped = sum(b.swapped_bytes for b in guarded.blocks)
    assert 0 < swapped < sum(b.swapped_bytes for b in make_plan(tight, "auto", budget=1100 * MB).blocks)


@pytest.mark.parametrize("budget_mb", [800, 700])
def test_copies_still_in_flight_during_the_forward_count_at_the_peak(budget_mb: int) -> None:
    """Swapped blocks whose copies lag, then long recomputed blocks while the copies drain: the peak
    is inside the forward pass, and a plan must fit there too."""
    work = dataclasses.replace(workload(gbps=5.0).scaled(20.0), lookahead=300 * MB)
    plan = make_plan(work, "auto", budget=budget_mb * MB)
    forward_end = simulate(work, plan.blocks).forward_ms
    in_forward = max(b for ms, b in plan.timeline if ms < forward_end)
    assert in_forward <= plan.predicted_peak
    if plan.predicted_peak <= budget_mb * MB:
        assert in_forward <= budget_mb * MB


def test_the_peak_assumes_the_forwards_copies_run_at_a_fraction_of_the_measured_rate() -> None:
    """The last block's swap (300 MB at 50 GB/s: 6 ms) is copied while 2 ms of the forward remain: at
    the measured rate 200 MB are still on the GPU when the forward ends; at half that rate, 250 MB."""
    exact = dataclasses.replace(workload(gbps=50.0, n=4), other_ms=4.0, peak_copy_rate=1.0)
    plans = [keep_block(c) for c in exact.blocks[:3]] + [swap_block(exact.blocks[3])]
    kept = exact.other_bytes + 3 * 300 * MB
    assert simulate(exact, plans).forward_end_bytes == pytest.approx(kept + 200 * MB, abs=1)
    halved = dataclasses.replace(exact, peak_copy_rate=0.5)
    assert simulate(halved, plans).forward_end_bytes == pytest.approx(kept + 250 * MB, abs=1)
    assert simulate(halved, plans).ms == simulate(exact, plans).ms  # the time model is unchanged


def test_a_block_that_stores_some_outputs_runs_at_the_hosts_pace_when_the_host_is_slower() -> None:
    # 7 ops: the host issues a recorded op in 0.5 ms and a replayed one in 0.4 ms more than plainly
    host = HostCost(launch_ms=0.05, record_ms=0.5, replay_ms=0.4)
    work = dataclasses.replace(workload(n=1), host=host)
    cost = work.blocks[0]
    selective = frontier(cost, MB)[-2]  # one output stored: every op through the dispatch modes
    assert selective.decisions
    assert block_forward_ms(work, cost, selective) == pytest.approx(7 * (0.05 + 0.5))  # over 2.4 ms of GPU
    assert block_backward_ms(work, cost, selective) == pytest.approx(
        max(2.4 * 2 + selective.recompute_ms, 7 * (0.05 * 3 + 0.4)))
    for plan in (keep_block(cost), checkpoint_block(cost, {}), swap_block(cost)):  # no per-op Python
        assert block_forward_ms(work, cost, plan) == pytest.approx(2.4)
        assert block_backward_ms(work, cost, plan) == pytest.approx(2.4 * 2 + plan.recompute_ms)
    quick = dataclasses.replace(work, host=HostCost(launch_ms=0.01, record_ms=0.02, replay_ms=0.02))
    assert block_forward_ms(quick, cost, selective) == pytest.approx(2.4), "hidden behind the GPU"
    forward = simulate(work, [selective]).forward_ms
    assert forward == pytest.approx(2.0 + 7 * 0.55)  # the time outside the blocks, and the host's


def test_auto_stores_fewer_outputs_per_op_when_the_host_sets_the_pace() -> None:
    budget = 2500 * MB
    gpu_only = make_plan(workload(gbps=0.5), "auto", budget)  # PCIe too slow to swap: recompute only
    stores = [b for b in gpu_only.blocks if b.mode is BlockMode.CHECKPOINT and b.decisions]
    assert stores, "with a free host, auto stores some outputs per op"
    slow_host = dataclasses.replace(workload(gbps=0.5), host=HostCost(0.05, 0.5, 0.4))
    plan = make_plan(slow_host, "auto", budget)
    assert plan.predicted_peak <= budget
    assert sum(bool(b.decisions) for b in plan.blocks) < len(stores)
    # and it is faster, under the host's pace, than the plan that ignored it
    assert plan.predicted_ms < simulate(slow_host, gpu_only.blocks).ms


# -- what neighbouring blocks share ---------------------------------------------------------------------
def chained_workload(n: int = 4) -> Workload:
    """A chain of CNN-like blocks: each saves its 50 MB input and its 50 MB output (a ReLU at its end)
    among 300 MB, and takes the previous block's output as its input."""
    first = block()
    rest = dataclasses.replace(first, chained=50 * MB, chained_saved=50 * MB)
    return dataclasses.replace(workload(n=n), blocks=(first,) + (rest,) * (n - 1))


def test_the_storage_between_two_blocks_is_held_once() -> None:
    work = chained_workload(4)
    keep = [keep_block(c) for c in work.blocks]
    ckpt = [checkpoint_block(c, {}) for c in work.blocks]
    # kept after kept: each boundary's 50 MB is saved by both blocks, held once
    assert simulate(work, keep).forward_end_bytes == 100 * MB + 4 * 300 * MB - 3 * 50 * MB
    # checkpointed blocks hold their inputs only, which no neighbour holds too
    assert simulate(work, ckpt).forward_end_bytes == 100 * MB + 4 * 50 * MB
    # a kept block followed by a checkpointed one: its output is the other's kept input
    mixed = [keep[0], ckpt[1], keep[2], ckpt[3]]
    assert simulate(work, mixed).forward_end_bytes == 100 * MB + 2 * 300 * MB + 2 * 50 * MB - 2 * 50 * MB
    # without the chain (blocks fed from elsewhere), nothing is shared
    unchained = dataclasses.replace(work, blocks=(work.blocks[0],) * 4)
    assert simulate(unchained, keep).forward_end_bytes == 100 * MB + 4 * 300 * MB


def test_an_input_every_checkpointed_block_takes_is_held_once() -> None:
    mask = (99, 10 * MB)  # one tensor (an attention mask) given to every block
    blocks = tuple(dataclasses.replace(block(), input_bytes=60 * MB, input_storages=((k, 50 * MB), mask))
                   for k in range(3))
    work = dataclasses.replace(workload(n=3), blocks=blocks)
    ckpt = [checkpoint_block(c, {}) for c in work.blocks]
    assert simulate(work, ckpt).forward_end_bytes == 100 * MB + 3 * 50 * MB + 10 * MB
    # a kept block that does not save the mask holds none of it: the first checkpointed one keeps it
    mixed = [keep_block(work.blocks[0]), ckpt[1], ckpt[2]]
    assert simulate(work, mixed).forward_end_bytes == 100 * MB + 300 * MB + 2 * 50 * MB + 10 * MB
    # one that saves it (among its 300 MB) holds it for the checkpointed ones after it
    saver = dataclasses.replace(work.blocks[0], saved_inputs=(mask,))
    work = dataclasses.replace(work, blocks=(saver, *work.blocks[1:]))
    assert simulate(work, [keep_block(saver), ckpt[1], ckpt[2]]).forward_end_bytes == (
        100 * MB + 300 * MB + 2 * 50 * MB)


def test_a_plan_moves_nothing_only_when_no_block_input_or_op_output_is_swapped() -> None:
    def plan(*blocks: BlockPlan) -> Plan:
        return Plan(blocks=blocks, budget=0, predicted_peak=0, predicted_ms=0.0, plain_ms=0.0, policy="auto")

    keep, ckpt = BlockPlan(BlockMode.KEEP), BlockPlan(BlockMode.CHECKPOINT, {0: OpDecision.KEEP})
    assert plan(keep, ckpt).moves_nothing
    assert not plan(keep, BlockPlan(BlockMode.SWAP)).moves_nothing
    assert not plan(keep, dataclasses.replace(ckpt, swap_input=True)).moves_nothing
    assert not plan(BlockPlan(BlockMode.CHECKPOINT, {0: OpDecision.SWAP}), keep).moves_nothing
