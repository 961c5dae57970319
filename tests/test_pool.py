"""The pinned pool's accounting: allocate once, reuse in stream order, check host RAM before growing."""

from __future__ import annotations

import pytest
import torch

from deltaswap.swap import Copy, HostMemoryError, PinnedPool, SyncCopyBackend
from deltaswap.swap.pool import ALIGN, reusable_pinned_bytes

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


def test_idle_cached_pinned_memory_counts_up_to_one_chunk_and_the_reserve() -> None:
    # an earlier offloader's pool, freed: torch keeps it pinned (psutil counts it as used) and hands a
    # block to the next pinned allocation of its size; which sizes it holds it does not say, so a growth
    # counts at most one chunk of it, and no more than the reserve: a miss still fits what psutil reports
    pool = PinnedPool(SyncCopyBackend(), reserve_bytes=2 * GiB, available=lambda: 3 * GiB,
                      reusable=lambda: 6 * GiB)
    pool._check_host_ram(3 * GiB)  # 3 GiB free + up to 2 GiB taken back, 2 GiB reserved
    with pytest.raises(HostMemoryError):
        pool._check_host_ram(4 * GiB)  # 6 GiB idle, but a miss would pin past the 3 GiB free
    bare = PinnedPool(SyncCopyBackend(), reserve_bytes=2 * GiB, available=lambda: 3 * GiB,
                      reusable=lambda: 0)
    bare._check_host_ram(GiB)
    with pytest.raises(HostMemoryError):
        bare._check_host_ram(2 * GiB)  # nothing cached: psutil's figure alone
