"""Per-op keep / swap / recompute inside a checkpointed block.

``torch.utils.checkpoint`` (non-reentrant) discards everything a block saves and re-runs the block in the
backward pass. With a pair of dispatch modes passed through its public ``context_fn`` argument, each op's
output can instead be *kept* (held on the GPU), *swapped* (handed to the swap engine, copied back before
the recompute needs it) or *recomputed*: the recording mode stores the chosen outputs in the forward pass,
the replaying mode returns them in the recompute instead of running the op again.

torch's own selective checkpointing cannot swap (its ``*_CPU_OFFLOAD`` policies are recompute in eager
mode), hence this small pair of modes.

Ops that are always recomputed, whatever the policy says: views and ops that modify their inputs (their
outputs alias their inputs, and an in-place update such as batch norm's running statistics must happen
in both passes, as with torch's checkpoint), casts (autocast caches them, so they are not counted), ops
that draw random numbers (skipping one would shift every later draw of the recompute away from the
forward's, so dropout could not be reproduced), and an op whose stored output was modified in place
later (the stored value is stale, or its copy to host raced the write).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.checkpoint import checkpoint

from .profile import OpProfiler
from .saved import KeptTensor


class OpDecision(enum.Enum):
    """What to do with one op's output inside a checkpointed block."""

    KEEP = "keep"
    """Hold the output on the GPU until the block's recompute uses it."""
    SWAP = "swap"
    """Copy the output to pinned host memory; bring it back before the block's recompute."""
    RECOMPUTE = "recompute"
    """Discard the output; run the op again in the backward pass."""


OpPolicy = Callable[[int, torch._ops.OpOverload], OpDecision]
"""``policy(index, op) -> OpDecision``: ``index`` counts the block's ops in execution order (views and
``detach`` included, ``aten.detach`` excluded), the same in the forward pass and in the recompute."""


class SavedStore(Protocol):
    """Where stored op outputs go: the swap engine's step (:class:`~deltaswap.swap.step.OffloadStep`), or
    :class:`LocalStore` when no engine is active."""

    def keep(self, tensor: torch.Tensor) -> Any:
        """Hold ``tensor``; returns a record with an ``unpack()`` and an ``is_stale()``."""
        ...

    def swap(self, tensor: torch.Tensor) -> Any:
        """Copy ``tensor`` to host memory (or keep it if it cannot be swapped); returns a record."""
        ...

    def unpack(self, record: Any) -> torch.Tensor:
        """The tensor back, on its device, ready for the compute stream."""
        ...


class LocalStore:
    """Keeps every stored output on its device: what ``SWAP`` falls back to without a swap engine."""

    def keep(self, tensor: torch.Tensor) -> KeptTensor:
        return KeptTensor(tensor, 0)

    swap = keep

    def unpack(self, record: KeptTensor) -> torch.Tensor:
        return record.unpack()


def _aliases_an_input(op: torch._ops.OpOverload) -> bool:
    return any(ret.alias_info is not None for ret in op._schema.returns)


def _draws_random_numbers(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    # Fused attention kernels carry the tag for their dropout; without dropout they draw nothing.
    names = [arg.name for arg in op._schema.arguments]
    if "dropout_p" in names:
        position = names.index("dropout_p")
        p = args[position] if position < len(args) else kwargs.get("dropout_p", 0.0)
        return not isinstance(p, float) or p > 0.0
    return True


_UNCOUNTED = (
    torch.ops.aten.detach.default,  # autograd's saving adds these in the recompute only
    # Autocast caches a weight's cast within a region: a block called twice casts in its first call
    # only, but in every recompute. Casts are left out of the op count (and always recomputed), so the
    # indices of the other ops agree between the two passes.
    torch.ops.aten._to_copy.default,
)


def _mutates(op: torch._ops.OpOverload) -> bool:
    # batch norm updates its running statistics without declaring it in its schema
    return op._schema.is_mutable or ("batch_norm" in op._schema.name and "backward" not in op._schema.name)


class _Frame:
    """The stored outputs of one call of a checkpointed block."""

    def __init__(self, policy: OpPolicy, store: SavedStore, profiler: OpProfiler | None) -> None:
        self.policy = policy
        self.store = store
        self.profiler = profiler
        self.call = profiler.new_call() if profiler is not None else -1
        self.records: dict[int, tuple[torch._ops.OpOverload, tuple[Any, ...], Any, list[Any]]] = {}
        self.by_storage: dict[int, list[int]] = {}
        self.forward_ops = 0
        self.replay_ops = 0

    def forget_written(self, op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """An in-place op wrote into some tensors: a stored output sharing their storage no longer holds
        the op's value (and a copy to host may race with the write), so it is recomputed instead."""
        for position, arg in enumerate(op._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[position] if position < len(args) else kwargs.get(arg.name)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    for index in self.by_storage.pop(tensor.untyped_storage().data_ptr(), ()):
                        self.records.pop(index, None)


def _fingerprint(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The op and the shapes and dtypes of its tensor arguments: what must match between the forward
    pass and the recompute at the same op index."""
    leaves = tree_leaves((args, kwargs))
    return (op, *((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor)))


class _RecordingMode(TorchDispatchMode):
    """Forward pass: run every op, store the outputs the policy keeps or swaps."""

    def __init__(self, frame: _Frame) -> None:
        super().__init__()
        self.frame = frame

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _UNCOUNTED:
            return func(*args, **kwargs)
        frame = self.frame
        profiler = frame.profiler
        mark = profiler.start() if profiler is not None else None
        out = func(*args, **kwargs)
        index = frame.forward_ops
        frame.forward_ops += 1
        mutates = _mutates(func)
        if func._schema.is_mutable:
            frame.forget_written(func, args, kwargs)
        storable = not (mutates or _aliases_an_input(func) or _draws_random_numbers(func, args, kwargs))
        if profiler is not None:
            profiler.stop(frame.call, index, func, out, storable, mark)
        if not storable:
            return out
        decision = frame.policy(index, func)
        if decision is OpDecision.RECOMPUTE:
            return out
        leaves, spec = tree_flatten(out)
        save = frame.store.swap if decision is OpDecision.SWAP else frame.store.keep
        records = [save(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        frame.records[index] = (func, _fingerprint(func, args, kwargs), spec, records)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                frame.by_storage.setdefault(leaf.untyped_storage().data_ptr(), []).append(index)
        return out


class _ReplayingMode(TorchDispatchMode):
    """Recompute: return stored outputs instead of running their ops; run the rest."""

    def __init__(self, frame: _Frame) -> None:
        super().__init__()
        self.frame = frame

    def __enter__(self) -> _ReplayingMode:
        self.frame.replay_ops = 0  # every recompute (a second backward too) starts from the first op
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _UNCOUNTED:
            return func(*args, **(kwargs or {}))
        frame = self.frame
        index = frame.replay_ops
        frame.replay_ops += 1
        stored = frame.records.get(index)
        if stored is None:
            return func(*args, **(kwargs or {}))
        op, fingerprint, spec, records = stored
        if fingerprint != _fingerprint(func, args, kwargs or {}):
            raise RuntimeError(
                f"deltaswap: the recompute of a checkpointed block ran {func} where the forward pass ran "
                f"{op} (op {index}, or the same op on other shapes). The block's forward must run the "
                f"same ops every time it is called with the same inputs; exclude blocks with "
                f"data-dependent control flow (block_types)."
            )
        if any(getattr(r, "is_stale", _never)() for r in records):
            return func(*args, **(kwargs or {}))  # modified in place after it was stored: recompute
        leaves = [frame.store.unpack(r) if hasattr(r, "is_stale") else r for r in records]
        return tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def _never() -> bool:
    return False


def checkpoint_with_policy(
    fn: Callable[..., Any],
    *args: Any,
    policy: OpPolicy,
    store: SavedStore | None = None,
    profiler: OpProfiler | None = None,
    fn_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` under non-reentrant checkpointing, keeping, swapping or recomputing
    each op's output as ``policy`` decides.

    Use it for a repeated block of a model (a transformer layer): the block's inputs are saved as usual
    (through any outer saved-tensor hooks, such as the swap engine's), and what the block saves inside is
    decided per op. RNG state and autocast are restored for the recompute, so dropout and mixed precision
    give the same values; gradients are bitwise equal to running ``fn`` plainly.

    Args:
        fn: the block (a module or function).
        policy: ``policy(index, op) -> OpDecision`` for each op of the block.
        store: where kept and swapped outputs go; the swap engine's step while one is active, else
            :class:`LocalStore` (``SWAP`` then keeps on the device).
        profiler: if given, times each op of this call and records its output bytes
            (:class:`~deltaswap.swap.profile.OpProfiler`).
        fn_kwargs: keyword arguments for ``fn``. They are passed to torch's checkpoint positionally, so
            that their tensors take part in its device and RNG-state handling like ``args``.

    Example::

        >>> matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
        >>> def save_matmuls(index, op):
        ...     return OpDecision.KEEP if op in matmuls else OpDecision.RECOMPUTE
        >>> y = checkpoint_with_policy(block, x, policy=save_matmuls)   # doctest: +SKIP

    .. warning::
        The block must run the same sequence of ops in the recompute as in the forward pass; a different
        op at the same position raises an error rather than returning a wrong value.
    """
    frame = _Frame(policy, store if store is not None else LocalStore(), profiler)
    call, flat = _positional(fn, args, fn_kwargs)
    return checkpoint(
        call, *flat, use_reentrant=False, context_fn=lambda: (_RecordingMode(frame), _ReplayingMode(frame))
    )


def checkpoint_all(fn: Callable[..., Any], *args: Any, fn_kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``fn(*args, **fn_kwargs)`` under torch's non-reentrant checkpointing, recomputing everything:
    what :func:`checkpoint_with_policy` does with a policy that recomputes every op, without running
    Python for every op (no dispatch modes), so with less host time."""
    call, flat = _positional(fn, args, fn_kwargs)
    return checkpoint(call, *flat, use_reentrant=False)


def _positional(
    fn: Callable[..., Any], args: tuple[Any, ...], fn_kwargs: dict[str, Any] | None
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``fn`` taking its keyword arguments positionally after ``args``, and all the arguments: torch's
    checkpoint then handles the keyword arguments' tensors (devices, RNG state) like the others."""
    names = list(fn_kwargs or {})
    values = tuple(fn_kwargs[name] for name in names) if fn_kwargs else ()
    n_args = len(args)

    def call(*flat: Any) -> Any:
        return fn(*flat[:n_args], **dict(zip(names, flat[n_args:], strict=True)))

    return call, (*args, *values)
