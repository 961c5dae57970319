"""The engine's bookkeeping on CPU, through SyncCopyBackend: what is swapped, dedup, views, lookahead,
retain_graph, in-place checks, pool reuse, and the no-CUDA fallback."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules import module as module_hooks

from deltaswap.swap import ActivationOffloader, OffloadConfig, SyncCopyBackend, offload_activations

from gpt import GPT, GPTConfig, random_batch
from helpers import assert_bitwise_equal

ALL = OffloadConfig(min_bytes=0)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def run_step(model: nn.Module, batch: tuple[torch.Tensor, ...], ctx: contextlib.AbstractContextManager,
             seed: int = 0) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with ctx:
        loss = model(*batch)
    loss.backward()
    return grads_of(model)


@pytest.fixture
def gpt() -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=32, n_layer=3, n_head=4, d_model=64, dropout=0.1)
    return GPT(cfg), random_batch(cfg, 4, "cpu", torch.Generator().manual_seed(1))


def test_gpt_gradients_bitwise_equal_with_dropout(gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]]) -> None:
    model, batch = gpt
    plain = run_step(model, batch, contextlib.nullcontext())
    backend = SyncCopyBackend()
    off = ActivationOffloader(ALL, backend=backend)
    assert_bitwise_equal(plain, run_step(model, batch, off))
    stats = off.stats
    assert stats.tensors_offloaded > 10
    assert stats.bytes_offloaded == sum(n for d, n in backend.trace if d == "d2h")
    assert stats.bytes_prefetched == stats.bytes_offloaded, "every swapped byte comes back exactly once"
    assert stats.pinned_bytes_in_use == 0, "all pinned blocks are back in the pool after backward"


def test_parameters_leaves_and_small_tensors_are_kept() -> None:
    lin = nn.Linear(32, 32, bias=False)
    x = torch.randn(8, 32, requires_grad=True)

    def step(min_bytes: int) -> ActivationOffloader:
        off = ActivationOffloader(OffloadConfig(min_bytes=min_bytes), backend=SyncCopyBackend())
        with off:
            loss = lin(x).exp().sum()  # mm saves x and the weight; exp saves its result
        loss.backward()
        return off

    off = step(0)
    assert off.stats.tensors_kept == 2, "the weight (a Parameter) and x (a leaf that requires grad)"
    assert off.stats.bytes_kept == 0, "parameters and user leaves are not activation memory"
    assert off.stats.tensors_offloaded == 1 and off.stats.bytes_offloaded == 8 * 32 * 4
    off = step(8 * 32 * 4 + 1)  # now exp's result is below min_bytes
    assert off.stats.tensors_offloaded == 0
    assert off.stats.tensors_kept == 3 and off.stats.bytes_kept == 8 * 32 * 4


@pytest.mark.parametrize("named", [False, True], ids=["found-as-modules-run", "named-for-the-step"])
def test_module_buffers_are_kept(named: bool) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.register_buffer("scale", torch.rand(32, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale  # mul saves the buffer (for the input's gradient)

    model = Scaled()
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    if named:
        off.note_buffers(model.buffers())
    global_hooks = module_hooks._global_forward_pre_hooks
    before = len(global_hooks)
    with off:
        during = len(global_hooks)
        loss = model(torch.randn(32, 64)).sum()
    loss.backward()
    # mul saves the buffer (for its other input's gradient); the linear saves x (for the weight's)
    assert off.stats.tensors_kept == 1, "the buffer is held by the module: swapping it frees nothing"
    assert off.stats.tensors_offloaded == 1
    # named, no hook runs at every module call; else one, and it is gone after the step
    assert during - before == (0 if named else 1) and len(global_hooks) == before


def test_buffers_named_for_one_step_only() -> None:
    buffer = torch.rand(32, 64)
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    x = torch.randn(32, 64, requires_grad=True)
    # mul saves the buffer (for x's gradient); the next step, not named and run by no module, swaps it
    for named, kept in ((True, 1), (False, 0)):
        if named:
            off.note_buffers([buffer])
        with off:
            loss = (x * buffer).sum()
        loss.backward()
        assert (off.stats.tensors_kept, off.stats.tensors_offloaded) == (kept, 1 - kept)


def test_memory_is_actually_released_in_the_forward() -> None:
    lin = nn.Linear(256, 256)
    refs: list[StorageWeakRef] = []

    def forward(ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        refs.clear()
        x = torch.randn(64, 256)
        with ctx:
            h = x
            for _ in range(4):
                h = torch.tanh(lin(h))  # tanh saves its result
                refs.append(StorageWeakRef(h.untyped_storage()))
            loss = h.sum()
        return loss

    loss = forward(contextlib.nullcontext())
    gc.collect()
    assert not any(r.expired() for r in refs), "without the engine autograd holds the activations"
    loss.backward()
    loss = forward(ActivationOffloader(ALL, backend=SyncCopyBackend()))
    gc.collect()
    assert all(r.expired() for r in refs), "with the engine the device memory is freed after its copy"
    loss.backward()


def test_a_storage_saved_twice_is_copied_once() -> None:
    a = torch.randn(128, 128, requires_grad=True)
    backend = SyncCopyBackend()
    off = ActivationOffloader(ALL, backend=backend)
    with off:
        x = a.exp()  # saves its result x
        y = x * x  # saves x twice
        loss = y.sum()
    loss.backward()
    x_bytes = 128 * 128 * 4
    assert off.stats.bytes_offloaded == x_bytes
    assert off.stats.tensors_offloaded == 1
    assert off.stats.bytes_deduplicated == 2 * x_bytes
    expected = 2 * a.detach().exp() ** 2  # d/da exp(a)^2
    torch.testing.assert_close(a.grad, expected)


def views_loss(a: torch.Tensor) -> torch.Tensor:
    h = a.exp()  # (64, 96)
    q, k, v = h.split(32, dim=1)  # strided views of one storage
    scores = (q @ k.t()).softmax(-1)
    narrow = h[:2]  # a small contiguous view: a byte range of the storage
    wide = h.t()[::3]  # a transposed, stepped view
    return (scores @ v).sum() + (narrow * narrow).sum() + (wide.sin()).sum()


def test_views_are_rebuilt_exactly() -> None:
    torch.manual_seed(0)
    a = torch.randn(64, 96, requires_grad=True)
    views_loss(a).backward()
    plain = a.grad.clone()
    a.grad = None
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    with off:
        loss = views_loss(a)
    loss.backward()
    assert torch.equal(a.grad, plain)
    assert off.stats.bytes_deduplicated > 0


def test_a_small_view_copies_only_its_byte_range() -> None:
    a = torch.randn(1024, 256, requires_grad=True)

    def loss_of(ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        a.grad = None
        with ctx:
            h = a * 2  # saves nothing for a scalar factor
            loss = h[:4].sin().sum()  # sin saves a 4-row view of h's 1 MiB storage
        loss.backward()
        return a.grad.clone()

    plain = loss_of(contextlib.nullcontext())
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    assert torch.equal(loss_of(off), plain)
    assert off.stats.bytes_offloaded == 4 * 256 * 4, "only the view's byte range crosses PCIe"


def test_retain_graph_and_a_second_backward(gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]]) -> None:
    model, batch = gpt

    def twice(ctx: contextlib.AbstractContextManager) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with ctx:
            loss = model(*batch)
        loss.backward(retain_graph=True)
        first = grads_of(model)
        loss.backward()
        return first + grads_of(model)

    plain = twice(contextlib.nullcontext())
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    assert_bitwise_equal(plain, twice(off))
    assert off.stats.pinned_bytes_in_use == 0


def test_two_forward_graphs_alive_at_once(gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Gradient accumulation over two forwards before one backward: the second step must not overwrite
    the first step's host copies."""
    model, (x, y) = gpt

    def accumulate(ctx_factory: Callable[[], contextlib.AbstractContextManager]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with ctx_factory():
            l1 = model(x, y)
        with ctx_factory():
            l2 = model(x.flip(0), y.flip(0))
        (l1 + 0.5 * l2).backward()
        return grads_of(model)

    plain = accumulate(contextlib.nullcontext)
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    assert_bitwise_equal(plain, accumulate(lambda: off))


@pytest.mark.parametrize("min_bytes", [0, 1 << 40], ids=["swapped", "kept"])
def test_inplace_change_after_forward_raises_like_pytorch(min_bytes: int) -> None:
    a = torch.randn(64, 64, requires_grad=True)

    def forward_then_mutate(ctx: contextlib.AbstractContextManager) -> str:
        with ctx:
            h = a.exp()  # exp saves its result
            loss = h.sum()
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss.backward()
        return str(info.value)

    plain = forward_then_mutate(contextlib.nullcontext())
    off = ActivationOffloader(OffloadConfig(min_bytes=min_bytes), backend=SyncCopyBackend())
    ours = forward_then_mutate(off)
    for message in (plain, ours):
        assert "[torch.FloatTensor [64, 64]], which is output 0 of Exp" in message
        assert "is at version 1; expected version 0 instead" in message


def test_inplace_change_of_a_parameter_before_backward_raises() -> None:
    lin = nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)  # so that the weight is saved for x's gradient

    def forward_then_step(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            loss = lin(x).pow(2).sum()
        with torch.no_grad():
            lin.weight.mul_(0.5)  # e.g. optimizer.step() before backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

    forward_then_step(contextlib.nullcontext())
    forward_then_step(ActivationOffloader(ALL, backend=SyncCopyBackend()))


def test_prefetch_runs_lookahead_bytes_ahead_of_the_backward() -> None:
    n, width = 8, 128
    layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n))
    backend = SyncCopyBackend()
    for i, layer in enumerate(layers):
        layer.register_full_backward_pre_hook(lambda m, g, i=i: backend.trace.append(("bwd", i)))
    x = torch.randn(64, width, requires_grad=True)
    per_layer = 64 * width * 4  # each layer saves one new activation of this size
    off = ActivationOffloader(OffloadConfig(min_bytes=0, prefetch_lookahead=2 * per_layer), backend=backend)
    with off:
        h = x * 1.0
        for layer in layers:
            h = torch.tanh(layer(h))
        loss = h.sum()
    loss.backward()
    # When the backward enters layer i it needs the activations of layers >= i, and with a look-ahead of
    # two layers, those of i - 1 and i - 2 should be on their way; nothing below that.
    fetched = 0
    for event, value in backend.trace:
        if event == "h2d":
            fetched += 1
        elif event == "bwd":
            needed = n - value  # tanh outputs of layers > i, plus layer i's input
            assert needed <= fetched + 1 <= needed + 3, (value, fetched)
    assert fetched == off.stats.tensors_prefetched


def test_full_lookahead_prefetches_everything_at_the_first_unpack() -> None:
    backend = SyncCopyBackend()
    off = ActivationOffloader(OffloadConfig(min_bytes=0, prefetch_lookahead=1.0), backend=backend)
    a = torch.randn(32, 32, requires_grad=True)
    with off:
        h = a
        for _ in range(5):
            h = h.exp().sin()
        loss = h.sum()
    forward_copies = len(backend.trace)
    marks: list[int] = []
    sin_node = h.grad_fn
    exp_node = sin_node.next_functions[0][0]
    sin_node.register_prehook(lambda g: marks.append(len(backend.trace)))  # before the first unpack
    exp_node.register_prehook(lambda g: marks.append(len(backend.trace)))  # after it
    loss.backward()
    assert off.stats.tensors_offloaded == 5
    assert backend.trace[forward_copies:] == [("h2d", 32 * 32 * 4)] * 5
    assert marks == [forward_copies, forward_copies + 5], "all copies start at the first unpack"


def test_modules_limits_swapping_to_those_modules(gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]]) -> None:
    model, batch = gpt
    plain = run_step(model, batch, contextlib.nullcontext())
    everything = ActivationOffloader(ALL, backend=SyncCopyBackend())
    run_step(model, batch, everything)
    first = ActivationOffloader(ALL, modules=[model.blocks[0]], backend=SyncCopyBackend())
    assert_bitwise_equal(plain, run_step(model, batch, first))
    assert 0 < first.stats.bytes_offloaded < everything.stats.bytes_offloaded / 2
    assert first.stats.bytes_kept > everything.stats.bytes_kept
    assert model.blocks[0]._forward_hooks == {} and model.blocks[0]._forward_pre_hooks == {}


def test_full_fixed_pool_keeps_tensors_with_one_warning(
    gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    model, batch = gpt
    plain = run_step(model, batch, contextlib.nullcontext())
    off = ActivationOffloader(OffloadConfig(min_bytes=0, pinned_bytes="64KiB"), backend=SyncCopyBackend())
    with pytest.warns(RuntimeWarning, match="pinned pool .* is full") as record:
        grads = run_step(model, batch, off)
        run_step(model, batch, off)
    assert len([w for w in record if "is full" in str(w.message)]) == 1
    assert_bitwise_equal(plain, grads)
    assert off.stats.bytes_kept_pool_full > 0 and off.stats.bytes_offloaded > 0
    assert off.stats.pinned_bytes_reserved == 64 << 10


def test_pool_is_sized_once_and_reused(gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]]) -> None:
    model, batch = gpt
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    reserved = []
    for step in range(6):
        run_step(model, batch, off, seed=step)
        reserved.append(off.stats.pinned_bytes_reserved)
        assert off.stats.pinned_bytes_in_use == 0
    assert len(set(reserved)) == 1


def test_reentering_an_active_offloader_is_an_error() -> None:
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    with off, pytest.raises(RuntimeError, match="already active"), off:
        pass


def test_an_exception_in_the_forward_removes_the_hooks() -> None:
    backend = SyncCopyBackend()
    off = ActivationOffloader(ALL, backend=backend)
    a = torch.randn(16, 16, requires_grad=True)
    with pytest.raises(ValueError), off:
        a.exp()
        raise ValueError("boom")
    before = len(backend.trace)
    a.exp().sin().sum().backward()  # outside the context: nothing is swapped
    assert len(backend.trace) == before
    with off:  # and the offloader can be used again
        loss = a.exp().sum()
    loss.backward()
    assert off.stats.tensors_offloaded == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_without_cuda_it_warns_once_and_changes_nothing(
    gpt: tuple[GPT, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    model, batch = gpt
    plain = run_step(model, batch, contextlib.nullcontext())
    off = offload_activations(min_bytes=0)
    with pytest.warns(RuntimeWarning, match="CUDA is not available") as record:
        results = [run_step(model, batch, off) for _ in range(3)]
    assert len([w for w in record if "CUDA is not available" in str(w.message)]) == 1
    for grads in results:
        assert_bitwise_equal(plain, grads)
    assert off.stats.tensors_offloaded == 0 and off.backend is None


def test_lazy_conjugate_and_negative_views_keep_their_meaning() -> None:
    x = torch.randn(64, 64, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(64, 64, dtype=torch.complex64, requires_grad=True)

    def grads(ctx: contextlib.AbstractContextManager) -> list[torch.Tensor]:
        x.grad = w.grad = None
        with ctx:
            h = x * 2
            loss = (h.conj() * w).abs().sum() + (h.conj().imag * w.real).sum()  # conj and neg bits
        loss.backward()
        return [x.grad.clone(), w.grad.clone()]

    plain = grads(contextlib.nullcontext())
    assert_bitwise_equal(plain, grads(ActivationOffloader(ALL, backend=SyncCopyBackend())))


def test_inplace_change_through_the_base_of_a_saved_view_raises() -> None:
    a = torch.randn(256, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)

    def forward_then_mutate(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            h = a * 2
            loss = (h[:128] * w[:128]).sum()  # mul saves the temporary view h[:128]
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

    forward_then_mutate(contextlib.nullcontext())
    forward_then_mutate(ActivationOffloader(ALL, backend=SyncCopyBackend()))


def test_a_dropped_graph_frees_kept_outputs() -> None:
    """An op that saves its own output must not leave a reference cycle through the engine."""
    a = torch.randn(256, 256, requires_grad=True)
    off = ActivationOffloader(OffloadConfig(min_bytes=1 << 40), backend=SyncCopyBackend())
    with off:
        h = (a * 2).exp()  # exp saves its result, kept (below min_bytes)
        loss = h.sum()
    storage = StorageWeakRef(h.untyped_storage())
    del h, loss  # e.g. an evaluation forward with grad enabled, or an exception before backward
    assert storage.expired(), "freed by reference counting, without waiting for the cycle collector"


def test_garbage_collection_inside_the_pool_does_not_deadlock() -> None:
    """The collector may run a saved tensor's finalizer (which returns its pinned block) while the pool
    holds its lock to grow; that must not block."""

    class CollectingBackend(SyncCopyBackend):
        def alloc_host(self, nbytes: int) -> torch.Tensor:
            gc.collect()
            return super().alloc_host(nbytes)

    class Holder:
        pass

    def scenario() -> None:
        off = ActivationOffloader(ALL, backend=CollectingBackend())
        a = torch.randn(256, 256, requires_grad=True)
        with off:
            hold = Holder()
            hold.me, hold.graph = hold, (a * 2).exp()  # a graph held only by a reference cycle
            del hold
            b = (torch.randn(8 << 20, requires_grad=True) * 2).exp()  # 32 MiB: the pool grows
        b.sum().backward()
        done.append(off.stats.pinned_bytes_in_use)

    done: list[int] = []
    worker = threading.Thread(target=scenario, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "deadlocked"
    assert done == [0]


def test_swapping_can_be_switched_off_for_a_region() -> None:
    a = torch.randn(64, 64, requires_grad=True)
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    with off:
        with off.swapping(False):
            h = a.exp()  # kept
        loss = h.sin().sum()  # sin saves h again: swapped now (a new decision per save)
    loss.backward()
    assert off.stats.tensors_kept == 1 and off.stats.tensors_offloaded == 1


def test_finished_copies_free_their_device_memory_while_later_tensors_are_kept() -> None:
    """A swapped region followed by a kept one (a swapped block before checkpointed ones): the swapped
    bytes are freed during the forward, as soon as their copies finish, not when the forward ends."""
    lin = nn.Linear(256, 256)
    off = ActivationOffloader(ALL, backend=SyncCopyBackend())
    refs: list[StorageWeakRef] = []
    with off:
        h = torch.randn(64, 256)
        for _ in range(3):
            h = torch.tanh(lin(h))  # swapped
            refs.append(StorageWeakRef(h.untyped_storage()))
        h = h * 2  # saves nothing: only the swapped copies refer to the tanh outputs now
        with off.swapping(False):
            for _ in range(2):
                h = torch.tanh(lin(h))  # kept
        gc.collect()
        released_in_forward = [r.expired() for r in refs]
        loss = h.sum()
    loss.backward()
    assert off.stats.tensors_offloaded >= 3
    assert released_in_forward == [True, True, True]


class PendingCopyBackend(SyncCopyBackend):
    """Copies that the host never sees finish during the forward (a GPU far behind the host), and a
    record of the tensors handed to the allocator until their copy has read them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[StorageWeakRef] = []

    def is_done(self, copy: object) -> bool:
        return False

    def hold_until_copied(self, tensor: torch.Tensor, *, to_host: bool) -> None:
        self.held.append(StorageWeakRef(tensor.untyped_storage()))


def test_the_engine_holds_no_device_memory_while_the_host_runs_ahead_of_its_copies() -> None:
    """With the GPU behind the host, a copy's end is seen late. The engine must not hold the device
    bytes until then (they would pile up by as much as the host runs ahead): it hands them to the
    allocator, which reuses them only after the copy stream read them."""
    lin = nn.Linear(256, 256)
    backend = PendingCopyBackend()
    off = ActivationOffloader(ALL, backend=backend)
    refs: list[StorageWeakRef] = []
    with off:
        h = torch.randn(64, 256)
        for _ in range(3):
            h = torch.tanh(lin(h))  # tanh saves its result: swapped
            refs.append(StorageWeakRef(h.untyped_storage()))
        h = h * 2
        gc.collect()
        released = [r.expired() for r in refs]
        loss = h.sum()
    assert released == [True, True, True]
    held = {r.cdata for r in backend.held}
    assert all(r.cdata in held for r in refs), "each was handed to the allocator with its copy pending"
    assert off.stats.inflight_bytes_at_exit >= 3 * 64 * 256 * 4
    loss.backward()


def test_an_inplace_write_after_the_tensor_is_gone_is_still_seen_while_its_copy_is_pending() -> None:
    """The version watch holds no memory, yet sees a write made just before the tensor was freed."""
    lin = nn.Linear(256, 256)
    off = ActivationOffloader(ALL, backend=PendingCopyBackend())
    with off:
        h = torch.tanh(lin(torch.randn(64, 256)))  # saved by tanh, swapped, copy pending
        loss = (h * 3).sum()
        h.mul_(2)
        del h
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
