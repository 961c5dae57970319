"""Configuration of the activation swap engine, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, name: str = "size") -> int:
    """Turn a byte count or a size string such as ``"12GiB"`` or ``"512 MB"`` into an ``int``.

    Binary (``KiB``, ``MiB``, ``GiB``, ``TiB``) and decimal (``KB``, ``MB``, ``GB``, ``TB``) units are
    accepted, case-insensitively.

    Example::

        >>> parse_bytes("1.5GiB")
        1610612736

    Raises:
        ValueError: if the value is negative, not a whole number of bytes, or the string is not a size.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a size string such as '8GiB', not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a size: write a byte count (8589934592) or a number with a "
                f"unit, e.g. '8GiB', '512MiB' or '2GB'"
            )
        return int(float(match.group(1)) * _UNITS[unit])
    raise TypeError(f"{name} must be an int or a size string such as '8GiB', got {type(value).__name__}")


def format_bytes(n: float) -> str:
    """Format a byte count for people: ``format_bytes(3 << 30) == '3.00 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class OffloadConfig:
    """What the swap engine offloads and how far ahead it brings tensors back.

    Example::

        >>> cfg = OffloadConfig(min_bytes="1MiB", prefetch_lookahead=0.25, pinned_bytes="16GiB")
        >>> cfg.min_bytes
        1048576
    """

    min_bytes: int | str = 1 << 20
    """Saved tensors smaller than this stay on the GPU. Small copies run far below PCIe peak and save
    little memory; 1 MiB keeps the copy engine near its measured 48-50 GB/s."""

    prefetch_lookahead: float | int | str = 0.25
    """How far ahead of the backward pass each tensor is copied back, measured in bytes of backward
    progress (the bytes of all saved tensors, kept ones included, that the backward still has to consume
    before it reaches this one). A float in (0, 1] is a fraction of the step's saved bytes; an int or a
    size string is absolute. Larger values hide more PCIe time but hold prefetched tensors on the GPU
    longer (at most this many bytes extra). The default, a quarter of the step's activations (four of
    sixteen transformer blocks), was enough to hide the transfers of two swapped blocks in a 0.8B GPT on
    an H100, where three tensors ahead cost 9% step time (see DESIGN.md)."""

    pinned_bytes: int | str | None = None
    """Size of the pinned host pool. ``None`` grows the pool during the first steps, as tensors arrive,
    checking host RAM before each growth, and then reuses it. A size allocates the whole pool when the
    engine is first entered (so a pool that does not fit fails before anything is copied) and never
    grows; tensors that find no room stay on the GPU, with one warning."""

    host_ram_reserve: int | str = "2GiB"
    """Host RAM the pool always leaves free for the rest of the process (data loaders, the OS page
    cache). A growth that would eat into it fails with :class:`HostMemoryError`."""

    def __post_init__(self) -> None:
        self.min_bytes = parse_bytes(self.min_bytes, name="min_bytes")
        self.host_ram_reserve = parse_bytes(self.host_ram_reserve, name="host_ram_reserve")
        if self.pinned_bytes is not None:
            self.pinned_bytes = parse_bytes(self.pinned_bytes, name="pinned_bytes")
            if self.pinned_bytes == 0:
                raise ValueError("pinned_bytes=0 leaves no room to swap: pass None to size the pool "
                                 "automatically, or a size such as '8GiB'")
        look = self.prefetch_lookahead
        if isinstance(look, float):
            if not 0.0 < look <= 1.0:
                raise ValueError(
                    f"prefetch_lookahead={look} as a fraction must be in (0, 1]; pass e.g. 0.25 for a "
                    f"quarter of the step's activations, or a size such as '4GiB'"
                )
        else:
            self.prefetch_lookahead = parse_bytes(look, name="prefetch_lookahead")

    def lookahead_bytes(self, step_saved_bytes: int) -> int:
        """The prefetch look-ahead in bytes for a step that saved ``step_saved_bytes``."""
        look = self.prefetch_lookahead
        if isinstance(look, float):
            return max(1, int(look * step_saved_bytes))
        return int(look)


POLICIES = ("auto", "delta", "swap", "recompute", "keep")

COMPILE_ARGUMENTS = frozenset({"fullgraph", "dynamic", "backend", "mode", "options"})
"""The ``torch.compile`` keyword arguments :attr:`SwapConfig.compile` may hold."""
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
"""``torch.compile`` modes that capture CUDA graphs."""

UNLIMITED = 1 << 62
"""The budget planned with where there is no device memory to fit (a CPU run without a given size)."""


def format_budget(budget: int) -> str:
    """A budget for people: its size, or ``no limit`` for :data:`UNLIMITED`."""
    return "no limit" if budget >= UNLIMITED else format_bytes(budget)


def memory_budget_from_text(text: str) -> int | float | str:
    """A ``memory_budget`` from a command line: ``auto``, a byte count (``8589934592``), a size
    (``12GiB``) or a fraction of device memory (``0.6``), checked as :class:`SwapConfig` checks it.

    Example::

        >>> memory_budget_from_text("0.6"), memory_budget_from_text("12GiB")
        (0.6, '12GiB')

    Raises:
        ValueError: with what to write instead.
    """
    value: int | float | str = text
    if text.isdigit():
        value = int(text)
    elif text.replace(".", "", 1).isdigit():
        value = float(text)
    SwapConfig(memory_budget=value)
    return value


@dataclass
class SwapConfig:
    """What :class:`~deltaswap.swap.manager.ActivationManager` may spend and how it decides.

    Example::

        >>> cfg = SwapConfig(memory_budget="12GiB", policy="auto")
        >>> cfg.memory_budget
        12884901888
        >>> SwapConfig(memory_budget=0.5).memory_budget   # half of the device's memory
        0.5
    """

    memory_budget: int | float | str = "auto"
    """Most GPU memory the step's activations may take. ``"auto"``: what the device has left after
    weights, gradients and optimizer state, less a safety margin; an int or a size string (``"12GiB"``):
    bytes; a float in (0, 1]: that fraction of the device's total memory. The first steps that run a
    plan measure its peak and correct the prediction (the plan is made again if it was low), so the
    budget holds from the step after; a budget no plan can meet gets one warning with the smallest
    peak."""

    policy: str = "auto"
    """``"auto"``: the cheapest mix of keep / swap / recompute per tensor that fits the budget, from
    measured costs. ``"delta"``: DELTA's rule (recompute a tensor when 2 x its swap time exceeds its
    compute time, else swap), with the measured bandwidth. ``"swap"``, ``"recompute"``, ``"keep"``: that
    for every block, whatever the budget (for comparison)."""

    prefetch_lookahead: float | int | str = 0.25
    """How far ahead of the backward pass swapped tensors are copied back (see
    :attr:`OffloadConfig.prefetch_lookahead`): measured in bytes of backward progress rather than as a
    count of tensors, since a count that is right for small tensors is far too short for large ones."""

    min_bytes: int | str = 1 << 20
    """Saved tensors smaller than this are never swapped."""

    block_types: tuple[type, ...] | None = None
    """Module classes to plan per block (e.g. ``(MyTransformerLayer,)``). ``None``: the largest group of
    sibling modules of one class in a ``ModuleList`` or ``Sequential`` (the repeated layers)."""

    bandwidth_gbps: float | None = None
    """Use this PCIe rate (GB/s, each direction) instead of measuring it."""

    pinned_bytes: int | str | None = None
    """Fixed size of the pinned host pool (see :attr:`OffloadConfig.pinned_bytes`); ``None`` sizes it
    from the first step."""

    host_ram_reserve: int | str = "2GiB"
    """Host RAM the pinned pool always leaves free."""

    compile: bool | dict[str, Any] = False
    """Compile each block with ``torch.compile`` after wrapping it (regional compilation, one graph for
    blocks that run alike): ``True`` with torch's defaults, or a dict of ``torch.compile`` keyword
    arguments (``{"mode": "max-autotune-no-cudagraphs"}``, ``{"backend": "aot_eager"}``). A compiled
    block is profiled as it runs (one call, timed whole) and planned whole: kept, swapped (its saved
    tensors through the engine's hooks, outside the graph) or recomputed, never with per-op outputs
    stored. The model itself stays uncompiled (compile its blocks this way instead of the whole model).
    CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``) are refused: they hold activations in
    static memory that nothing can swap or free."""

    def __post_init__(self) -> None:
        budget = self.memory_budget
        if isinstance(budget, float):
            if not 0.0 < budget <= 1.0:
                raise ValueError(
                    f"memory_budget={budget} as a fraction of device memory must be in (0, 1]; write e.g. "
                    f"0.6, a size such as '12GiB', or 'auto'"
                )
        elif budget != "auto":
            self.memory_budget = parse_bytes(budget, name="memory_budget")
            if self.memory_budget == 0:
                raise ValueError("memory_budget=0 leaves no room for activations; write a size such as "
                                 "'12GiB', a fraction such as 0.6, or 'auto'")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(map(repr, POLICIES))}")
        if self.block_types is not None:
            types = tuple(self.block_types)
            if not types or not all(isinstance(t, type) for t in types):
                raise TypeError(f"block_types must be a tuple of module classes, got {self.block_types!r}")
            self.block_types = types
        if self.bandwidth_gbps is not None and not self.bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps={self.bandwidth_gbps} must be a positive rate in GB/s")
        self.min_bytes = parse_bytes(self.min_bytes, name="min_bytes")
        self.compile_options()  # validates the compile options
        self.offload_config()  # validates the engine's fields with the engine's messages

    def compile_options(self) -> dict[str, Any] | None:
        """The keyword arguments for ``torch.compile`` of each block, or ``None`` if blocks are not
        compiled.

        Raises:
            TypeError: if :attr:`compile` is neither a bool nor a dict with string keys.
            ValueError: if it asks for an unknown ``torch.compile`` argument or for CUDA graphs.
        """
        options = self.compile
        if isinstance(options, bool):
            return {} if options else None
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise TypeError(f"compile must be True, False or a dict of torch.compile keyword arguments, "
                            f"got {options!r}")
        unknown = sorted(set(options) - COMPILE_ARGUMENTS)
        if unknown:
            raise ValueError(f"compile={options!r}: {', '.join(unknown)} is not a torch.compile argument "
                             f"deltaswap passes on; use {', '.join(sorted(COMPILE_ARGUMENTS))}")
        inner = options.get("options") or {}
        if not isinstance(inner, dict):
            raise TypeError(f"compile={options!r}: 'options' must be a dict of inductor settings, got "
                            f"{type(inner).__name__}")
        if options.get("mode") in CUDA_GRAPH_MODES or inner.get("triton.cudagraphs"):
            raise ValueError(
                f"compile={options!r} asks for CUDA graphs, which keep every activation in static memory "
                f"that deltaswap can neither swap nor free: use mode='max-autotune-no-cudagraphs' or "
                f"'default'")
        return dict(options)

    def offload_config(self) -> OffloadConfig:
        """The engine's configuration for these settings."""
        return OffloadConfig(
            min_bytes=self.min_bytes,
            prefetch_lookahead=self.prefetch_lookahead,
            pinned_bytes=self.pinned_bytes,
            host_ram_reserve=self.host_ram_reserve,
        )
