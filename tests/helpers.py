"""Assertions shared by the CPU and GPU tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltaswap.swap import ActivationManager
from deltaswap.swap.blockprofile import SavedBytes
from deltaswap.swap.planner import BlockCost, BlockPlan, Workload, held_bytes, simulate
from deltaswap.swap.profile import Bandwidth, OpRecord
from deltaswap.swap.recompute import OpDecision, OpPolicy

from gpt import GPT, GPTConfig, random_batch


def assert_bitwise_equal(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    """Every tensor finite and bit-for-bit equal to the plain run's."""
    assert len(expected) == len(actual) and len(expected) > 0
    for x, y in zip(expected, actual, strict=True):
        assert torch.isfinite(y).all()
        assert torch.equal(x, y), (x - y).abs().max().item()


def small_cuda_gpt(dropout: float = 0.0) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """A 4-layer GPT on the GPU and a batch of 8 x 256 tokens; every saved activation is at least 256 KiB."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, seq_len=256, n_layer=4, n_head=4, d_model=256, dropout=dropout)
    model = GPT(cfg).cuda()
    return model, random_batch(cfg, 8, "cuda", torch.Generator().manual_seed(1))


# Per-op policies for checkpoint_with_policy, shared by the CPU and GPU recompute tests.
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def keep_all(index: int, op: torch._ops.OpOverload) -> OpDecision:
    return OpDecision.KEEP


def swap_all(index: int, op: torch._ops.OpOverload) -> OpDecision:
    return OpDecision.SWAP


def recompute_all(index: int, op: torch._ops.OpOverload) -> OpDecision:
    return OpDecision.RECOMPUTE


def keep_matmuls(index: int, op: torch._ops.OpOverload) -> OpDecision:
    return OpDecision.KEEP if op in MATMULS else OpDecision.RECOMPUTE


def alternate(index: int, op: torch._ops.OpOverload) -> OpDecision:
    return (OpDecision.KEEP, OpDecision.SWAP, OpDecision.RECOMPUTE)[index % 3]


POLICIES: dict[str, OpPolicy] = {
    "keep": keep_all,
    "swap": swap_all,
    "recompute": recompute_all,
    "keep_matmuls": keep_matmuls,
    "mixed": alternate,
}


# A synthetic measured workload for the planner and the plan table, in decimal megabytes.
MB = 10**6


def synthetic_block(saved_mb: int = 300) -> BlockCost:
    """A transformer-like block: 50 MB input, ``saved_mb`` MB saved when run plainly, 2.4 ms of ops."""
    ops = (
        OpRecord(0, "aten.native_layer_norm.default", 50 * MB, 0.10, True),
        OpRecord(1, "aten._to_copy.default", 25 * MB, 0.05, True),
        OpRecord(2, "aten.mm.default", 100 * MB, 1.00, True),
        OpRecord(3, "aten.view.default", 0, 0.0, False),
        OpRecord(4, "aten.gelu.default", 100 * MB, 0.20, True),
        OpRecord(5, "aten.mm.default", 25 * MB, 1.00, True),
        OpRecord(6, "aten.add.Tensor", 50 * MB, 0.05, True),
    )
    return BlockCost(ops=ops, input_bytes=50 * MB, saved_bytes=saved_mb * MB)


def synthetic_workload(gbps: float = 50.0, n: int = 16) -> Workload:
    """``n`` synthetic blocks, 100 MB saved outside them, PCIe at ``gbps`` each way, 1200 MB look-ahead."""
    return Workload(blocks=(synthetic_block(),) * n, other_bytes=100 * MB, other_ms=2.0,
                    bandwidth=Bandwidth(gbps, gbps, 1.8 * gbps), min_bytes=MB, lookahead=1200 * MB)


def predicted_and_held(mgr: ActivationManager, loss_fn: Callable[[], torch.Tensor],
                       plans: Callable[[Workload], list[BlockPlan]] | None = None) -> tuple[int, int]:
    """Profile and plan (two steps of ``loss_fn`` under ``mgr``, CPU, warnings left to the caller), run
    ``plans(workload)`` instead of the policy's plan if given, then one more step: the plan's predicted
    forward-end bytes and the bytes autograd held at that step's forward end, each storage once (a plan
    that swaps nothing runs without the engine, whose hooks would hide the saves)."""
    for _ in range(2):  # profiling, then the plan
        with mgr.step():
            loss = loss_fn()
        loss.backward()
    if plans is not None:
        mgr.use_plan(plans(mgr.workload))
    counted = SavedBytes()
    with counted.hooks(), mgr.step():
        loss = loss_fn()
    loss.backward()
    assert mgr.workload is not None and mgr.plan is not None
    assert min(held_bytes(mgr.workload, mgr.plan.blocks)) >= 0
    return simulate(mgr.workload, mgr.plan.blocks).forward_end_bytes, counted.total
