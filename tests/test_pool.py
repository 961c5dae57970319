"""The pinned pool's accounting: allocate once, reuse in stream order, check host RAM before growing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deltaswap.swap import Copy, HostMemoryError, PinnedPool, SyncCopyBackend
from deltaswap.swap import pool as pool_module
from deltaswap.swap.pool import ALIGN, available_host_bytes, reusable_pinned_bytes

GiB = 1 << 30


class CountingBackend(SyncCopyBackend):
    """Records every host allocation the pool makes."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[int] = []

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        self.allocations.append(nbytes)
        return super().alloc_host(nbytes)


def plenty() -> int:
    return 64 * GiB


def test_blocks_are_aligned_and_returned() -> None:
    backend = CountingBackend()
    pool = PinnedPool(backend, reserve_bytes=0, available=plenty)
    a = pool.allocate(1000)
    b = pool.allocate(3000)
    assert a is not None and b is not None
    assert a.buffer.numel() == 1000 and b.buffer.numel() == 3000
    assert a.offset % ALIGN == 0 and b.offset % ALIGN == 0
    assert a.buffer.data_ptr() + a.size <= b.buffer.data_ptr()
    assert pool.in_use == a.size + b.size
    pool.free(a)
    pool.free(b)
    assert pool.in_use == 0
    assert pool.peak_in_use == a.size + b.size


def test_pool_is_allocated_once_and_reused_every_step() -> None:
    backend = CountingBackend()
    pool = PinnedPool(backend, reserve_bytes=0, available=plenty)
    sizes = [5 << 20, 7 << 20, 1 << 20, 9 << 20]
    first_step: list[int] = []
    for step in range(20):
        blocks = [pool.allocate(n) for n in sizes]
        for block in reversed(blocks):
            assert block is not None
            pool.free(block)
        if step == 0:
            first_step = list(backend.allocations)
    assert backend.allocations == first_step, "the steady state must not allocate host memory"
    assert pool.capacity == sum(first_step) < 2 * sum(sizes)
    assert all(n & (n - 1) == 0 for n in first_step), "chunks are powers of two (torch rounds pinned sizes)"


def test_reuse_waits_for_the_last_read_of_the_memory() -> None:
    pool = PinnedPool(SyncCopyBackend(), reserve_bytes=0, available=plenty)
    a = pool.allocate(4096)
    b = pool.allocate(4096)
    assert a is not None and b is not None
    read_a, read_b = Copy(4096, 0, 1), Copy(4096, 2, 3)
    pool.note_read(a, read_a)
    pool.note_read(b, read_b)  # issued later on the same stream
    pool.free(b)
    pool.free(a)
    c = pool.allocate(8192)  # spans both freed blocks: must wait for the later read
    assert c is not None and c.offset == a.offset
    assert c.reuse_after is read_b


def test_never_read_block_keeps_its_earlier_ordering() -> None:
    pool = PinnedPool(SyncCopyBackend(), reserve_bytes=0, available=plenty)
    a = pool.allocate(4096)
    assert a is not None
    read = Copy(4096, 0, 1)
    pool.note_read(a, read)
    pool.free(a)
    again = pool.allocate(4096)
    assert again is not None and again.reuse_after is read
    pool.free(again)  # never read in this use
    third = pool.allocate(4096)
    assert third is not None and third.reuse_after is read


def test_growth_that_does_not_fit_host_ram_names_the_sizes() -> None:
    backend = CountingBackend()
    pool = PinnedPool(backend, reserve_bytes=1 * GiB, available=lambda: 3 * GiB)
    with pytest.raises(HostMemoryError) as info:
        pool.allocate(5 * GiB)
    message = str(info.value)
    assert "8.00 GiB more pinned host memory" in message  # 5 GiB rounded to the chunk's power of two
    assert "3.00 GiB of host RAM is available" in message
    assert "1.00 GiB must stay free" in message
    assert "batch size" in message and "pinned_bytes" in message
    assert backend.allocations == [], "nothing may be allocated when the check fails"


def test_growth_falls_back_to_an_exact_power_of_two_chunk() -> None:
    backend = CountingBackend()
    pool = PinnedPool(backend, reserve_bytes=0, available=lambda: 40 << 20)
    assert pool.allocate(30 << 20) is not None
    assert backend.allocations == [32 << 20]


def test_fixed_pool_is_checked_and_allocated_up_front() -> None:
    backend = CountingBackend()
    with pytest.raises(HostMemoryError, match=r"16\.00 GiB more pinned host memory"):
        PinnedPool(backend, reserve_bytes=GiB, fixed_bytes=16 * GiB, available=lambda: 8 * GiB)
    assert backend.allocations == []
    pool = PinnedPool(backend, reserve_bytes=0, fixed_bytes=1 << 20, available=plenty)
    assert backend.allocations == [1 << 20]
    block = pool.allocate(1 << 19)
    assert block is not None
    assert pool.allocate(1 << 20) is None, "a full fixed pool does not grow"
    pool.free(block)
    assert pool.allocate(1 << 20) is not None


def test_release_refuses_while_blocks_are_in_use() -> None:
    pool = PinnedPool(SyncCopyBackend(), reserve_bytes=0, available=plenty)
    block = pool.allocate(100)
    assert block is not None
    with pytest.raises(RuntimeError, match="still in use"):
        pool.release()
    pool.free(block)
    pool.release()
    assert pool.capacity == 0


# -- host RAM that torch's caching host allocator holds ------------------------------------------------------
def test_idle_cached_pinned_memory_is_reusable() -> None:
    stats = {"allocated_bytes.current": 3 * GiB, "active_bytes.current": GiB}  # 2 GiB cached, idle
    assert reusable_pinned_bytes(stats) == 2 * GiB
    assert reusable_pinned_bytes({}) == 0  # CUDA not initialized: nothing cached
    assert reusable_pinned_bytes({"allocated_bytes.current": GiB, "active_bytes.current": GiB}) == 0


def test_available_host_ram_counts_pinned_memory_torch_can_hand_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # an earlier offloader's 6 GiB pool, freed: torch keeps it pinned (psutil counts it as used) and hands
    # it to the next pinned allocation of its size, so a new pool of that size needs no more host RAM
    cached = {"allocated_bytes.current": 8 * GiB, "active_bytes.current": 2 * GiB}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: cached)
    monkeypatch.setattr(pool_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * GiB))
    assert available_host_bytes() == 9 * GiB
    pool = PinnedPool(SyncCopyBackend(), reserve_bytes=2 * GiB)  # the default check: 6 GiB fits in 9 - 2
    pool._check_host_ram(6 * GiB)
    with pytest.raises(HostMemoryError):
        pool._check_host_ram(8 * GiB)
