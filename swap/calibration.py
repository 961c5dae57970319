"""Fitting the planner's model to what was measured: the profiling step's times and peaks, the
forward time of the first step that ran a plan, and the activation peaks of the first steps that ran
plans."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .blockprofile import BlockProfile
from .planner import Plan, Workload, held_bytes, profiling_plans, simulate

SCALE_LIMITS = (0.2, 5.0)
"""The least and the most the op times are rescaled by."""
SCALE_TOLERANCE = 0.05
"""A measured forward within this fraction of the predicted one leaves the op times as they are."""


def calibrate(work: Workload, profile: BlockProfile, times: tuple[float, float], scale: float) -> Workload:
    """``work`` fitted to what its profiling step measured.

    Op times are scaled by ``scale`` (timing every op slows the profiling step; the first planned step
    says by how much: :func:`forward_scale`), clamped to :data:`SCALE_LIMITS`. From the profiling step:
    the head's backward time and the blocks' backward-to-forward ratio (``times``: the head's and the
    blocks' backward in ms, zeros if its backward has not run); the activation bytes outside the blocks
    (so its forward-end memory is predicted exactly), the head backward's transient memory, and, for the
    blocks' backward, an offset per block call (what its backward's peak measured above the model's
    figure there) where every call measured one, so that a plan is judged at the call where its peak
    happens, and an offset for the blocks' backward peak as a whole.

    Example::

        >>> work = calibrate(work, profile, (head_ms, blocks_ms), 1.0)       # doctest: +SKIP
    """
    scale = min(SCALE_LIMITS[1], max(SCALE_LIMITS[0], scale))
    work = work.scaled(scale) if scale != 1.0 else work
    head_ms, blocks_ms = times
    block_forward = sum(b.forward_ms for b in work.blocks)
    plain = set(work.plain_calls)  # the profiling step recomputed every other call
    recompute = sum(b.forward_ms for k, b in enumerate(work.blocks) if k not in plain)
    if blocks_ms > recompute and block_forward > 0:
        ratio = min(6.0, max(0.5, (blocks_ms - recompute) / block_forward))
        work = replace(work, backward_ratio=ratio, other_backward_ms=head_ms)
    if profile.head_peak is not None and profile.blocks_peak is not None:
        plans = profiling_plans(work)
        kept = sum(held_bytes(work, plans))
        work = replace(work, other_bytes=max(0, profile.forward_end - kept),
                       head_transient=max(0, profile.head_peak - profile.forward_end), peak_offset=0,
                       blocks=tuple(replace(b, peak_offset=0) for b in work.blocks))
        measured = profile.call_peaks()
        if measured is not None and len(measured) == len(work.blocks):
            model = simulate(work, plans).block_peaks
            work = replace(work, blocks=tuple(replace(b, peak_offset=peak - predicted) for b, peak, predicted
                                              in zip(work.blocks, measured, model, strict=True)))
        work = replace(work, peak_offset=profile.blocks_peak - simulate(work, plans).blocks_peak)
    return work


def forward_scale(work: Workload, plan: Plan, measured_forward_ms: float) -> float:
    """How much to rescale ``work``'s op times so that ``plan``'s predicted forward matches the one a
    step measured: 1.0 within :data:`SCALE_TOLERANCE`, or when there is nothing to scale."""
    predicted = simulate(work, plan.blocks).forward_ms
    has_ops = sum(b.forward_ms for b in work.blocks) > 0
    if predicted > 0 and abs(measured_forward_ms / predicted - 1) > SCALE_TOLERANCE and has_ops:
        return measured_forward_ms / predicted  # the blocks' ops scale so the whole forward matches
    return 1.0


PEAK_CHECKS = 4
"""The most steps of an input shape that measure their activation peak against their plan's prediction:
a step measures when its plan has not been measured yet (a correction, or the first step's measured
speed, can change the plan)."""
MARGIN_DOWN = 0.01
"""The most, as a fraction of a plan's predicted peak, that a measured peak lowers later predictions:
an over-prediction is trusted less than an under-prediction, which only costs speed."""


@dataclass
class PeakCheck:
    """The activation peak of one step that ran ``plan``: CUDA's peak allocated bytes, reset when the
    step's first block began, over ``baseline`` (what was allocated when the step began), read when the
    blocks' backward ends; ``measured`` stays ``None`` until then."""

    key: tuple[Any, ...]
    """The input shape whose plan ran."""
    plan: Plan
    """The plan the step ran."""
    baseline: int
    measured: int | None = None
    floor: int = 0
    """Bytes allocated over ``baseline`` when the forward ended: the peak is at least that, even if
    other code reset the peak statistics in between."""
    grads_held: int = 0
    """Bytes of the gradients that existed when the step began (gradient accumulation): in the baseline,
    while the prediction counts every gradient as allocated in the step."""

    @property
    def activation_peak(self) -> int | None:
        """The peak to compare with the prediction, or ``None`` before the backward has measured it."""
        if self.measured is None:
            return None
        return max(self.measured, self.floor) + self.grads_held


def plan_signature(plan: Plan) -> tuple[Any, ...]:
    """What a plan runs, per block (mode, stored ops, swapped input), without its predicted figures:
    equal for plans that run alike."""
    return tuple((b.mode, tuple(sorted((i, d.value) for i, d in b.decisions.items())), b.swap_input)
                 for b in plan.blocks)


def peak_margin(margin: int | None, check: PeakCheck, down: float = MARGIN_DOWN) -> int:
    """The margin to add to predicted peaks (:attr:`~deltaswap.swap.planner.Workload.peak_margin`) once
    ``check`` has measured a step: what it measured above the model's own prediction for its plan (the
    margin the plan was predicted with taken off), or the margin so far (``margin``; ``None``: none
    measured yet) if that is higher. A measured peak below the prediction lowers a first margin by at
    most ``down`` of the prediction: :data:`MARGIN_DOWN` where the margin chooses the plan (``auto``);
    a fixed policy's plan is the one measured, so ``1.0`` trusts the measurement whole.

    Example::

        >>> work = replace(work, peak_margin=peak_margin(None, check))       # doctest: +SKIP
    """
    peak = check.activation_peak
    assert peak is not None
    raw = check.plan.predicted_peak - int(check.plan.calibration.get("peak_margin", 0))
    error = max(peak - raw, -int(down * raw))
    return error if margin is None else max(margin, error)


class PeakChecks:
    """Which steps measure their activation peak, and what the measurements taught, per input shape:
    a step measures while its plan is one no step of its shape has measured (at most
    :data:`PEAK_CHECKS` per shape); each measurement that moves the margin (:func:`peak_margin`) asks
    for the shape to be planned again. The measuring itself (CUDA's peak counter) is the caller's.

    Example::

        >>> checks = PeakChecks()
        >>> check = checks.arm(key, plan, baseline=allocated)           # doctest: +SKIP
        >>> ... the step runs; its backward sets check.measured ...      # doctest: +SKIP
        >>> if checks.record(check, down=MARGIN_DOWN) is not None:      # doctest: +SKIP
        ...     replan(key)
    """

    def __init__(self) -> None:
        self._margins: dict[tuple[Any, ...], int] = {}
        self._counts: dict[tuple[Any, ...], int] = {}
        self._measured: dict[tuple[Any, ...], set[tuple[Any, ...]]] = {}

    def margin(self, key: tuple[Any, ...]) -> int:
        """The margin measured for input shape ``key`` (0 before any)."""
        return self._margins.get(key, 0)

    def wants(self, key: tuple[Any, ...], plan: Plan) -> bool:
        """Whether a step of ``key`` that runs ``plan`` should measure its peak."""
        return (self._counts.get(key, 0) < PEAK_CHECKS
                and plan_signature(plan) not in self._measured.get(key, ()))

    def arm(self, key: tuple[Any, ...], plan: Plan, baseline: int, grads_held: int = 0) -> PeakCheck:
        """A check for a step of ``key`` running ``plan`` (counted against :data:`PEAK_CHECKS`)."""
        self._counts[key] = self._counts.get(key, 0) + 1
        return PeakCheck(key, plan, baseline, grads_held=grads_held)

    def record(self, check: PeakCheck, down: float = MARGIN_DOWN, *,
               measured: bool | None = None) -> int | None:
        """Take in ``check``'s measurement: its plan counts as measured and the margin moves as
        :func:`peak_margin` says. Returns the new margin if it moved (plan the shape again), else
        ``None``. ``measured`` (default: whether ``check`` measured) is what several ranks agreed on:
        a rank whose own backward measured nothing keeps its margin."""
        if measured is None:
            measured = check.activation_peak is not None
        if not measured:
            return None  # its backward ran after the next step began: a later step measures
        self._measured.setdefault(check.key, set()).add(plan_signature(check.plan))
        before = self.margin(check.key)
        if check.activation_peak is not None:
            self._margins[check.key] = peak_margin(self._margins.get(check.key), check, down)
        after = self.margin(check.key)
        return after if after != before else None

    def forget(self, key: tuple[Any, ...]) -> None:
        """Drop what was measured for ``key`` (it is profiled again)."""
        for table in (self._margins, self._counts, self._measured):
            table.pop(key, None)
