"""Copy backends: where the engine's asynchronous device<->host copies and their events come from.

The engine orders every copy through a :class:`CopyBackend`. :class:`CudaCopyBackend` is the real one: two
side streams (device->host and host->device) ordered against the compute stream with CUDA events, so the
host never waits. :class:`SyncCopyBackend` performs the same protocol synchronously on CPU tensors; it lets
the engine's bookkeeping (dedup, views, pool reuse, prefetch order) run and be tested without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Copy:
    """One copy the engine issued: its size and the two marks (events or clock times) around it."""

    nbytes: int
    start: Any
    done: Any


class CopyBackend(Protocol):
    """What the engine needs from a device: which tensors it swaps, host buffers, ordered async copies."""

    def accepts(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on the device this backend swaps from."""
        ...

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` host buffer of ``nbytes`` (pinned for a real device)."""
        ...

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Copy | None) -> Copy:
        """Copy ``src`` (device bytes) into ``dst`` (host bytes) once the compute stream has produced
        ``src`` and ``after`` (the last copy that read ``dst``) is done. Never blocks the host."""
        ...

    def copy_to_device(self, src: torch.Tensor, after: Copy | None) -> tuple[torch.Tensor, Copy]:
        """Allocate device bytes on the compute stream and copy ``src`` (host bytes) into them once
        ``after`` (the copy that filled ``src``) is done. Never blocks the host."""
        ...

    def wait(self, copy: Copy) -> tuple[Any, Any] | None:
        """Make the compute stream wait for ``copy``. Returns marks around the wait, or ``None`` when the
        copy was already known to be done (no wait)."""
        ...

    def is_done(self, copy: Copy) -> bool:
        """Non-blocking: has ``copy`` finished?"""
        ...

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks. May block until ``end`` is reached: call outside the forward."""
        ...

    def hold_until_copied(self, tensor: torch.Tensor, *, to_host: bool) -> None:
        """Keep ``tensor``'s device memory from being reused before every copy issued so far on the
        device->host (``to_host``) or host->device stream has finished with it, whichever thread or
        stream frees it.

        .. warning::
            The engine drops its own reference to a swapped tensor's device bytes as soon as the copy
            is queued: this is what keeps the copy from reading memory already reused. A backend whose
            copies run asynchronously must implement it (``record_stream`` on CUDA)."""
        ...


class CudaCopyBackend:
    """Asynchronous copies between one CUDA device and pinned host memory on two side streams.

    One stream carries device->host copies, the other host->device, so both PCIe directions run at once.
    Each copy is ordered with events: the D2H stream waits for the compute stream to produce a tensor; the
    compute stream waits for an H2D copy before using it. The host never synchronizes.

    Args:
        device: the CUDA device (default: the current one).

    Example::

        >>> backend = CudaCopyBackend()          # doctest: +SKIP
        >>> off = ActivationOffloader(backend=backend)   # doctest: +SKIP
        >>> backend.d2h_stream                   # e.g. for profiling or fault injection   # doctest: +SKIP
    """

    def __init__(self, device: torch.device | int | str | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaCopyBackend needs a CUDA device, and torch.cuda.is_available() is False")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaCopyBackend swaps from a CUDA device, got device={dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.d2h_stream = torch.cuda.Stream(dev)
        self.h2d_stream = torch.cuda.Stream(dev)

    def accepts(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self.device

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _timed_copy(self, stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> Copy:
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        done.record(stream)
        return Copy(src.numel() * src.element_size(), start, done)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Copy | None) -> Copy:
        stream = self.d2h_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            stream.wait_event(after.done)
        return self._timed_copy(stream, dst, src)

    def copy_to_device(self, src: torch.Tensor, after: Copy | None) -> tuple[torch.Tensor, Copy]:
        compute = torch.cuda.current_stream(self.device)
        dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)  # owned by the compute stream
        stream = self.h2d_stream
        stream.wait_stream(compute)  # the allocator may hand out memory the compute stream still uses
        if after is not None:
            stream.wait_event(after.done)
        return dst, self._timed_copy(stream, dst, src)

    def wait(self, copy: Copy) -> tuple[Any, Any] | None:
        if copy.done.query():
            return None
        compute = torch.cuda.current_stream(self.device)
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(copy.done)
        after.record(compute)
        return before, after

    def is_done(self, copy: Copy) -> bool:
        return bool(copy.done.query())

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def hold_until_copied(self, tensor: torch.Tensor, *, to_host: bool) -> None:
        tensor.record_stream(self.d2h_stream if to_host else self.h2d_stream)


class SyncCopyBackend:
    """The engine's copy protocol on CPU tensors, done synchronously: for tests and debugging.

    Treats CPU tensors as the "device" tensors to swap and plain CPU buffers as the host pool, so the
    engine's bookkeeping (what is swapped, deduplication, views, pool reuse, prefetch order, version
    checks) runs on any machine. Every copy is appended to :attr:`trace` as ``(direction, nbytes)``.

    Example::

        >>> backend = SyncCopyBackend()
        >>> off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=backend)
    """

    def __init__(self) -> None:
        self.trace: list[tuple[str, int]] = []

    def accepts(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu"

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _copy(self, direction: str, dst: torch.Tensor, src: torch.Tensor) -> Copy:
        start = time.perf_counter()
        dst.copy_(src)
        nbytes = src.numel() * src.element_size()
        self.trace.append((direction, nbytes))
        return Copy(nbytes, start, time.perf_counter())

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Copy | None) -> Copy:
        return self._copy("d2h", dst, src)

    def copy_to_device(self, src: torch.Tensor, after: Copy | None) -> tuple[torch.Tensor, Copy]:
        dst = torch.empty(src.numel(), dtype=torch.uint8)
        return dst, self._copy("h2d", dst, src)

    def wait(self, copy: Copy) -> tuple[Any, Any] | None:
        return None

    def is_done(self, copy: Copy) -> bool:
        return True

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3

    def hold_until_copied(self, tensor: torch.Tensor, *, to_host: bool) -> None:
        return None
