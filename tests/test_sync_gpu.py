"""The host never waits for the GPU in a planned step's forward or backward (run on the device machine).

Not under deterministic mode (``deterministic_cuda``), unlike the exactness tests: it fills every new
allocation with NaN, one more kernel per allocation, and the launch queue fills behind the test's sleeps
(see the test's docstring)."""

from __future__ import annotations

import time

import pytest
import torch

from deltaswap.swap import ActivationManager, SwapConfig

from helpers import small_cuda_gpt

pytestmark = [pytest.mark.gpu]

SLEEP_CYCLES = 2_000_000_000
"""``torch.cuda._sleep`` cycles: 1 s at an H100's 1.98 GHz, longer at lower clocks."""


@pytest.mark.parametrize("policy", ["swap", "recompute", "delta", "auto"])
def test_the_host_never_waits_for_the_gpu_in_a_planned_step(policy: str) -> None:
    """A long sleep queued on the GPU just before the forward (and another before the backward) must
    still be running when the forward (the backward) returns on the host. Any host synchronization
    (stream, event, ``.item()``, a pinned allocation) would have waited for it; a plain backward does
    not wait, so neither may deltaswap's. ``set_sync_debug_mode`` alone misses event synchronizations.

    Two steps run back to back, so a wait on the previous step's events shows too. Not three: with the
    GPU seconds behind, CUDA's launch queue fills (about a thousand commands; deltaswap's copies and
    their timing events are many) and the next launch blocks until the GPU drains it. That happens to
    any program whose host runs that far ahead, and is not a synchronization (seen on an H200: a third
    step's backward blocked inside ``Event.record``)."""
    model, batch = small_cuda_gpt(dropout=0.1)
    budget = 1 if policy == "auto" else "auto"  # auto under 1 byte: swaps and recomputes
    mgr = ActivationManager(SwapConfig(policy=policy, min_bytes=0, memory_budget=budget))
    mgr.wrap(model)
    losses: list[torch.Tensor] = []

    def forward() -> None:
        with mgr.step(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(*batch))

    # Warm-up: profiling, the first planned step, the re-plan after it, and the steps that grow the
    # pinned pool (a pinned allocation synchronizes) may wait for the GPU.
    for _ in range(6):
        forward()
        losses.pop().backward()
    torch.cuda.synchronize()
    pool_before = mgr.stats.engine.pinned_bytes_reserved
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    end.record()
    end.synchronize()
    sleep_ms = start.elapsed_time(end)
    waited, host_ms = [], []
    previous: torch.cuda.Event | None = None
    for _ in range(2):  # back to back, as in training: a wait on an earlier step's events shows too
        first, second = torch.cuda.Event(), torch.cuda.Event()
        torch.cuda._sleep(SLEEP_CYCLES)
        first.record()
        began = time.perf_counter()
        forward()
        forward_waited = first.query() or (previous is not None and previous.query())
        forward_ms = (time.perf_counter() - began) * 1e3
        torch.cuda._sleep(SLEEP_CYCLES)
        second.record()
        losses.pop().backward()
        # a wait in the backward on anything queued before the second sleep ends with the first one
        waited.append((forward_waited, first.query() or second.query()))
        host_ms.append((round(forward_ms), round((time.perf_counter() - began) * 1e3)))
        previous = second
    torch.cuda.synchronize()
    assert mgr.stats.engine.pinned_bytes_reserved == pool_before, "a step grew the pinned pool: warming up"
    # the first sleep only tells a wait from a slow host if the host ran the whole step well within it
    assert max(total for _, total in host_ms) < 0.8 * sleep_ms, (
        f"inconclusive: the host took {host_ms} ms (forward, forward+backward) against a {sleep_ms:.0f} ms "
        f"sleep")
    assert waited == [(False, False)] * 2, (
        f"(forward waited, backward waited) per step: {waited}; host ms {host_ms}, sleep {sleep_ms:.0f} ms")
    if policy == "swap":
        assert mgr.stats.engine.bytes_offloaded > 0
