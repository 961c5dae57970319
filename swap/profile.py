"""Measurements the planner decides from: PCIe bandwidth, and the cost and size of every op in a block.

Both are measured, never assumed: :func:`measure_bandwidth` times pinned copies in each direction and
both at once (well under a second); :class:`OpProfiler` times every op of every checkpointed block in one
profiling step (CUDA events on the GPU, the wall clock on a CPU so that planning also runs in CI) and
records the bytes of its output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class Bandwidth:
    """Measured pinned-memory copy rates, GB/s (1e9 bytes per second)."""

    d2h_gbps: float
    """Device to host."""
    h2d_gbps: float
    """Host to device."""
    duplex_gbps: float
    """Both directions at once, the two together."""
    copy_slowdown: float = 0.0
    """How much slower the compute stream runs while copies move in both directions beside it, as a
    fraction (0.03: 3% slower). The copies share the device's memory with the kernels; the planner charges
    this for every millisecond a swap's copy runs."""


def _rate(nbytes: int, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    end.synchronize()
    return nbytes / start.elapsed_time(end) / 1e6


def copy_rate(dst: torch.Tensor, src: torch.Tensor, *, repeats: int = 4,
              stream: torch.cuda.Stream | None = None) -> float:
    """GB/s of ``repeats`` x ``dst.copy_(src, non_blocking=True)`` on ``stream`` (a new side stream by
    default), after one warm-up copy, timed with CUDA events. Waits for the copies."""
    device = src.device if src.is_cuda else dst.device
    stream = stream if stream is not None else torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record()
    return _rate(src.numel() * src.element_size() * repeats, start, end)


def duplex_rate(to_host: tuple[torch.Tensor, torch.Tensor], to_device: tuple[torch.Tensor, torch.Tensor],
                *, repeats: int = 4) -> float:
    """Total GB/s of ``(dst, src)`` device->host and host->device copies running at once on two
    streams, ``repeats`` times each. Waits for the copies."""
    device = to_host[1].device
    streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    compute = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(compute)
    for stream, (dst, src) in zip(streams, (to_host, to_device), strict=True):
        stream.wait_event(start)
        with torch.cuda.stream(stream):
            for _ in range(repeats):
                dst.copy_(src, non_blocking=True)
        compute.wait_stream(stream)
    end.record(compute)
    nbytes = sum(src.numel() * src.element_size() for _, src in (to_host, to_device))
    return _rate(nbytes * repeats, start, end)


def measure_bandwidth(
    device: torch.device | int | str | None = None, *, nbytes: int = 64 << 20, repeats: int = 4
) -> Bandwidth:
    """Time pinned copies of ``nbytes`` to and from ``device``, ``repeats`` times each way, then both
    ways at once on two streams. With the defaults it moves ~1.5 GB: about 30 ms on PCIe gen5.

    Example::

        >>> bw = measure_bandwidth()                # doctest: +SKIP
        >>> bw.d2h_gbps, bw.h2d_gbps, bw.duplex_gbps  # doctest: +SKIP
        (55.1, 54.9, 93.0)

    Raises:
        RuntimeError: without CUDA (there is no PCIe link to measure; pass a :class:`Bandwidth` to the
            planner instead).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measure_bandwidth needs a CUDA device; on a CPU, pass a Bandwidth explicitly")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    gpu = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(2)]
    return Bandwidth(
        d2h_gbps=copy_rate(host[0], gpu[0], repeats=repeats),
        h2d_gbps=copy_rate(gpu[1], host[1], repeats=repeats),
        duplex_gbps=duplex_rate((host[0], gpu[0]), (gpu[1], host[1]), repeats=repeats),
        copy_slowdown=copy_slowdown((host[0], gpu[0]), (gpu[1], host[1])),
    )


def _time_kernels(run: Any) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def copy_slowdown(to_host: tuple[torch.Tensor, torch.Tensor], to_device: tuple[torch.Tensor, torch.Tensor],
                  *, trials: int = 3) -> float:
    """The fraction by which a training-like mix of kernels (bf16 matmuls and elementwise passes over
    memory) slows down while ``(dst, src)`` copies run in both directions beside it on two streams.

    The median of ``trials`` paired measurements, each a few milliseconds; 0 when no slowdown shows.
    Waits for the device.
    """
    device = to_host[1].device
    # constant values: drawing random ones would move the user's CUDA generator (and their dropout masks)
    a = torch.full((4096, 4096), 0.5, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    big = torch.empty(64 << 20, device=device, dtype=torch.bfloat16)
    sink = torch.empty_like(big)

    def kernels() -> None:
        for _ in range(8):
            torch.mm(a, a, out=out)
            torch.mul(big, 1.5, out=sink)

    kernels()  # warm-up
    alone = _time_kernels(kernels)
    nbytes = to_host[1].numel() * to_host[1].element_size()
    rate = 50e6  # bytes per ms, roughly PCIe gen5: enough copies to cover the kernels twice over
    repeats = max(2, int(2 * alone * rate / max(nbytes, 1)) + 1)
    compute = torch.cuda.current_stream(device)
    ratios = []
    for _ in range(trials):
        alone = _time_kernels(kernels)
        streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        for stream, (dst, src) in zip(streams, (to_host, to_device), strict=True):
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                for _ in range(repeats):
                    dst.copy_(src, non_blocking=True)
        beside = _time_kernels(kernels)
        for stream in streams:
            compute.wait_stream(stream)
        torch.cuda.synchronize(device)
        ratios.append(beside / alone - 1.0)
    ratios.sort()
    return max(0.0, ratios[len(ratios) // 2])


COMPILED_OP = "compiled block"
"""The name of the one op a compiled block call is profiled as (:meth:`OpProfiler.whole`)."""


@dataclass(frozen=True)
class OpRecord:
    """One op of one block call, as measured in the profiling step."""

    index: int
    """Its position in the block (the index a per-op policy receives)."""
    op: str
    """The aten overload, e.g. ``aten.mm.default``."""
    out_bytes: int
    """Bytes of its tensor outputs: what keeping (or swapping) them holds (or moves); 0 when it is not
    storable."""
    ms: float
    """Measured time to run it: what recomputing it costs."""
    storable: bool
    """False for views, in-place and random ops, which are always recomputed."""


class OpProfiler:
    """Times every op of every checkpointed block during one profiling step.

    Pass it to :func:`~deltaswap.swap.recompute.checkpoint_with_policy`; after the step (and the
    device work) is done, :meth:`blocks` returns one list of :class:`OpRecord` per block call, in
    forward order. On a CUDA device each op is timed with a pair of events on the current stream (read
    after the step, so the forward pass is not synchronized); on a CPU with the wall clock.

    Example::

        >>> profiler = OpProfiler()
        >>> y = checkpoint_with_policy(block, x, policy=recompute_all, profiler=profiler)  # doctest: +SKIP
        >>> y.sum().backward()                                                            # doctest: +SKIP
        >>> [(r.op, r.ms) for r in profiler.blocks()[0]][:3]                              # doctest: +SKIP
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        """``device``: where the profiled ops run (default: CUDA if available, else the CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cuda = torch.device(device).type == "cuda"
        self._calls: list[list[tuple[int, str, int, bool, Any, Any]]] = []

    def new_call(self) -> int:
        """Start a block call; returns its number."""
        self._calls.append([])
        return len(self._calls) - 1

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> Any:
        """A mark before an op."""
        return self._mark()

    def stop(self, call: int, index: int, op: torch._ops.OpOverload | str, out: Any, storable: bool,
             start: Any) -> None:
        """Record the op that ran since ``start``."""
        end = self._mark()
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)] if storable else []
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._calls[call].append((index, str(op), nbytes, storable, start, end))

    def whole(self, name: str, run: Callable[[], Any]) -> Any:
        """Run ``run()`` as a new block call timed as one op named ``name``, not storable (a compiled
        block, whose ops run inside its graph where no dispatch mode sees them); returns its result."""
        call = self.new_call()
        start = self.start()
        out = run()
        self.stop(call, 0, name, out, False, start)
        return out

    def blocks(self) -> list[list[OpRecord]]:
        """The records of every block call (waits for the timing events)."""
        result = []
        for call in self._calls:
            records = []
            for index, op, nbytes, storable, start, end in call:
                if self.cuda:
                    end.synchronize()
                    ms = float(start.elapsed_time(end))
                else:
                    ms = (end - start) * 1e3
                records.append(OpRecord(index, op, nbytes, ms, storable))
            result.append(records)
        return result
