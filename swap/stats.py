"""What one step of the swap engine did: counted as it runs, timed from its copy events on request."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .backend import Copy, CopyBackend
from .config import format_bytes


@dataclass(frozen=True)
class OffloadStats:
    """Measured behaviour of the most recent step (forward under the context, then its backward).

    Example::

        >>> with off:                                    # doctest: +SKIP
        ...     loss = model(x).sum()
        >>> loss.backward()                              # doctest: +SKIP
        >>> off.stats.bytes_offloaded / 2**30, off.stats.d2h_gbps   # doctest: +SKIP
    """

    tensors_offloaded: int = 0
    """Storages copied to host memory in the forward pass."""
    bytes_offloaded: int = 0
    """Bytes copied device->host in the forward pass."""
    tensors_prefetched: int = 0
    """Storages copied back host->device in the backward pass(es)."""
    bytes_prefetched: int = 0
    """Bytes copied host->device in the backward pass(es)."""
    tensors_kept: int = 0
    """Saved tensors left where they were (parameters, CPU or small tensors, a full fixed pool)."""
    bytes_kept: int = 0
    """Bytes of the kept tensors that are activations (parameters are not counted)."""
    bytes_kept_pool_full: int = 0
    """Of ``bytes_kept``: bytes that would have been swapped but found no room in a fixed pool."""
    bytes_deduplicated: int = 0
    """Bytes of saved tensors served by a copy already made (the same storage saved again)."""
    d2h_ms: float = 0.0
    """Time the device->host stream spent copying."""
    h2d_ms: float = 0.0
    """Time the host->device stream spent copying."""
    d2h_gbps: float = 0.0
    """Achieved device->host rate, GB/s (1e9 bytes), over the time the copies ran."""
    h2d_gbps: float = 0.0
    """Achieved host->device rate, GB/s."""
    backward_stall_ms: float = 0.0
    """Time the compute stream waited for host->device copies in the backward pass."""
    inflight_bytes_at_exit: int = 0
    """Bytes whose device->host copy had not finished when the forward context exited: they still
    occupied GPU memory at the end of the forward pass."""
    pinned_bytes_in_use: int = 0
    """Pinned host bytes held by live saved tensors when the stats were read."""
    pinned_bytes_reserved: int = 0
    """Pinned host bytes the pool holds (allocated once, reused every step)."""

    def __str__(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith(("bytes", "pinned", "inflight")):
                value = format_bytes(value)
            elif isinstance(value, float):
                value = f"{value:.2f}"
            lines.append(f"  {f.name:<24}{value}")
        return "OffloadStats(\n" + "\n".join(lines) + "\n)"


@dataclass
class StepCounters:
    """Mutable tallies of one step; turned into :class:`OffloadStats` by :meth:`summarize`. Each ``int``
    field is the :class:`OffloadStats` field of the same name (documented there)."""

    tensors_offloaded: int = 0
    bytes_offloaded: int = 0
    tensors_prefetched: int = 0
    bytes_prefetched: int = 0
    tensors_kept: int = 0
    bytes_kept: int = 0
    bytes_kept_pool_full: int = 0
    bytes_deduplicated: int = 0
    inflight_bytes_at_exit: int = 0
    d2h: list[Copy] = field(default_factory=list)
    h2d: list[Copy] = field(default_factory=list)
    stalls: list[tuple[Any, Any]] = field(default_factory=list)

    def summarize(self, backend: CopyBackend, pinned_in_use: int, pinned_reserved: int) -> OffloadStats:
        """Read the copy timings (this waits for the step's copies) and freeze the tallies."""
        d2h_ms = sum((backend.elapsed_ms(c.start, c.done) for c in self.d2h), 0.0)
        h2d_ms = sum((backend.elapsed_ms(c.start, c.done) for c in self.h2d), 0.0)
        stall_ms = sum((backend.elapsed_ms(a, b) for a, b in self.stalls), 0.0)
        d2h_bytes = sum(c.nbytes for c in self.d2h)
        h2d_bytes = sum(c.nbytes for c in self.h2d)
        tallies = {f.name: getattr(self, f.name) for f in fields(self) if f.type in ("int", int)}
        return OffloadStats(
            **tallies,
            d2h_ms=d2h_ms,
            h2d_ms=h2d_ms,
            d2h_gbps=d2h_bytes / d2h_ms / 1e6 if d2h_ms > 0 else 0.0,
            h2d_gbps=h2d_bytes / h2d_ms / 1e6 if h2d_ms > 0 else 0.0,
            backward_stall_ms=stall_ms,
            pinned_bytes_in_use=pinned_in_use,
            pinned_bytes_reserved=pinned_reserved,
        )
