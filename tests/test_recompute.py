"""Per-op keep / swap / recompute inside checkpointed blocks, on CPU: gradients bitwise equal to the plain
run for every policy (dropout on), stored outputs really used, stale outputs recomputed, clear errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationOffloader, OffloadConfig, SyncCopyBackend
from deltaswap.swap.profile import OpProfiler
from deltaswap.swap.recompute import OpDecision, checkpoint_all, checkpoint_with_policy

from gpt import GPT, GPTConfig, random_batch
from helpers import MATMULS, POLICIES, assert_bitwise_equal, keep_all, keep_matmuls, recompute_all, swap_all


def gpt() -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=32, n_layer=3, n_head=4, d_model=64, dropout=0.1)
    return GPT(cfg), random_batch(cfg, 4, "cpu", torch.Generator().manual_seed(1))


def two_backwards(model: GPT, batch: tuple[torch.Tensor, ...], ctx: contextlib.AbstractContextManager,
                  runner: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.block_runner = runner
    torch.manual_seed(11)
    with ctx:
        loss = model(*batch)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    model.block_runner = None
    return first + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_gives_bitwise_equal_gradients_with_dropout(name: str) -> None:
    model, batch = gpt()
    plain = two_backwards(model, batch, contextlib.nullcontext(), None)
    policy = POLICIES[name]

    def runner(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_with_policy(block, x, policy=policy)

    assert_bitwise_equal(plain, two_backwards(model, batch, contextlib.nullcontext(), runner))


@pytest.mark.parametrize("name", ["swap", "mixed", "keep_matmuls"])
def test_swapped_outputs_go_through_the_engine_and_come_back(name: str) -> None:
    model, batch = gpt()
    plain = two_backwards(model, batch, contextlib.nullcontext(), None)
    off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=SyncCopyBackend())
    policy = POLICIES[name]

    def runner(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_with_policy(block, x, policy=policy, store=off.store)

    assert_bitwise_equal(plain, two_backwards(model, batch, off, runner))
    stats = off.stats
    if name == "keep_matmuls":
        assert stats.bytes_kept > 0
    else:
        # outputs modified in place later (dropout's mask buffer on CPU) are recomputed, not brought back
        assert 0 < stats.bytes_prefetched <= stats.bytes_offloaded
    assert stats.pinned_bytes_in_use == 0


class Counting(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matmuls that actually run."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.matmuls += func in MATMULS
        return func(*args, **(kwargs or {}))


def test_stored_outputs_are_not_recomputed() -> None:
    lin1, lin2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def block(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(lin2(torch.relu(lin1(x))))  # tanh saves its output: lin2's must be recomputed

    x = torch.randn(8, 32, requires_grad=True)
    counts = {}
    for name, run in (
        ("plain", block),
        ("recompute", lambda x: checkpoint_with_policy(block, x, policy=recompute_all)),
        ("keep_matmuls", lambda x: checkpoint_with_policy(block, x, policy=keep_matmuls)),
    ):
        y = run(x)
        with Counting() as counter:
            y.sum().backward()
        counts[name] = counter.matmuls
    assert counts["recompute"] == counts["plain"] + 2, "both linear layers run again"
    assert counts["keep_matmuls"] == counts["plain"], "their stored outputs are used instead"


class InPlaceBlock:
    """``y = x @ w`` is stored, then modified in place later in the same forward pass."""

    def __init__(self) -> None:
        self.w = torch.randn(16, 16, requires_grad=True)
        self.x = torch.randn(8, 16, requires_grad=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        z = y * 2
        y.add_(1)  # the stored value of y is now stale (or, swapped, racing its copy to host)
        return z + y.sin()

    def grads(self, run: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        self.x.grad = self.w.grad = None
        run(self.x).sum().backward()
        return [self.x.grad.clone(), self.w.grad.clone()]

    def swapped_grads(self, backend: SyncCopyBackend) -> tuple[list[torch.Tensor], ActivationOffloader]:
        """Gradients with every op output of the block swapped through ``backend``."""
        off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=backend)

        def run(x: torch.Tensor) -> torch.Tensor:
            with off:
                return checkpoint_with_policy(self, x, policy=swap_all, store=off.store)

        return self.grads(run), off


def test_an_output_modified_in_place_after_it_was_stored_is_recomputed() -> None:
    block = InPlaceBlock()
    plain = block.grads(block)
    assert_bitwise_equal(plain, block.grads(lambda x: checkpoint_with_policy(block, x, policy=keep_all)))


def test_a_swapped_output_modified_in_place_is_not_brought_back() -> None:
    """Its copy to host could race with the in-place write on a GPU: it is recomputed instead."""
    block = InPlaceBlock()
    grads, off = block.swapped_grads(SyncCopyBackend())
    assert_bitwise_equal(block.grads(block), grads)
    y_bytes = 8 * 16 * 4
    assert off.stats.bytes_prefetched == off.stats.bytes_offloaded - y_bytes, "y's copy is never used"


def test_different_ops_in_the_recompute_raise_a_clear_error() -> None:
    calls = []

    def moody(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        # control flow that changes between calls; exp saves its output, so the recompute must reach it
        return (x.sin() if len(calls) == 1 else x.cos()).exp()

    x = torch.randn(8, requires_grad=True)
    y = checkpoint_with_policy(moody, x, policy=keep_all)
    with pytest.raises(RuntimeError, match="must run the same ops every time"):
        (y * y).sum().backward()


def test_recompute_of_a_block_inside_the_engine_counts_its_inputs_as_progress() -> None:
    """Block inputs are saved through the engine's hooks (non-reentrant checkpoint saves its region's
    inputs with the outer hooks), so they are swapped like any activation."""
    model, batch = gpt()
    off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=SyncCopyBackend())

    def runner(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_with_policy(block, x, policy=recompute_all, store=off.store)

    two_backwards(model, batch, off, runner)
    block_input_bytes = 4 * 32 * 64 * 4
    assert off.stats.bytes_offloaded >= model.cfg.n_layer * block_input_bytes


def test_profiler_records_every_op_with_its_bytes_and_time() -> None:
    model, (x, _) = gpt()
    block = model.blocks[0]
    h = model.wte(x) + model.wpe(torch.arange(x.shape[1]))
    profiler = OpProfiler(device="cpu")
    out = checkpoint_with_policy(block, h, policy=recompute_all, profiler=profiler)
    out.sum().backward()
    (records,) = profiler.blocks()
    assert [r.index for r in records] == list(range(len(records)))
    by_op = {r.op: r for r in records}
    mm = next(r for r in records if r.op == "aten.mm.default")
    assert mm.storable and mm.out_bytes == 4 * 32 * 3 * 64 * 4  # the qkv projection's output
    assert not by_op["aten.view.default"].storable and by_op["aten.view.default"].out_bytes == 0
    assert not by_op["aten.bernoulli_.float"].storable, "random ops are never stored"
    assert all(r.ms >= 0 for r in records) and sum(r.ms for r in records) > 0


class LateCopyBackend(SyncCopyBackend):
    """Copies to host happen late, at the start of the backward pass, as on a busy GPU copy stream:
    anything written into a swapped tensor in the meantime ends up in its host copy."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, after: object) -> object:
        self.pending.append((dst, src))  # holds src, as the allocator would for a stream in use
        return super().copy_to_host(dst, torch.zeros_like(src), after)  # placeholder bytes for now

    def copy_to_device(self, src: torch.Tensor, after: object) -> tuple[torch.Tensor, object]:
        for dst, late in self.pending:
            dst.copy_(late)
        self.pending.clear()
        return super().copy_to_device(src, after)

    def is_done(self, copy: object) -> bool:
        return not self.pending


def test_a_swapped_output_written_in_place_before_its_late_copy_is_recomputed() -> None:
    block = InPlaceBlock()
    grads, _ = block.swapped_grads(LateCopyBackend())
    assert_bitwise_equal(block.grads(block), grads)


def test_a_swapped_output_written_in_place_after_the_block_during_its_copy_is_recomputed() -> None:
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(8, 16, requires_grad=True)

    def block(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ w)  # tanh's output is stored (SWAP) and saved by tanh's backward

    def grads(run: Callable[[torch.Tensor], torch.Tensor], ctx: contextlib.AbstractContextManager) -> list:
        x.grad = w.grad = None
        with ctx:
            y = run(x)
            out = (y * 3).sum()
            y.mul_(2)  # after the block, while y's copy to host is still pending
            del y
        out.backward()
        return [x.grad.clone(), w.grad.clone()]

    def torch_checkpoint(h: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)

    expected = grads(torch_checkpoint, contextlib.nullcontext())  # the recompute sees the unmodified value
    off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=LateCopyBackend())
    ours = grads(lambda h: checkpoint_with_policy(block, h, policy=swap_all, store=off.store), off)
    assert_bitwise_equal(expected, ours)


def test_a_block_called_twice_under_autocast_keeps_its_op_indices() -> None:
    """Autocast caches weight casts within a region: the second call would skip casts its recompute
    makes, shifting every later op index."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    x = torch.randn(8, 32, requires_grad=True)

    def addmm_only(index: int, op: torch._ops.OpOverload) -> OpDecision:
        return OpDecision.KEEP if op is torch.ops.aten.addmm.default else OpDecision.RECOMPUTE

    def grads(run: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        seq.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(run(x)).float().sum()
        loss.backward()
        return [x.grad.clone()] + [p.grad.clone() for p in seq.parameters()]

    plain = grads(seq)
    assert_bitwise_equal(plain, grads(lambda h: checkpoint_with_policy(seq, h, policy=addmm_only)))


def test_mutating_ops_are_never_stored() -> None:
    """BatchNorm updates its running statistics in place: storing its output instead of running it in
    the recompute would change them (torch's checkpoint runs it in both passes)."""
    torch.manual_seed(0)

    def stats(run: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh())
        run(block, torch.randn(32, 16, requires_grad=True)).sum().backward()
        return block[1].running_mean.clone()

    expected = stats(lambda b, h: torch.utils.checkpoint.checkpoint(b, h, use_reentrant=False))
    assert torch.equal(expected, stats(lambda b, h: checkpoint_with_policy(b, h, policy=keep_all)))


def test_keyword_arguments_reach_the_block_and_their_gradients_flow() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)

    def block(h: torch.Tensor, *, debug: torch.Tensor, policy: float) -> torch.Tensor:
        return torch.tanh(lin(h) * debug) * policy  # names that torch's checkpoint or ours also use

    x = torch.randn(8, 16, requires_grad=True)
    scale = torch.randn(16, requires_grad=True)
    block(x, debug=scale, policy=0.5).sum().backward()
    plain = [x.grad.clone(), scale.grad.clone()]
    for run in (partial(checkpoint_with_policy, policy=keep_matmuls), checkpoint_all):
        x.grad = scale.grad = None
        run(block, x, fn_kwargs={"debug": scale, "policy": 0.5}).sum().backward()
        assert_bitwise_equal(plain, [x.grad, scale.grad])
