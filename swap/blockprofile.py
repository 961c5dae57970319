"""The profiling step: measure every block call of one input shape, each as what it is.

The first step with a new input shape runs every block call under the profiler. Blocks are not all
alike (a ResNet's stages differ in width and each begins with a downsample; T5's decoder layers run
cross-attention; T5's first layer computes the position bias the others receive), so calls are told
apart by their *kind*: the block's class, the shapes and dtypes of its tensor arguments, the kinds of its
other arguments and the shapes of its parameters (:func:`block_kind`). The first call of each kind runs
plainly, to measure what autograd saves for it, and has its non-tensor arguments watched for in-place changes
(:mod:`~deltaswap.swap.arguments`); every later call of a kind seen before runs checkpointed, with
everything recomputed (the least memory). Every call's ops are timed and their output bytes recorded
(:class:`~deltaswap.swap.profile.OpProfiler`), so each block call is planned from its own costs. A
compiled block (``torch.compile``) runs compiled in both cases and is timed whole, as one op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from .arguments import check_unchanged, watched_arguments
from .planner import BlockCost
from .profile import COMPILED_OP, OpProfiler
from .recompute import (
    LocalStore,
    OpDecision,
    SavedStore,
    _Frame,
    _RecordingMode,
    checkpoint_all,
    checkpoint_with_policy,
)
from .step import held_elsewhere


def block_kind(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               structure: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    """What tells block calls apart: the block's class and :func:`block_structure` (``structure``, if
    already known), its tensor arguments' shapes, dtypes and devices, and the types of its other
    arguments (``None`` and a tensor differ), keywords by name."""
    return (type(block), structure if structure is not None else block_structure(block),
            shape_key(args, kwargs))


def block_structure(block: nn.Module) -> tuple[Any, ...]:
    """The names and shapes of a block's parameters: two blocks of one class that take the same input
    can still differ (a ResNet stage's first bottleneck, with its downsample and new width, takes what
    the previous stage's bottlenecks take)."""
    return tuple((name, tuple(p.shape)) for name, p in block.named_parameters())


def shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The shapes, dtypes and devices of the tensor arguments, and the types of the others (keyword
    arguments with their names): calls that agree here are taken to run the same ops."""
    def one(v: Any) -> Any:
        return (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else type(v)

    return (*(one(v) for v in args), *((k, one(v)) for k, v in kwargs.items()))


def recompute_all(index: int, op: object) -> OpDecision:
    """The per-op policy that stores nothing."""
    return OpDecision.RECOMPUTE


class BlockProfile:
    """What the profiling step of one input shape measures, call by call.

    Use it through :class:`~deltaswap.swap.manager.ActivationManager`: :meth:`run` runs each block call
    of the step, and after the step's backward :meth:`costs` gives one
    :class:`~deltaswap.swap.planner.BlockCost` per call.

    Args:
        device: ``"cuda"`` or ``"cpu"``: how ops are timed (CUDA events, or the wall clock).
    """

    def __init__(self, device: str) -> None:
        self.ops = OpProfiler(device)
        self.inputs: list[int] = []
        """Bytes of the storages of each call's tensor arguments (each once, whole)."""
        self.input_tensors: list[int] = []
        """Bytes of each call's tensor arguments, tensor by tensor (as the engine counts what it keeps)."""
        self.saved: list[int] = []
        """Bytes autograd saves for each call when it runs plainly (measured once per kind)."""
        self.names: list[str] = []
        """The qualified name of the block of each call."""
        self.modules: list[nn.Module] = []
        self.plain_calls: list[int] = []
        """The calls that ran plainly (the first of each kind); every other call ran checkpointed."""
        self.chained: list[tuple[int, int]] = []
        """For each call, the bytes of its input storages that the previous call saves as its output
        when it runs plainly, and how many of those bytes this call saves again plainly."""
        self.input_storages: list[tuple[tuple[int, int], ...]] = []
        """For each call, the storages of the inputs a checkpointed call keeps (its tensor arguments,
        positional and keyword) as ``(id, bytes)``, ids shared between calls that take the same tensor."""
        self.saved_inputs: list[tuple[tuple[int, int], ...]] = []
        """For each call, the storages of the inputs it saves when it runs plainly, as ``(id, bytes)``
        with :attr:`input_storages`' ids."""
        self._storage_ids: dict[int, tuple[int, StorageWeakRef]] = {}
        self._next_id = 0
        self._kinds: dict[tuple[Any, ...], int] = {}
        self._kind_ends: dict[tuple[Any, ...], tuple[dict[int, int], dict[int, int], dict[int, int]]] = {}
        self._saved_outputs: dict[int, tuple[int, StorageWeakRef]] = {}
        self._structures: dict[int, tuple[Any, ...]] = {}
        self.baseline = 0
        """GPU bytes allocated when the step began."""
        self.forward_end = 0
        """Activation bytes held when the forward pass ended."""
        # read in the backward: when the last block's output gets its gradient (the head's backward is
        # done) and when the first block's input gets its gradient (the blocks' backward is done)
        self.head_peak: int | None = None
        self.head_mark: Any = None
        self.blocks_peak: int | None = None
        self.blocks_mark: Any = None
        self.backward_peaks: list[tuple[int, int]] = []
        """``(call, activation bytes at the peak of its backward)`` as each call's backward ended
        (when its input got its gradient), in that order: the last call's first."""

    def call_peaks(self) -> list[int] | None:
        """The peak of each call's backward, in call order, if every call measured one and they came
        in reverse call order (each block's backward after the next one's); else ``None`` (a block
        whose input needs no gradient, or inputs shared between calls)."""
        calls = [call for call, _ in self.backward_peaks]
        if not calls or calls != list(range(len(self.inputs) - 1, -1, -1)):
            return None
        return [peak for _, peak in reversed(self.backward_peaks)]

    @property
    def kinds(self) -> int:
        """How many kinds of block call the step ran."""
        return len(self._kinds)

    def run(self, call: int, block: nn.Module, name: str, store: SavedStore | None,
            compiled: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
        """Run block call number ``call`` (of module ``block``, named ``name``) under the profiler: plainly
        if it is the first of its kind, else checkpointed with everything recomputed (its stored outputs,
        none, would go to ``store``).

        ``compiled``, if not ``None``, runs the block compiled (``torch.compile``): each call then runs as it
        will in training, timed whole as one op that cannot be stored (its ops run inside the graph,
        where no dispatch mode sees them), so the block is planned whole.

        Raises:
            ValueError: if the block changed a non-tensor argument in place (see
                :func:`~deltaswap.swap.arguments.check_unchanged`).
        """
        # what a checkpointed call keeps of its input, positional and keyword (torch's checkpoint saves
        # both), each storage whole and once (a leaf that requires grad is the user's to hold)
        in_tensors = [v for v in _tensors([*args, *kwargs.values()]) if not held_elsewhere(v)]
        # and every tensor it is given, in tuples too (a rotary embedding's cos and sin), that it may save
        nested = [v for v in _tensors(tree_leaves([*args, *kwargs.values()])) if not held_elsewhere(v)]
        distinct = {v.untyped_storage().data_ptr(): v for v in in_tensors}.values()
        self.input_storages.append(tuple((self._storage_id(v), v.untyped_storage().nbytes())
                                         for v in distinct))
        self.inputs.append(sum(n for _, n in self.input_storages[-1]))
        self.input_tensors.append(sum(v.numel() * v.element_size() for v in in_tensors))
        self.names.append(name)
        self.modules.append(block)
        structure = self._structures.get(id(block))
        if structure is None:
            structure = self._structures[id(block)] = block_structure(block)
        kind = block_kind(block, args, kwargs, structure)
        if kind in self._kinds:
            if compiled is None:
                out = checkpoint_with_policy(block, *args, policy=recompute_all, store=store,
                                             profiler=self.ops, fn_kwargs=kwargs)
            else:
                out = self.ops.whole(COMPILED_OP, partial(checkpoint_all, compiled, *args, fn_kwargs=kwargs))
            outputs = _tensors(tree_leaves(out))
        else:
            watched = watched_arguments(args, kwargs)
            saved = SavedBytes()  # what the engine would keep or swap
            with saved.hooks():
                if compiled is None:
                    with _RecordingMode(_Frame(recompute_all, LocalStore(), self.ops)):
                        out = block(*args, **kwargs)
                else:
                    out = self.ops.whole(COMPILED_OP, partial(compiled, *args, **kwargs))
            check_unchanged(watched, args, kwargs, name, block)
            outputs = _tensors(tree_leaves(out))
            self._kinds[kind] = saved.total
            # which of its inputs and outputs (by position) a call of this kind saves when run plainly
            self._kind_ends[kind] = (saved.positions(in_tensors), saved.positions(outputs),
                                     saved.positions(nested))
            self.plain_calls.append(call)
        self.saved.append(self._kinds[kind])
        self._chain(kind, in_tensors, outputs, nested)
        return out

    def _chain(self, kind: tuple[Any, ...], inputs: list[torch.Tensor], outputs: list[torch.Tensor],
               nested: list[torch.Tensor]) -> None:
        """Record what this call's input shares with the previous call's saved output and which of the
        tensors it is given it saves (run plainly), and remember which of its own outputs it saves for
        the next call."""
        saved_in, saved_out, saved_nested = self._kind_ends[kind]
        shared = shared_again = 0
        seen: set[int] = set()
        for i, v in enumerate(inputs):
            storage = v.untyped_storage()
            known = self._saved_outputs.get(storage.data_ptr())
            if storage.data_ptr() in seen or known is None or known[1].expired():
                continue  # not the previous call's (a storage since freed may have left its address)
            seen.add(storage.data_ptr())
            shared += known[0]
            # what this call's kind counted for that input when it ran plainly (its storage may have
            # been another size then): no more than that comes off its saved bytes
            shared_again += min(known[0], saved_in.get(i, 0))
        self.chained.append((shared, shared_again))
        # the tensors given that it saves when kept, by storage id, at no more than its kind counted
        saved_ids: dict[int, int] = {}
        for i, n in saved_nested.items():
            if i < len(nested):
                sid = self._storage_id(nested[i])
                saved_ids[sid] = max(saved_ids.get(sid, 0), min(n, nested[i].untyped_storage().nbytes()))
        self.saved_inputs.append(tuple(saved_ids.items()))
        self._saved_outputs = {
            outputs[i].untyped_storage().data_ptr(): (min(n, outputs[i].untyped_storage().nbytes()),
                                                      StorageWeakRef(outputs[i].untyped_storage()))
            for i, n in saved_out.items() if i < len(outputs)}

    def _storage_id(self, tensor: torch.Tensor) -> int:
        """The id of ``tensor``'s storage in this step: the same for every call given that storage, a
        new one for a storage at the address of one since freed."""
        ptr = tensor.untyped_storage().data_ptr()
        known = self._storage_ids.get(ptr)
        if known is None or known[1].expired():
            known = self._storage_ids[ptr] = (self._next_id, StorageWeakRef(tensor.untyped_storage()))
            self._next_id += 1
        return known[0]

    def costs(self) -> tuple[BlockCost, ...]:
        """One cost per block call, in call order (waits for the timing events). The gradient bytes of
        a block's parameters count at its first call only."""
        seen: set[int] = set()
        result = []
        for k, ops in enumerate(self.ops.blocks()):
            module = self.modules[k]
            grads = 0 if id(module) in seen else grad_bytes(module)
            seen.add(id(module))
            chained, chained_saved = self.chained[k]
            result.append(BlockCost(tuple(ops), self.inputs[k], self.saved[k], grads, chained, chained_saved,
                                    self.input_storages[k], self.saved_inputs[k]))
        return tuple(result)


class SavedBytes:
    """Counts the bytes of the storages autograd saves while :meth:`hooks` is active, as the swap engine
    counts them (each storage once; parameters and their views left out). Where there is no engine (a
    CPU run), this is how the profiling step measures what lies outside the blocks."""

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self._outside: dict[int, int] = {}
        self._depth = 0

    @property
    def total(self) -> int:
        """Bytes counted so far."""
        return sum(self._storages.values())

    @property
    def outside(self) -> int:
        """Bytes of the storages saved outside :meth:`in_block` regions (what lies outside the blocks;
        a storage also saved inside a block, as a checkpointed block's input, is among them)."""
        return sum(self._outside.values())

    @contextlib.contextmanager
    def in_block(self) -> Iterator[None]:
        """Count what is saved inside as saved by a block."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def positions(self, tensors: list[torch.Tensor]) -> dict[int, int]:
        """The positions in ``tensors`` of those whose storage was counted, with the bytes counted."""
        return {i: self._storages[v.untyped_storage().data_ptr()] for i, v in enumerate(tensors)
                if v.untyped_storage().data_ptr() in self._storages}

    def hooks(self) -> saved_tensors_hooks:
        """The saved-tensor hooks that count (and change nothing)."""
        return saved_tensors_hooks(self._pack, _identity)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not held_elsewhere(t):
            storage = t.untyped_storage()
            self._storages[storage.data_ptr()] = storage.nbytes()
            if not self._depth:
                self._outside[storage.data_ptr()] = storage.nbytes()
        return t


def grad_bytes(module: nn.Module) -> int:
    """Bytes of the gradients of ``module``'s trainable parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values`` (not nested), in order."""
    return [v for v in values if isinstance(v, torch.Tensor)]
