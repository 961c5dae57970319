"""The profiling step: measure every block call of one input shape, each as what it is.

The first step with a new input shape runs every block call under the profiler. Blocks are not all
alike (a ResNet's stages differ in width and each begins with a downsample; T5's decoder layers run
cross-attention; T5's first layer computes the position bias the others receive), so calls are told
apart by their *kind*: the block's class, the shapes and dtypes of its tensor arguments, the kinds of its
other arguments and the shapes of its parameters (:func:`block_kind`). The first call of each kind runs
plainly, to measure what autograd saves for it, and has its non-tensor arguments watched for in-place changes
(:mod:`~deltaswap.swap.arguments`); every later call of a kind seen before runs checkpointed, with
everything recomputed (the least memory). Every call's ops are timed and their output bytes recorded
(:class:`~deltaswap.swap.profile.OpProfiler`), so each block call is planned from its own costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from .arguments import check_unchanged, watched_arguments
from .planner import BlockCost
from .profile import OpProfiler
from .recompute import LocalStore, OpDecision, SavedStore, _Frame, _RecordingMode, checkpoint_with_policy
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
        """Bytes of each call's positional tensor arguments."""
        self.saved: list[int] = []
        """Bytes autograd saves for each call when it runs plainly (measured once per kind)."""
        self.names: list[str] = []
        """The qualified name of the block of each call."""
        self.modules: list[nn.Module] = []
        self.plain_calls: list[int] = []
        """The calls that ran plainly (the first of each kind); every other call ran checkpointed."""
        self.chained: list[int] = []
        """Bytes of each call's input that are the previous call's output."""
        self.ends: list[tuple[int, int]] = []
        """For each call, the bytes of its own output and of its own input among what it saves plainly
        (measured once per kind)."""
        self.input_storages: list[tuple[tuple[int, int], ...]] = []
        """For each call, its kept positional inputs' storages as ``(id, bytes)``, ids shared between
        calls that take the same tensor."""
        self._storage_ids: dict[int, tuple[int, StorageWeakRef]] = {}
        self._next_id = 0
        self._kinds: dict[tuple[Any, ...], int] = {}
        self._kind_ends: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._last_outputs: dict[int, int] = {}
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

    @property
    def kinds(self) -> int:
        """How many kinds of block call the step ran."""
        return len(self._kinds)

    def run(self, call: int, block: nn.Module, name: str, store: SavedStore | None,
            *args: Any, **kwargs: Any) -> Any:
        """Run block call number ``call`` (of module ``block``, named ``name``) under the profiler: plainly
        if it is the first of its kind, else checkpointed with everything recomputed (its stored outputs,
        none, would go to ``store``).

        Raises:
            ValueError: if the block changed a non-tensor argument in place (see
                :func:`~deltaswap.swap.arguments.check_unchanged`).
        """
        # what a checkpointed call keeps of its input (a leaf that requires grad is the user's to hold)
        kept_args = [v for v in args if isinstance(v, torch.Tensor) and not held_elsewhere(v)]
        self.inputs.append(sum(v.numel() * v.element_size() for v in kept_args))
        distinct = {v.untyped_storage().data_ptr(): v for v in kept_args}.values()
        self.input_storages.append(tuple((self._storage_id(v), v.untyped_storage().nbytes())
                                         for v in distinct))
        self.names.append(name)
        self.modules.append(block)
        inputs = _storages([*args, *kwargs.values()])
        self.chained.append(sum(n for ptr, n in inputs.items() if ptr in self._last_outputs))
        structure = self._structures.get(id(block))
        if structure is None:
            structure = self._structures[id(block)] = block_structure(block)
        kind = block_kind(block, args, kwargs, structure)
        if kind in self._kinds:
            self.saved.append(self._kinds[kind])
            self.ends.append(self._kind_ends[kind])
            out = checkpoint_with_policy(block, *args, policy=recompute_all, store=store, profiler=self.ops,
                                         fn_kwargs=kwargs)
            self._last_outputs = _storages(tree_leaves(out))
            return out
        watched = watched_arguments(args, kwargs)
        saved = SavedBytes()  # what the engine would keep or swap
        frame = _Frame(recompute_all, LocalStore(), self.ops)
        with saved.hooks(), _RecordingMode(frame):
            out = block(*args, **kwargs)
        check_unchanged(watched, args, kwargs, name, block)
        self._last_outputs = _storages(tree_leaves(out))
        self._kinds[kind] = saved.total
        self._kind_ends[kind] = (saved.of(self._last_outputs), saved.of(inputs))
        self.saved.append(self._kinds[kind])
        self.ends.append(self._kind_ends[kind])
        self.plain_calls.append(call)
        return out

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
            output_saved, input_saved = self.ends[k]
            result.append(BlockCost(tuple(ops), self.inputs[k], self.saved[k], grads, output_saved,
                                    input_saved, self.chained[k], self.input_storages[k]))
        return tuple(result)


class SavedBytes:
    """Counts the bytes of the storages autograd saves while :meth:`hooks` is active, as the swap engine
    counts them (each storage once; parameters and their views left out). Where there is no engine (a
    CPU run), this is how the profiling step measures what lies outside the blocks."""

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}

    @property
    def total(self) -> int:
        """Bytes counted so far."""
        return sum(self._storages.values())

    def of(self, storages: dict[int, int]) -> int:
        """Bytes counted so far that belong to ``storages`` (by address, as :func:`_storages` gives)."""
        return sum(n for ptr, n in self._storages.items() if ptr in storages)

    def hooks(self) -> saved_tensors_hooks:
        """The saved-tensor hooks that count (and change nothing)."""
        return saved_tensors_hooks(self._pack, _identity)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not held_elsewhere(t):
            self._storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t


def grad_bytes(module: nn.Module) -> int:
    """Bytes of the gradients of ``module``'s trainable parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _storages(values: Any) -> dict[int, int]:
    """The storages of the tensors among ``values`` (not nested), by address, with their bytes."""
    return {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for v in values if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes()}
