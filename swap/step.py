"""One forward pass under the swap engine, and the backward pass(es) that consume what it saved."""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .backend import CopyBackend
from .config import OffloadConfig
from .pool import ALIGN, PinnedPool
from .saved import KeptTensor, SwappedStorage, SwappedTensor
from .stats import StepCounters

Saved = KeptTensor | SwappedTensor


def held_elsewhere(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter, a user leaf that requires grad, or a view of one (``weight.t()``
    in a linear layer; under FSDP, the views of its gathered flat parameter): saved, it holds no memory
    of its own, and swapping it would move bytes and free none."""
    base = tensor if tensor._base is None else tensor._base
    return isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)


class OffloadStep:
    """The pack and unpack hooks of one step.

    ``pack`` runs in the forward pass for every tensor autograd saves: it keeps parameters, tensors that
    are not on the backend's device, small and unusual tensors, and copies the rest to the pinned pool on
    the device->host stream (one copy per storage, views rebuilt on unpack). It never waits on the device.

    ``unpack`` runs in the backward pass. The backward's progress is measured in bytes of saved tensors
    (each saved tensor has a position: the bytes saved before it); every unpack starts the host->device
    copies of all swapped storages within ``prefetch_lookahead`` bytes ahead, then makes the compute stream
    wait (a stream wait) for the one it returns.
    """

    def __init__(
        self,
        config: OffloadConfig,
        backend: CopyBackend,
        pool: PinnedPool,
        *,
        swap_enabled: Callable[[], bool],
        on_pool_full: Callable[[], None],
    ) -> None:
        self.config = config
        self.counters = StepCounters()
        self.cursor = 0
        """Bytes of activations saved so far (the position of the next saved tensor)."""
        self._backend = backend
        self._pool = pool
        self._swap_enabled = swap_enabled
        self._on_pool_full = on_pool_full
        self._storages: list[weakref.ref[SwappedStorage]] = []
        self._by_storage: dict[StorageWeakRef, list[weakref.ref[SwappedStorage]]] = {}
        self._inflight: deque[weakref.ref[SwappedStorage]] = deque()
        self._buffer_ptrs: set[int] = set()
        self._next_prefetch: int | None = None
        self._progress = 0
        self._lookahead = 0

    # -- forward ----------------------------------------------------------------------------------
    def note_module(self, module: torch.nn.Module, *_: object) -> None:
        """A module is about to run its forward: its buffers, like its parameters, are kept if saved."""
        for buffer in module._buffers.values():
            if buffer is not None:
                self._buffer_ptrs.add(buffer.data_ptr())

    def note_buffers(self, buffers: list[torch.Tensor]) -> None:
        """These module buffers, like parameters, are kept if saved."""
        self._buffer_ptrs.update(b.data_ptr() for b in buffers)

    def pack(self, tensor: torch.Tensor, *, force: bool = False) -> Saved:
        """Keep or swap one saved tensor; ``force`` swaps it even where swapping is switched off."""
        position = self.cursor
        nbytes = tensor.numel() * tensor.element_size()
        # Free what has been copied out so far, kept tensors or not: a swapped block followed by kept
        # (or checkpointed) ones must not hold its device bytes until the forward ends.
        self._reap()
        base = tensor if tensor._base is None else tensor._base
        # module buffers and their views, like parameters, are held elsewhere anyway
        buffer = base.is_leaf and base.data_ptr() in self._buffer_ptrs
        is_activation = not (held_elsewhere(tensor) or buffer)
        if not (is_activation and self._swappable(tensor, nbytes) and (force or self._swap_enabled())):
            return self._keep(tensor, position, nbytes if is_activation else 0)
        storage = tensor.untyped_storage()
        esz = tensor.element_size()
        begin = tensor.storage_offset() * esz
        end = begin + (1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))) * esz
        version = tensor._version
        key = StorageWeakRef(storage)  # identity: the dict's key keeps the address from being reused
        ptr = storage.data_ptr()
        for ref in self._by_storage.get(key, ()):
            host = ref()
            if host is not None and host.covers(ptr, begin, end, esz, version):
                self.counters.bytes_deduplicated += nbytes
                return SwappedTensor(tensor, host, position)
        total = storage.nbytes()
        start, stop = (0, total) if 2 * (end - begin) >= total else (begin - begin % ALIGN, end)
        block = self._pool.allocate(stop - start)
        if block is None:
            self.counters.bytes_kept_pool_full += nbytes
            self._on_pool_full()
            return self._keep(tensor, position, nbytes)
        source = torch.empty(0, dtype=torch.uint8, device=tensor.device)
        source.set_(storage, start, (stop - start,), (1,))
        host = SwappedStorage(
            origin=tensor,
            source=source,
            block=block,
            start=start,
            version=version,
            position=position,
            backend=self._backend,
            pool=self._pool,
            counters=self.counters,
        )
        ref = weakref.ref(host)
        self._storages.append(ref)
        self._by_storage.setdefault(key, []).append(ref)
        self._inflight.append(ref)
        self.cursor += stop - start
        return SwappedTensor(tensor, host, position)

    def _swappable(self, tensor: torch.Tensor, nbytes: int) -> bool:
        return (
            type(tensor) is torch.Tensor
            and tensor.layout == torch.strided
            and not tensor.is_nested
            and not tensor.is_conj()  # a lazy conjugate or negation is a flag on the view,
            and not tensor.is_neg()  # which rebuilding from bytes would drop
            and nbytes > 0
            and nbytes >= self.config.min_bytes
            and self._backend.accepts(tensor)
        )

    def _keep(self, tensor: torch.Tensor, position: int, activation_bytes: int) -> KeptTensor:
        self.counters.tensors_kept += 1
        self.counters.bytes_kept += activation_bytes
        self.cursor += activation_bytes
        return KeptTensor(tensor, position)

    def _reap(self) -> None:
        """Stop watching the storages whose copy to host has finished (in stream order), after a last look
        for in-place writes. Those still being copied need no look now: version counters only grow, and
        their last look (here, or when the forward ends) sees any write made before it. (Their device bytes
        are already the allocator's: see :class:`~deltaswap.swap.saved.SwappedStorage`.)"""
        while self._inflight:
            host = self._inflight[0]()
            if host is not None and not host.finish_if_copied():
                break
            self._inflight.popleft()

    def close_forward(self) -> None:
        """The forward pass is over: a last look at the storages still being copied; count their bytes."""
        self._reap()
        for ref in self._inflight:
            host = ref()
            if host is not None:
                self.counters.inflight_bytes_at_exit += host.nbytes
                host.stop_watching()
        self._inflight.clear()
        self._by_storage.clear()
        self._buffer_ptrs.clear()

    # -- stored op outputs (checkpoint_with_policy) -------------------------------------------------
    def keep(self, tensor: torch.Tensor) -> KeptTensor:
        """Hold an op output on its device, counted as activation bytes and backward progress."""
        self._reap()
        return self._keep(tensor, self.cursor, tensor.numel() * tensor.element_size())

    def swap(self, tensor: torch.Tensor) -> Saved:
        """Swap an op output like a saved tensor (kept if it cannot be swapped)."""
        return self.pack(tensor, force=True)

    # -- backward ---------------------------------------------------------------------------------
    def unpack(self, saved: Saved) -> torch.Tensor:
        self._advance(saved.position)
        return saved.unpack()

    def _advance(self, position: int) -> None:
        if self._next_prefetch is None:  # the first unpack of this step
            self._next_prefetch = len(self._storages) - 1
            self._lookahead = self.config.lookahead_bytes(self.cursor)
            self._progress = position
        self._progress = min(self._progress, position)
        limit = self._progress - self._lookahead
        while self._next_prefetch >= 0:
            host = self._storages[self._next_prefetch]()
            if host is not None:
                if host.position < limit:
                    return
                host.prefetch()
            self._next_prefetch -= 1
