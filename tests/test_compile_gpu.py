"""Compiled blocks on a GPU (inductor, bf16 autocast, dropout): deltaswap with ``SwapConfig(compile=True)``
trains with gradients bitwise equal to the same compiled model without it under keep, swap, recompute
and auto, in every step; swap moves the compiled graphs' saved tensors and recompute frees memory. Run
on the device machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from deltaswap.swap import ActivationManager, SwapConfig
from deltaswap.swap.planner import BlockMode

from helpers import assert_bitwise_equal, small_cuda_gpt

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda")]


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], mgr: ActivationManager | None,
          steps: int = 5) -> tuple[list[list[torch.Tensor]], int]:
    """Gradients of each step (from the same weights) and the largest activation peak of the last two."""
    out, peak = [], 0
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with (mgr.step() if mgr else torch.enable_grad()), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        loss.backward()
        if i >= steps - 2:
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        out.append([p.grad.clone() for p in model.parameters()])
    return out, peak


def compiled_plain() -> tuple[list[list[torch.Tensor]], int]:
    model, batch = small_cuda_gpt(dropout=0.1)
    runs = {id(b): torch.compile(b) for b in model.blocks}
    model.block_runner = lambda block, h: runs[id(block)](h)
    return train(model, batch, None)


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "auto"])
def test_compiled_blocks_are_bitwise_equal_to_the_compiled_model_on_gpu(policy: str) -> None:
    expected, plain_peak = compiled_plain()
    torch._dynamo.reset()
    model, batch = small_cuda_gpt(dropout=0.1)
    budget: int | str = int(0.6 * plain_peak) if policy == "auto" else "auto"
    mgr = ActivationManager(SwapConfig(policy=policy, memory_budget=budget, min_bytes=0, compile=True))
    mgr.wrap(model)
    got, peak = train(model, batch, mgr)
    for want, have in zip(expected, got, strict=True):
        assert_bitwise_equal(want, have)
    work, plan = mgr.workload, mgr.plan
    assert work is not None and plan is not None
    assert all(b.compiled for b in work.blocks) and not any(b.per_op for b in plan.blocks)
    if policy == "swap":
        assert mgr.stats.engine.bytes_offloaded > 0 and peak < plain_peak
    if policy == "recompute":
        assert peak < 0.7 * plain_peak, (peak, plain_peak)
    if policy == "auto":
        assert plan.predicted_peak <= budget and {b.mode for b in plan.blocks} != {BlockMode.KEEP}
        assert peak < 0.75 * plain_peak, (peak, plain_peak)
    mgr.close()
