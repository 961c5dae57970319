"""The engine on a real GPU: bitwise-equal gradients, no host sync in the forward, races under stretched
kernels and PCIe contention, memory really released, pinned memory flat. Run on the device machine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationOffloader, CudaCopyBackend, OffloadConfig

from gpt import GPT
from helpers import assert_bitwise_equal
from helpers import small_cuda_gpt as small_gpt

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda")]

ALL = OffloadConfig(min_bytes=0)
SLEEP = 200_000  # GPU cycles: ~0.1 ms, long next to the small kernels of the test model
RACE_REPS = int(os.environ.get("DELTASWAP_RACE_REPS", "3"))
"""Repetitions of each race test (3 back-to-back steps each); the reliability run sets 100."""


def step(
    model: nn.Module,
    batch: tuple[torch.Tensor, ...],
    ctx: contextlib.AbstractContextManager,
    *,
    autocast: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with ctx, torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(*batch)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "dropout"])
def test_gradients_bitwise_equal(autocast: bool, dropout: float) -> None:
    model, batch = small_gpt(dropout)
    plain = step(model, batch, contextlib.nullcontext(), autocast=autocast)
    off = ActivationOffloader(ALL)
    for seed_run in range(2):  # the second step reuses the pool
        assert_bitwise_equal(plain, step(model, batch, off, autocast=autocast))
        stats = off.stats
        assert stats.bytes_offloaded > 10 << 20, seed_run
        assert stats.bytes_prefetched == stats.bytes_offloaded
        assert stats.d2h_gbps > 1 and stats.h2d_gbps > 1
        assert stats.pinned_bytes_in_use == 0


def test_forward_never_synchronizes_the_host() -> None:
    model, batch = small_gpt(0.1)
    off = ActivationOffloader(ALL)
    for i in range(3):  # the first step sizes the pool, later ones reuse it
        model.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with off, torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()
        assert off.stats.tensors_offloaded > 0, i


class Stretch:
    """Injects ``torch.cuda._sleep`` on the compute and copy streams around every block, forward and
    backward, so that every missing event would let a kernel or copy read or overwrite memory early."""

    def __init__(self, model: GPT, backend: CudaCopyBackend, where: set[str]) -> None:
        self.handles = []
        self.backend = backend
        for block in model.blocks:
            self.handles.append(block.register_forward_pre_hook(self.before_forward))
            self.handles.append(block.register_forward_hook(self.after_forward))
            self.handles.append(block.register_full_backward_pre_hook(self.before_backward))
        self.where = where

    def sleep_on(self, stream: torch.cuda.Stream | None) -> None:
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            torch.cuda._sleep(SLEEP)

    def before_forward(self, *_: object) -> None:
        if "compute" in self.where:  # late producers: a D2H that does not wait copies garbage
            self.sleep_on(None)
        if "d2h" in self.where:  # late copies: a source freed too early is overwritten first
            self.sleep_on(self.backend.d2h_stream)

    def after_forward(self, *_: object) -> None:
        if "d2h" in self.where:
            self.sleep_on(self.backend.d2h_stream)

    def before_backward(self, *_: object) -> None:
        if "h2d" in self.where:  # late prefetch: compute must wait; pinned reuse must wait
            self.sleep_on(self.backend.h2d_stream)
        if "compute" in self.where:
            self.sleep_on(None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def pcie_contention(nbytes: int = 256 << 20) -> Iterator[None]:
    """Keep the copy engines busy with a large pinned copy on another stream while the step runs."""
    stream = torch.cuda.Stream()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(stream):
        for _ in range(4):
            host.copy_(dev, non_blocking=True)
            dev.copy_(host, non_blocking=True)
    yield
    stream.synchronize()


@pytest.mark.parametrize(
    "where",
    [{"compute"}, {"d2h"}, {"h2d"}, {"compute", "d2h", "h2d"}],
    ids=["compute", "d2h", "h2d", "all"],
)
def test_races_with_stretched_kernels(where: set[str]) -> None:
    model, batch = small_gpt(0.1)
    batches = [batch, (batch[0].flip(0), batch[1].flip(0)), (batch[0].roll(3, 1), batch[1].roll(3, 1))]
    plain = [step(model, b, contextlib.nullcontext(), autocast=True, seed=i) for i, b in enumerate(batches)]
    backend = CudaCopyBackend()
    off = ActivationOffloader(ALL, backend=backend)
    stretch = Stretch(model, backend, where)
    try:
        for rep in range(RACE_REPS):
            for i, b in enumerate(batches):  # back to back: pinned blocks are reused across steps
                with pcie_contention():
                    grads = step(model, b, off, autocast=True, seed=i)
                assert_bitwise_equal(plain[i], grads)
                assert off.stats.tensors_offloaded > 0, (rep, i)
    finally:
        stretch.remove()


def test_retain_graph_and_inplace_check_on_gpu() -> None:
    model, batch = small_gpt(0.1)

    def twice(ctx: contextlib.AbstractContextManager) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with ctx:
            loss = model(*batch)
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters()]
        loss.backward()
        return first + [p.grad.clone() for p in model.parameters()]

    off = ActivationOffloader(ALL)
    assert_bitwise_equal(twice(contextlib.nullcontext()), twice(off))

    a = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    with off:
        h = a.exp()
        loss = h.sum()
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def mlp_stack(width: int = 2048, depth: int = 8) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).cuda()


def held_after_forward(model: nn.Module, x: torch.Tensor, ctx_factory: Callable[[], object]) -> int:
    """GPU bytes still held once the forward is over and the copy stream has drained."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with ctx_factory():  # type: ignore[attr-defined]
        loss = model(x).sum()
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # let the allocator process the copy streams' events
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    return held


def test_activation_memory_really_drops() -> None:
    torch.manual_seed(0)
    model = mlp_stack()
    x = torch.randn(4096, 2048, device="cuda")  # every saved activation is 32 MiB, above min_bytes
    plain = held_after_forward(model, x, contextlib.nullcontext)
    off = ActivationOffloader(OffloadConfig(min_bytes="1MiB"))
    held_after_forward(model, x, lambda: off)  # first step sizes the pool
    swapped = held_after_forward(model, x, lambda: off)
    assert plain >= 8 * (32 << 20), "eight ReLU outputs of 32 MiB are saved without the engine"
    assert swapped <= 0.10 * plain, (swapped, plain)
    assert off.stats.tensors_offloaded >= 8
    assert off.stats.bytes_kept == 0, "only weights are kept, and they are not activations"


def test_pinned_memory_stays_flat_over_50_steps() -> None:
    model, batch = small_gpt(0.1)
    off = ActivationOffloader(ALL)
    reserved, in_use = [], []
    for i in range(52):
        step(model, batch, off, autocast=True, seed=i)
        reserved.append(off.stats.pinned_bytes_reserved)
        in_use.append(off.stats.pinned_bytes_in_use)
    assert len(set(reserved[2:])) == 1, reserved
    assert set(in_use) == {0}
    assert reserved[-1] > 0


def test_prefetched_but_unused_copies_do_not_corrupt_later_steps() -> None:
    """Copies brought back but never used (a partial backward, then the graph is dropped) must finish
    before their memory is reused."""
    model, batch = small_gpt(0.1)
    plain = step(model, batch, contextlib.nullcontext(), autocast=True)
    backend = CudaCopyBackend()
    off = ActivationOffloader(OffloadConfig(min_bytes=0, prefetch_lookahead=1.0), backend=backend)
    outputs: list[torch.Tensor] = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        for _ in range(3):
            outputs.clear()
            with off, torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(*batch)
            with torch.cuda.stream(backend.h2d_stream):
                torch.cuda._sleep(50 * SLEEP)  # every prefetch lands late
            torch.autograd.grad(loss, outputs[0])  # only the head runs: most prefetches go unused
            del loss
            outputs.clear()
            assert_bitwise_equal(plain, step(model, batch, off, autocast=True))
    finally:
        hook.remove()
