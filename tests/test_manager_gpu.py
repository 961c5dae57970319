"""ActivationManager on a GPU: every policy (and auto under a tight budget) trains with gradients
bitwise equal to the plain run, in bf16 autocast with dropout. Run on the device machine."""

from __future__ import annotations

import pytest
import torch

from deltaswap.swap import ActivationManager, SwapConfig, measure_host_cost
from deltaswap.swap.planner import BlockMode, checkpoint_block, keep_block, swap_block
from deltaswap.swap.profile import measure_bandwidth
from deltaswap.swap.recompute import OpDecision

from helpers import assert_bitwise_equal, small_cuda_gpt

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda")]


def train(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], mgr: ActivationManager | None,
          steps: int = 3) -> list[list[torch.Tensor]]:
    out = []
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        with (mgr.step() if mgr else torch.enable_grad()), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        loss.backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "delta", "auto"])
def test_every_policy_bitwise_equal_on_gpu(policy: str) -> None:
    model, batch = small_cuda_gpt(dropout=0.1)
    plain = train(model, batch, None)
    budget = "auto"
    if policy == "auto":  # a budget that forces a mix: 40% of what keeping everything needs
        probe = ActivationManager(SwapConfig(policy="keep", min_bytes=0))
        probe.wrap(model)
        train(model, batch, probe, steps=2)
        assert probe.plan is not None
        budget = int(0.4 * probe.plan.predicted_peak)
        model, batch = small_cuda_gpt(dropout=0.1)
    mgr = ActivationManager(SwapConfig(policy=policy, memory_budget=budget, min_bytes=0))
    mgr.wrap(model)
    for expected, actual in zip(plain, train(model, batch, mgr), strict=True):
        assert_bitwise_equal(expected, actual)
    plan = mgr.plan
    assert plan is not None
    if policy == "auto":
        assert plan.predicted_peak <= budget
        assert {b.mode for b in plan.blocks} != {BlockMode.KEEP}


def test_a_hand_made_plan_with_swap_and_selective_recompute_is_bitwise_equal_on_gpu() -> None:
    model, batch = small_cuda_gpt(dropout=0.1)
    plain = train(model, batch, None)
    mgr = ActivationManager(SwapConfig(policy="recompute", min_bytes=0))
    mgr.wrap(model)
    ours = train(model, batch, mgr, steps=1)  # the profiling step
    work = mgr.workload
    assert work is not None
    stored = {op.index: OpDecision.SWAP for op in work.blocks[1].ops if op.storable and op.out_bytes}
    blocks = [swap_block(work.blocks[0]), checkpoint_block(work.blocks[1], stored)]
    blocks += [keep_block(c) for c in work.blocks[2:]]
    mgr.use_plan(blocks)
    for i in (1, 2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        with mgr.step(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        loss.backward()
        ours.append([p.grad.clone() for p in model.parameters()])
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)
    assert mgr.stats.engine.bytes_offloaded > work.blocks[0].saved_bytes // 2


def test_measured_copy_slowdown_is_a_small_fraction() -> None:
    """Copies beside kernels slow them a little (a few percent on PCIe gen5), never by half: a larger
    value means the measurement serialized the copies with the kernels."""
    bw = measure_bandwidth()
    assert 0.0 <= bw.copy_slowdown < 0.5
    assert bw.d2h_gbps > 1 and bw.h2d_gbps > 1


def test_measuring_the_link_and_the_host_leaves_the_random_generators_alone() -> None:
    """The bandwidth, slowdown and host-cost measurements run inside a training step: drawing random
    numbers there would change the user's dropout masks from the plain run's."""
    cuda, cpu = torch.cuda.get_rng_state(), torch.get_rng_state()
    measure_bandwidth()
    measure_host_cost()
    assert torch.equal(torch.cuda.get_rng_state(), cuda) and torch.equal(torch.get_rng_state(), cpu)


def test_the_per_op_modes_cost_the_host_time_beside_plain_launches() -> None:
    """Recording and replaying run Python for every op: more host time per op than torch's checkpoint,
    of the order of a kernel launch or more, and far under a millisecond."""
    cost = measure_host_cost()
    print("host cost per op:", cost)
    assert 0.0 < cost.launch_ms < 1.0
    assert 0.0 < cost.record_ms < 1.0 and 0.0 < cost.replay_ms < 1.0
