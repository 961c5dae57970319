"""What the engine hands autograd for each saved tensor, and the host copy of a swapped storage."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from .backend import Copy, CopyBackend
from .pool import PinnedBlock, PinnedPool

if TYPE_CHECKING:
    from .stats import StepCounters


def detach_sharing_version(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.detach()`` that shares the version counter also below autograd.

    Inside a ``TorchDispatchMode`` (where :mod:`~deltaswap.swap.recompute` stores op outputs) a plain
    ``detach()`` skips the ADInplaceOrView kernel and gets a fresh version counter, hiding later in-place
    changes. Re-enabling that key for the call is what torch's own selective checkpointing does.
    """
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return tensor.detach()


def version_watch(tensor: torch.Tensor) -> torch.Tensor:
    """An empty tensor that shares ``tensor``'s version counter and none of its memory: its ``_version``
    follows every in-place write to ``tensor`` (or a view of it), even after ``tensor`` is freed.

    Replacing a tensor's ``.data`` keeps its version counter (PyTorch's rule for ``set_data``), and a
    detached alias shares the counter (see :func:`detach_sharing_version`)."""
    watch = detach_sharing_version(tensor)
    watch.data = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return watch


class Origin:
    """What the in-place check needs to know about a saved tensor, captured cheaply at save time."""

    __slots__ = ("grad_fn_type", "output_nr", "shape", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.version = tensor._version
        self.shape = tensor.shape
        grad_fn = tensor.grad_fn
        self.grad_fn_type = None if grad_fn is None else type(grad_fn)
        self.output_nr = tensor.output_nr

    def check(self, tensor: torch.Tensor | None) -> None:
        """Raise PyTorch's own error if ``tensor`` (the saved tensor, or any tensor sharing its version
        counter, such as its base) was modified in place since it was saved.

        Autograd skips its version check for tensors that went through saved-tensor hooks, so the
        engine repeats it, with the message PyTorch gives without hooks.
        """
        if tensor is None or tensor._version == self.version:
            return
        self.fail(tensor.type(), tensor._version)

    def fail(self, type_name: str, version: int) -> None:
        """Raise PyTorch's in-place error for a tensor of ``type_name`` now at ``version``."""
        where = ""
        if self.grad_fn_type is not None:
            name = self.grad_fn_type.__name__.removesuffix("Backward0")
            where = f", which is output {self.output_nr} of {name},"
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{type_name} {list(self.shape)}]{where} is at version {version}; "
            f"expected version {self.version} instead. Hint: enable anomaly detection to find the "
            "operation that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True, "
            "check_nan=False). (Detected by deltaswap, which swapped or kept this saved tensor.)"
        )


class SwappedStorage:
    """The host copy of one device storage (or of a byte range of it), shared by every saved view.

    Lives as long as some saved tensor refers to it; when the last one is dropped by autograd, its pinned
    block goes back to the pool (reusable after the last copy that read it) and its device copy is freed.
    """

    def __init__(
        self,
        *,
        origin: torch.Tensor,
        source: torch.Tensor,
        block: PinnedBlock,
        start: int,
        version: int,
        position: int,
        backend: CopyBackend,
        pool: PinnedPool,
        counters: StepCounters,
    ) -> None:
        self.start = start
        """Byte offset of the copied range in the original storage."""
        self.nbytes = source.numel()
        self.version = version
        self.position = position
        """Bytes of saved tensors the forward had saved before this one (the backward's progress scale)."""
        self.device = source.device
        self.block = block
        self._backend = backend
        self._pool = pool
        self._counters = counters
        self.data_ptr = source.untyped_storage().data_ptr()
        self._type = origin.type()
        self._watch: torch.Tensor | None = version_watch(origin)
        """Shares the saved tensor's version counter (and no memory): in-place writes while the copy may
        still be reading it are seen even after the tensor itself is gone."""
        self.modified_at: tuple[str, int] | None = None
        """``(type, version)`` if the tensor was modified in place while its copy was in flight: the host
        copy may then hold either value."""
        self.d2h: Copy = backend.copy_to_host(block.buffer, source, block.reuse_after)
        # The device bytes go back to the allocator at once, which reuses them only once the copy has read
        # them (and when short of memory, waits for that rather than failing). Holding them until the host
        # sees the copy finish would keep them for as long as the host runs ahead of the GPU.
        backend.hold_until_copied(source, to_host=True)
        self.device_bytes: torch.Tensor | None = None
        self.h2d: Copy | None = None
        self._waited = False
        counters.tensors_offloaded += 1
        counters.bytes_offloaded += self.nbytes
        counters.d2h.append(self.d2h)

    def covers(self, data_ptr: int, begin: int, end: int, elem_size: int, version: int) -> bool:
        """Can a view spanning bytes ``[begin, end)`` of the same storage (found by identity) at
        ``data_ptr`` be served by this copy?"""
        return (
            data_ptr == self.data_ptr
            and version == self.version
            and self.start <= begin
            and end <= self.start + self.nbytes
            and (begin - self.start) % elem_size == 0
        )

    def watch(self) -> None:
        """Note an in-place write to the tensor seen now, while its copy may still be reading it."""
        watch = self._watch
        if watch is not None and self.modified_at is None and watch._version != self.version:
            self.modified_at = (self._type, watch._version)

    def finish_if_copied(self) -> bool:
        """Stop watching once the copy to host has finished. Returns whether it has."""
        if self._watch is not None and self._backend.is_done(self.d2h):
            self.stop_watching()
        return self._watch is None

    def stop_watching(self) -> None:
        """A last look for an in-place write (the forward pass is over, or the copy is done)."""
        self.watch()
        self._watch = None

    def prefetch(self) -> None:
        """Start the host->device copy (once)."""
        if self.device_bytes is not None:
            return
        self.device_bytes, self.h2d = self._backend.copy_to_device(self.block.buffer, self.d2h)
        self._pool.note_read(self.block, self.h2d)
        self._waited = False
        self._counters.tensors_prefetched += 1
        self._counters.bytes_prefetched += self.nbytes
        self._counters.h2d.append(self.h2d)

    def on_device(self) -> torch.Tensor:
        """The device bytes, ready for the compute stream (a stream wait, never a host wait)."""
        self.prefetch()
        assert self.device_bytes is not None and self.h2d is not None
        if not self._waited:
            stall = self._backend.wait(self.h2d)
            if stall is not None:
                self._counters.stalls.append(stall)
            self._waited = True
        return self.device_bytes

    def __del__(self) -> None:
        try:
            self._watch = None
            if self.device_bytes is not None and not self._waited:
                # Prefetched but never used: the memory must not be reused before the copy into it has
                # finished, whichever thread and stream drop it.
                self._backend.hold_until_copied(self.device_bytes, to_host=False)
            self.device_bytes = None
            self._pool.free(self.block)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class KeptTensor:
    """A saved tensor left where it was: returned as is, after the in-place check."""

    __slots__ = ("origin", "position", "tensor")

    def __init__(self, tensor: torch.Tensor, position: int) -> None:
        # Holding the tensor itself would make a cycle when an op saves its own output (output ->
        # grad_fn -> this -> output) that outlives a graph dropped without backward. A detached alias
        # shares the storage and the version counter, not the grad_fn.
        self.tensor = detach_sharing_version(tensor)
        self.origin = Origin(tensor)
        self.position = position

    def unpack(self) -> torch.Tensor:
        self.origin.check(self.tensor)
        return self.tensor

    def is_stale(self) -> bool:
        """Was the tensor modified in place since it was saved?"""
        return self.tensor._version != self.origin.version


class SwappedTensor:
    """A saved tensor that lives in a :class:`SwappedStorage`: rebuilt as the same view on unpack."""

    __slots__ = ("dtype", "offset", "origin", "position", "size", "storage", "stride", "tensor_ref")

    def __init__(self, tensor: torch.Tensor, storage: SwappedStorage, position: int) -> None:
        self.storage = storage
        esz = tensor.element_size()
        self.offset = (tensor.storage_offset() * esz - storage.start) // esz
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.dtype = tensor.dtype
        self.origin = Origin(tensor)
        self.position = position
        # A view dies with the expression that made it, but its base (alive while the view is) shares its
        # version counter: watch the base, so an in-place change through it is caught.
        self.tensor_ref: Any = weakref.ref(tensor if tensor._base is None else tensor._base)

    def is_stale(self) -> bool:
        """Was the tensor (or its base) modified in place since it was saved?"""
        tensor = self.tensor_ref()
        moved = tensor is not None and tensor._version != self.origin.version
        return moved or self.storage.modified_at is not None

    def unpack(self) -> torch.Tensor:
        self.origin.check(self.tensor_ref())
        if self.storage.modified_at is not None:
            self.origin.fail(*self.storage.modified_at)
        data = self.storage.on_device()
        out = torch.empty(0, dtype=self.dtype, device=data.device)
        return out.set_(data.untyped_storage(), self.offset, self.size, self.stride)
