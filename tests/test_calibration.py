"""Fitting the planner's model to measurements: the first planned step's forward rescales the op times,
within limits, and leaves them alone when the prediction was close."""

from __future__ import annotations

import pytest

from deltaswap.swap.blockprofile import BlockProfile
from deltaswap.swap.calibration import SCALE_LIMITS, calibrate, forward_scale
from deltaswap.swap.planner import make_plan, simulate

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
