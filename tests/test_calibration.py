"""Fitting the planner's model to measurements: the first planned step's forward rescales the op times,
within limits, and leaves them alone when the prediction was close; a measured activation peak above
the prediction raises every later prediction by the difference."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deltaswap.swap.blockprofile import BlockProfile
from deltaswap.swap.calibration import (
    MARGIN_DOWN,
    SCALE_LIMITS,
    PeakCheck,
    PeakChecks,
    calibrate,
    forward_scale,
    peak_margin,
    plan_signature,
)
from deltaswap.swap.planner import Plan, Workload, checkpoint_block, make_plan, profiling_plans, simulate

from helpers import MB
from helpers import synthetic_workload as workload


def test_a_forward_measured_slower_than_predicted_scales_the_op_times_to_match() -> None:
    work = workload()
    plan = make_plan(work, "keep", budget=1)
    predicted = simulate(work, plan.blocks).forward_ms
    scale = forward_scale(work, plan, 1.5 * predicted)
    assert scale == pytest.approx(1.5)
    fitted = calibrate(work, BlockProfile("cpu"), (0.0, 0.0), scale)
    assert simulate(fitted, plan.blocks).forward_ms == pytest.approx(1.5 * predicted, rel=0.05)


def test_a_close_prediction_or_an_extreme_one_is_bounded() -> None:
    work = workload()
    plan = make_plan(work, "keep", budget=1)
    predicted = simulate(work, plan.blocks).forward_ms
    assert forward_scale(work, plan, 1.04 * predicted) == 1.0  # within the tolerance: left alone
    fitted = calibrate(work, BlockProfile("cpu"), (0.0, 0.0), 100.0)  # clamped to the most
    ops = sum(b.forward_ms for b in work.blocks)
    assert sum(b.forward_ms for b in fitted.blocks) == pytest.approx(SCALE_LIMITS[1] * ops)


# -- the peak: a budget is a promise ---------------------------------------------------------------------
def _check(plan: Plan, measured: int) -> PeakCheck:
    return PeakCheck(key=(), plan=plan, baseline=0, measured=measured)


def test_a_peak_measured_above_the_prediction_is_added_to_every_later_prediction() -> None:
    work = workload()
    plan = make_plan(work, "recompute", budget=1)
    margin = peak_margin(None, _check(plan, plan.predicted_peak + 70 * MB))
    assert margin == 70 * MB
    corrected = make_plan(replace(work, peak_margin=margin), "recompute", budget=1)
    assert corrected.predicted_peak == plan.predicted_peak + 70 * MB
    # measured again with the margin in the prediction: the margin it was predicted with comes off
    assert peak_margin(margin, _check(corrected, corrected.predicted_peak + 10 * MB)) == 80 * MB
    assert peak_margin(margin, _check(corrected, corrected.predicted_peak - 30 * MB)) == 70 * MB  # the most


def test_a_peak_measured_below_the_prediction_lowers_it_a_little_and_only_at_first() -> None:
    work = workload()
    plan = make_plan(work, "recompute", budget=1)
    assert peak_margin(None, _check(plan, plan.predicted_peak - 1000)) == -1000
    lowest = -int(MARGIN_DOWN * plan.predicted_peak)
    assert peak_margin(None, _check(plan, plan.predicted_peak // 2)) == lowest
    assert peak_margin(0, _check(plan, plan.predicted_peak - 1000)) == 0  # a margin so far stays
    # a fixed policy runs the plan measured: the measurement is trusted whole
    assert peak_margin(None, _check(plan, plan.predicted_peak // 2), down=1.0) == -(plan.predicted_peak // 2)


def test_auto_fits_the_budget_with_the_measured_margin() -> None:
    """With a margin measured, ``auto`` picks a plan whose prediction, margin included, fits."""
    work = workload()
    budget = 2500 * MB
    first = make_plan(work, "auto", budget=budget)
    assert first.predicted_peak <= budget
    margin = peak_margin(None, _check(first, first.predicted_peak + 300 * MB))
    again = make_plan(replace(work, peak_margin=margin), "auto", budget=budget)
    assert again.predicted_peak <= budget
    assert simulate(work, again.blocks).peak + 300 * MB <= budget  # less memory, not just a lower figure
    assert again.predicted_ms > first.predicted_ms


def _profile_with_peaks(work: Workload, peaks: list[tuple[int, int]]) -> BlockProfile:
    """A profiling step's measurements: forward end and head peak as the model has them, the blocks'
    backward peaks per call (``(call, bytes)`` in the order their backward ended)."""
    profile = BlockProfile("cuda")
    profile.inputs = [b.input_bytes for b in work.blocks]
    plans = profiling_plans(work)
    profile.forward_end = simulate(work, plans).forward_end_bytes
    profile.head_peak = profile.forward_end
    profile.backward_peaks = list(peaks)
    profile.blocks_peak = max(peak for _, peak in peaks)
    return profile


def test_each_call_is_judged_where_its_backward_peaks() -> None:
    """The profiling step measures the peak of each block call's backward; each call's offset is what it
    measured above the model there. A plan is then judged at the call where the peak happens: freeing
    bytes that are back by then (the first block's input, swapped) does not lower it. With one
    offset for the whole backward, put where the model's own peak is, the same plan would be
    predicted lower than it can run (a ResNet-50, whose convolutions' workspaces and gradients peak in
    the first stage's backward, measured 8% over such a prediction on an H200)."""
    work = replace(workload(n=4), lookahead=MB)  # inputs come back just before their block needs them
    base = calibrate(work, _profile_with_peaks(work, [(3, 0), (2, 0), (1, 0), (0, 0)]), (0.0, 0.0), 1.0)
    model = simulate(base, profiling_plans(base)).block_peaks
    measured = [model[0] + 900 * MB, model[1], model[2], model[3]]  # the first call's backward is the peak
    profile = _profile_with_peaks(work, [(k, measured[k]) for k in (3, 2, 1, 0)])
    fitted = calibrate(work, profile, (0.0, 0.0), 1.0)
    assert [b.peak_offset for b in fitted.blocks] == [900 * MB, 0, 0, 0]
    assert fitted.peak_offset == 0
    assert simulate(fitted, profiling_plans(fitted)).blocks_peak == max(measured)

    recompute = [checkpoint_block(c, {}) for c in fitted.blocks]
    first_input_swapped = [checkpoint_block(fitted.blocks[0], {}, swap_input=True), *recompute[1:]]
    assert simulate(fitted, first_input_swapped).peak == simulate(fitted, recompute).peak
    # one offset for the whole backward credits the swap at the model's own peak, not the measured one
    lumped = replace(fitted, blocks=tuple(replace(b, peak_offset=0) for b in fitted.blocks),
                     peak_offset=max(measured) - max(model))
    assert simulate(lumped, first_input_swapped).peak < simulate(lumped, recompute).peak


def test_backward_peaks_out_of_call_order_fall_back_to_one_offset() -> None:
    """A call whose input needs no gradient measures nothing, and calls sharing an input end together:
    then the per-call figures cannot be told apart and the backward gets one offset, as measured."""
    work = workload(n=4)
    for peaks in ([(3, 9 * MB), (1, 7 * MB), (0, 4000 * MB)], [(3, 9 * MB), (1, 7 * MB), (2, 5 * MB),
                                                              (0, 4000 * MB)]):
        fitted = calibrate(work, _profile_with_peaks(work, peaks), (0.0, 0.0), 1.0)
        assert all(b.peak_offset == 0 for b in fitted.blocks)
        assert simulate(fitted, profiling_plans(fitted)).blocks_peak + fitted.peak_offset == 4000 * MB


def test_gradients_held_before_the_step_and_a_reset_counter_do_not_hide_a_peak() -> None:
    """With gradient accumulation the gradients already exist when a step begins: they are in its
    baseline, but the prediction counts them as allocated in the step, so they are added back. And the
    peak is at least what the forward's end held, should other code reset CUDA's peak counter."""
    work = workload()
    plan = make_plan(work, "recompute", budget=1)
    check = PeakCheck(key=(), plan=plan, baseline=0, measured=plan.predicted_peak - 50 * MB,
                      grads_held=80 * MB)
    assert check.activation_peak == plan.predicted_peak + 30 * MB
    assert peak_margin(None, check) == 30 * MB
    reset = PeakCheck(key=(), plan=plan, baseline=0, measured=MB, floor=plan.predicted_peak + 5 * MB)
    assert peak_margin(None, reset) == 5 * MB
    assert PeakCheck(key=(), plan=plan, baseline=0).activation_peak is None  # backward not yet run


def test_a_plan_signature_is_what_the_plan_runs_not_what_it_predicts() -> None:
    work = workload()
    plan = make_plan(work, "recompute", budget=1)
    rescaled = make_plan(calibrate(work, BlockProfile("cpu"), (0.0, 0.0), 2.0), "recompute", budget=1)
    assert rescaled.predicted_ms != plan.predicted_ms
    assert plan_signature(rescaled) == plan_signature(plan)
    assert plan_signature(make_plan(work, "keep", budget=1)) != plan_signature(plan)


def test_peak_checks_measure_each_new_plan_once_and_at_most_four_steps_per_shape() -> None:
    work = workload()
    recompute = make_plan(work, "recompute", budget=1)
    keep = make_plan(work, "keep", budget=1)
    checks = PeakChecks()
    assert checks.wants("a", recompute) and checks.margin("a") == 0
    check = checks.arm("a", recompute, baseline=0)
    check.measured = recompute.predicted_peak + 20 * MB
    assert checks.record(check) == 20 * MB and checks.margin("a") == 20 * MB  # moved: plan again
    assert not checks.wants("a", recompute)  # measured: that plan's steps run unmeasured
    assert checks.wants("a", keep) and checks.wants("b", recompute)  # another plan, another shape
    late = checks.arm("a", keep, baseline=0)  # its backward runs after the next step began
    assert checks.record(late) is None and checks.wants("a", keep)  # nothing learnt: measure again
    again = checks.arm("a", keep, baseline=0)
    again.measured = keep.predicted_peak - 20 * MB + 5 * MB  # predicted with no margin: 15 MB low
    assert checks.record(again) is None and checks.margin("a") == 20 * MB  # below the margin: kept
    assert not checks.wants("a", keep)
    other = make_plan(work, "swap", budget=1)
    checks.arm("a", other, baseline=0)
    assert not checks.wants("a", make_plan(work, "delta", budget=1))  # four steps of "a" measured
    checks.forget("a")
    assert checks.wants("a", recompute) and checks.margin("a") == 0
