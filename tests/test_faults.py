"""Faults and hostile conditions on CPU: running out of GPU memory inside a step (profiling or planned)
says what to change and leaves the manager usable; host RAM too small for the plan recomputes instead,
or fails with the sizes; a model on an unsupported device is refused before its first step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationManager, HostMemoryError, HostRamShare, SwapConfig, SyncCopyBackend
from deltaswap.swap.planner import BlockMode

GiB = 1 << 30


class Layer(nn.Module):
    """A block that runs out of memory on request (as a CUDA allocation would) for batches over
    ``limit``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.limit: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return torch.tanh(self.lin(x)) * 2


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.width = width
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


def manager(**options: object) -> ActivationManager:
    options.setdefault("bandwidth_gbps", 50.0)
    return ActivationManager(SwapConfig(min_bytes=0, **options), backend=SyncCopyBackend())  # type: ignore[arg-type]


def step(mgr: ActivationManager, model: nn.Module, batch: int) -> None:
    with mgr.step():
        loss = model(torch.randn(batch, model.width))
    loss.backward()


@pytest.mark.parametrize("planned", [False, True], ids=["profiling-step", "planned-step"])
def test_out_of_memory_in_a_step_says_what_to_change_and_the_next_step_runs(planned: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    layers = list(model.layers)
    mgr = manager(policy="recompute")
    mgr.wrap(model)
    if planned:
        step(mgr, model, 32)  # profiles this shape; the failing step below runs its plan
    layers[2].limit = 16
    with pytest.raises(torch.OutOfMemoryError) as caught:
        step(mgr, model, 32)
    message = str(caught.value)
    assert "Tried to allocate 2.00 GiB" in message, "the original error is kept"
    if planned:
        assert "under the plan" in message and "policy recompute" in message and "memory_budget" in message
    else:
        assert "profiling step" in message and "batch size" in message
    step(mgr, model, 16)  # a smaller batch: a new shape, profiled and then planned
    step(mgr, model, 16)
    assert mgr.plan is not None and not mgr.stats.profiling


def test_too_little_host_ram_for_the_swaps_recomputes_instead_with_a_warning() -> None:
    """Eight wide layers, so that recomputing costs a clear share of the step and swapping (free at this
    bandwidth) gains more than the planner's ``SWAP_MARGIN`` when host RAM allows it."""
    torch.manual_seed(0)
    model = Net(width=512, depth=8)
    probe = manager(policy="keep")
    probe.wrap(model)
    step(probe, model, 512)
    step(probe, model, 512)
    assert probe.plan is not None
    budget = probe.plan.predicted_peak * 70 // 100
    probe.unwrap()
    roomy = manager(policy="auto", memory_budget=budget, bandwidth_gbps=1e6)
    roomy.wrap(model)
    for _ in range(3):
        step(roomy, model, 512)
    assert roomy.plan is not None and any(b.swapped_bytes for b in roomy.plan.blocks), "it swaps when it can"
    roomy.unwrap()
    reserve = 2 * GiB
    config = SwapConfig(min_bytes=0, policy="auto", memory_budget=budget, bandwidth_gbps=1e6)
    tight = ActivationManager(config, backend=SyncCopyBackend(), host_memory_available=lambda: reserve + 1024)
    tight.wrap(model)
    with pytest.warns(RuntimeWarning, match="recomputes instead"):
        for _ in range(3):
            step(tight, model, 512)
    plan = tight.plan
    assert plan is not None and not any(b.swapped_bytes for b in plan.blocks)
    assert plan.predicted_peak <= budget and BlockMode.CHECKPOINT in {b.mode for b in plan.blocks}


def test_too_little_host_ram_for_a_swap_policy_is_an_error_with_the_sizes() -> None:
    torch.manual_seed(0)
    model = Net()
    mgr = ActivationManager(SwapConfig(min_bytes=0, policy="swap", bandwidth_gbps=50.0),
                            backend=SyncCopyBackend(), host_memory_available=lambda: 2 * GiB + 1024)
    mgr.wrap(model)
    step(mgr, model, 64)  # profiling
    with pytest.raises(HostMemoryError, match=r"swaps .* to host memory per step, but only 1.00 KiB"):
        step(mgr, model, 64)


def test_a_ranks_share_of_host_ram_is_what_it_may_pin_and_the_error_says_so() -> None:
    """Two ranks on a host with 4 GiB + 2 KiB available: each may pin half, 1 KiB beyond the reserve."""
    torch.manual_seed(0)
    model = Net()
    share = HostRamShare(2, available=lambda: 4 * GiB + 2048)
    mgr = ActivationManager(SwapConfig(min_bytes=0, policy="swap", bandwidth_gbps=50.0),
                            backend=SyncCopyBackend(), host_memory_available=share)
    mgr.wrap(model)
    step(mgr, model, 64)  # profiling
    with pytest.raises(HostMemoryError, match=r"only 1.00 KiB .*divided by its 2 ranks"):
        step(mgr, model, 64)


def test_a_model_on_an_unsupported_device_is_refused_before_its_first_step() -> None:
    model = Net().to("meta")
    mgr = manager()
    mgr.wrap(model)
    with pytest.raises(ValueError, match="model is on meta"), mgr.step():
        pass


def test_a_budget_larger_than_the_device_is_refused_with_both_sizes() -> None:
    from deltaswap.swap.manager import check_budget_fits

    check_budget_fits(80 * GiB, 80 * GiB)
    with pytest.raises(ValueError, match=r"memory_budget=96.00 GiB is more than the device has \(80.00"):
        check_budget_fits(96 * GiB, 80 * GiB)
