"""The pinned host arena: allocated once, checked against host RAM, reused every step in stream order."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from .backend import Copy, CopyBackend
from .config import format_bytes

ALIGN = 512
"""Byte alignment of every block: keeps DMA transfers on aligned addresses."""

_MIN_CHUNK = 16 << 20
_MAX_CHUNK = 1 << 30


class HostMemoryError(RuntimeError):
    """The pinned pool needs more host RAM than the machine has available."""


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def share_note(available: Callable[[], int]) -> str:
    """`` (...)`` naming the split when ``available`` is one rank's share of its host's RAM, else ``""``."""
    ranks = getattr(available, "ranks", 1)
    return f" (this rank's share: the host's available RAM divided by its {ranks} ranks)" if ranks > 1 else ""


def available_host_bytes() -> int:
    """Host RAM available to new allocations, as psutil reports it."""
    return int(psutil.virtual_memory().available)


def reusable_pinned_bytes(stats: Mapping[str, Any]) -> int:
    """The pinned bytes torch's caching host allocator holds but has not handed out, from its
    statistics (``torch.cuda.host_memory_stats()``): blocks cached after their tensors were freed (an
    earlier offloader's pool, say). psutil counts them as used; torch hands a cached block to the next
    pinned allocation of its (power-of-two) size, without pinning more."""
    held = int(stats.get("allocated_bytes.current", 0))
    active = int(stats.get("active_bytes.current", 0))
    return max(0, held - active)


def idle_pinned_bytes() -> int:
    """:func:`reusable_pinned_bytes` of torch's caching host allocator now (0 before CUDA starts)."""
    return reusable_pinned_bytes(torch.cuda.host_memory_stats() if torch.cuda.is_initialized() else {})


@dataclass
class _Free:
    offset: int
    size: int
    last_read: Copy | None
    read_seq: int


@dataclass
class PinnedBlock:
    """A slice of the pool handed to one swapped storage; returned with :meth:`PinnedPool.free`."""

    buffer: torch.Tensor
    """The flat ``uint8`` host bytes of this block (exactly the requested size)."""
    chunk: int
    offset: int
    size: int
    reuse_after: Copy | None
    """The last copy that read this memory in an earlier use: a new write must wait for it."""
    last_read: Copy | None = None
    read_seq: int = -1


@dataclass
class _Chunk:
    buffer: torch.Tensor
    free: list[_Free] = field(default_factory=list)


class PinnedPool:
    """A pinned host arena that the swap engine allocates once and reuses every step.

    Blocks are handed out first-fit and coalesced when freed. A block remembers the last host->device copy
    that read it, and the next device->host copy into that memory is ordered after it (a stream wait, never
    a host wait). The pool grows in power-of-two chunks (torch's pinned allocator rounds to powers of two,
    so other sizes would waste host RAM), checks host RAM before each growth, and never frees a chunk
    while training: once the first step has sized it, no step allocates pinned memory again.

    Args:
        backend: allocates the host chunks (pinned on CUDA).
        reserve_bytes: host RAM to leave free for the rest of the process.
        fixed_bytes: allocate this much up front and never grow (``allocate`` then returns ``None`` when
            full); ``None`` grows on demand.
        available: returns the host RAM available now (default: psutil).
        reusable: returns the pinned bytes torch's caching host allocator holds idle
            (:func:`idle_pinned_bytes`); at each growth up to one chunk of them, and no more than
            ``reserve_bytes``, counts as available.

    Raises:
        HostMemoryError: when a growth (or the up-front reservation) would not leave ``reserve_bytes``
            of host RAM free. The message names the sizes.
    """

    def __init__(
        self,
        backend: CopyBackend,
        *,
        reserve_bytes: int = 2 << 30,
        fixed_bytes: int | None = None,
        available: Callable[[], int] = available_host_bytes,
        reusable: Callable[[], int] = idle_pinned_bytes,
    ) -> None:
        self._backend = backend
        self._reserve = reserve_bytes
        self._available = available
        self._reusable = reusable
        self._chunks: list[_Chunk] = []
        self._lock = threading.Lock()
        self._returned: deque[PinnedBlock] = deque()
        self._seq = 0
        self.capacity = 0
        """Bytes of host memory the pool holds."""
        self.in_use = 0
        """Bytes handed out to live blocks (may lag blocks returned from other threads: see
        :meth:`usage`)."""
        self.peak_in_use = 0
        """The most bytes ever handed out at once."""
        self.fixed = fixed_bytes is not None
        if fixed_bytes is not None:
            self._check_host_ram(fixed_bytes)
            remaining = fixed_bytes
            while remaining > 0:
                size = _round_up(min(remaining, _MAX_CHUNK), ALIGN)
                self._add_chunk(size)
                remaining -= size

    # -- growth ------------------------------------------------------------------------------------
    def _check_host_ram(self, nbytes: int) -> None:
        # An idle cached pinned block of this chunk's size would be taken back without pinning more (the
        # pool grows in power-of-two chunks, as a pool created anew each step grew the step before), so
        # idle cached bytes count, up to one chunk and up to ``reserve_bytes``: which sizes are cached
        # torch does not say, and if none fits the chunk pins new memory, which then still fits in what
        # psutil reports free (eating into the reserve, never past it).
        available = self._available() + self._reusable_for(nbytes)
        if nbytes > available - self._reserve:
            raise HostMemoryError(
                f"deltaswap needs {format_bytes(nbytes)} more pinned host memory (pool so far: "
                f"{format_bytes(self.capacity)}), but only {format_bytes(available)} of host RAM is "
                f"available{share_note(self._available)} and {format_bytes(self._reserve)} must stay free "
                f"(host_ram_reserve). Lower "
                f"the batch size, swap fewer tensors (raise min_bytes), set pinned_bytes to a size that "
                f"fits, or free host memory."
            )

    def _reusable_for(self, nbytes: int) -> int:
        return min(nbytes, self._reserve, self._reusable())

    def _add_chunk(self, size: int) -> None:
        buffer = self._backend.alloc_host(size)
        self._chunks.append(_Chunk(buffer, [_Free(0, size, None, -1)]))
        self.capacity += size

    def _grow(self, need: int) -> None:
        size = _pow2_ceil(max(need, _MIN_CHUNK, min(self.capacity, _MAX_CHUNK)))
        if size > need and size > self._available() + self._reusable_for(size) - self._reserve:
            size = _pow2_ceil(need)  # a smaller chunk may still fit
        self._check_host_ram(size)
        self._add_chunk(size)

    # -- allocation --------------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> PinnedBlock | None:
        """A block of at least ``nbytes``; grows the pool if needed. ``None`` if a fixed pool is full."""
        size = _round_up(max(nbytes, 1), ALIGN)
        with self._lock:
            self._merge_returned()
            block = self._take(size)
            if block is None and not self.fixed:
                self._grow(size)
                block = self._take(size)
            if block is None:
                return None
            self.in_use += block.size
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        block.buffer = block.buffer[:nbytes]
        return block

    def _take(self, size: int) -> PinnedBlock | None:
        for index, chunk in enumerate(self._chunks):
            for i, region in enumerate(chunk.free):
                if region.size < size:
                    continue
                block = PinnedBlock(
                    buffer=chunk.buffer[region.offset : region.offset + size],
                    chunk=index,
                    offset=region.offset,
                    size=size,
                    reuse_after=region.last_read,
                )
                if region.size == size:
                    del chunk.free[i]
                else:
                    region.offset += size
                    region.size -= size
                return block
        return None

    def note_read(self, block: PinnedBlock, copy: Copy) -> None:
        """Record that ``copy`` (a host->device copy) reads ``block``; reuse of its memory waits for it."""
        with self._lock:
            self._seq += 1
            block.last_read, block.read_seq = copy, self._seq

    def free(self, block: PinnedBlock) -> None:
        """Return ``block``. Its memory is reused only after the last copy that read it.

        Safe from any thread and from a finalizer that the garbage collector runs while this thread holds
        the pool's lock: the block is queued, and merged back by whichever call takes the lock next.
        """
        self._returned.append(block)
        if self._lock.acquire(blocking=False):
            try:
                self._merge_returned()
            finally:
                self._lock.release()

    def usage(self) -> tuple[int, int]:
        """``(bytes in use, bytes held)`` now, after merging blocks returned from other threads."""
        with self._lock:
            self._merge_returned()
            return self.in_use, self.capacity

    def _merge_returned(self) -> None:
        """Merge queued blocks back into their chunks' free lists. Call with the lock held."""
        while self._returned:
            block = self._returned.popleft()
            last_read, seq = block.last_read, block.read_seq
            if last_read is None:  # never read back: its own write is ordered on the D2H stream
                last_read, seq = block.reuse_after, -1
            self.in_use -= block.size
            free = self._chunks[block.chunk].free
            free.append(_Free(block.offset, block.size, last_read, seq))
            free.sort(key=lambda region: region.offset)
            merged: list[_Free] = []
            for region in free:
                prev = merged[-1] if merged else None
                if prev is not None and prev.offset + prev.size == region.offset:
                    prev.size += region.size
                    if region.read_seq > prev.read_seq:
                        prev.last_read, prev.read_seq = region.last_read, region.read_seq
                else:
                    merged.append(region)
            self._chunks[block.chunk].free = merged

    def release(self) -> None:
        """Drop every chunk. Only for when no block is in use (end of training)."""
        with self._lock:
            self._merge_returned()
            if self.in_use:
                in_use = format_bytes(self.in_use)
                raise RuntimeError(f"cannot release the pinned pool: {in_use} still in use")
            self._chunks.clear()
            self.capacity = 0


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
