"""Putting a model's blocks under a manager: find them, refuse what deltaswap cannot plan, and route each
block's calls through the manager with torch's ``CheckpointWrapper`` (state-dict keys unchanged).

:func:`wrap_blocks` does it and returns :class:`WrappedBlocks`, which undoes it. The manager
(:class:`~deltaswap.swap.manager.ActivationManager`) decides what each call does; this module only
finds, checks and installs.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

# Imported with the package, not lazily: torch's checkpoint imports dynamo at its first call, and that
# first import keeps the frames on the stack at that moment alive for good (the manager's, the step's,
# the model's), which would keep the first manager of a process and its pinned memory alive.
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_WRAPPED_MODULE,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from .discovery import describe_blocks, find_blocks


class RunsBlocks(Protocol):
    """What a wrapped block calls: the manager's block runner."""

    def _run_block(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any: ...


@dataclass
class WrappedBlocks:
    """A model whose blocks run through a manager, and what undoes it (:meth:`unwrap`)."""

    blocks: list[nn.Module] = field(default_factory=list)
    """The planned modules, in order (a ``torch.compile`` wrapper where the model calls one)."""
    names: list[str] = field(default_factory=list)
    """Their qualified names in the model."""
    wrappers: list[tuple[nn.Module, str, CheckpointWrapper]] = field(default_factory=list)
    """(parent, attribute, the wrapper put there) for each block."""
    compiled: dict[int, Callable[..., Any]] = field(default_factory=dict)
    """Block id -> what runs it compiled (the blocks that run compiled only)."""

    @functools.cached_property
    def name_of(self) -> dict[int, str]:
        """Block id -> its qualified name."""
        return {id(b): n for b, n in zip(self.blocks, self.names, strict=True)}

    def unwrap(self) -> None:
        """Put the original blocks back into their parents."""
        for parent, child_name, wrapper in self.wrappers:
            setattr(parent, child_name, wrapper._checkpoint_wrapped_module)
        self.wrappers = []

    @property
    def block_wrappers(self) -> list[nn.Module]:
        """The modules the model now calls for its blocks, in the blocks' order."""
        by_block = {id(w._checkpoint_wrapped_module): w for _, _, w in self.wrappers}
        return [by_block[id(b)] for b in self.blocks]


def wrap_blocks(model: nn.Module, blocks: Sequence[nn.Module] | None, runner: RunsBlocks, *,
                block_types: tuple[type, ...] | None = None,
                compile_options: dict[str, Any] | None = None) -> WrappedBlocks:
    """Route the calls of ``model``'s blocks through ``runner`` (held weakly: the model never keeps its
    manager alive). The blocks are ``blocks`` if given, else the modules of ``block_types``, else every
    container's repeated children (:func:`~deltaswap.swap.discovery.find_blocks`). With
    ``compile_options`` (``SwapConfig.compile_options()``) each block not compiled yet is compiled.

    Example::

        >>> wrapped = wrap_blocks(model, None, mgr)                     # doctest: +SKIP
        >>> wrapped.names                                               # doctest: +SKIP
        ['h.0', 'h.1', ...]
        >>> wrapped.unwrap()                                            # doctest: +SKIP

    Raises:
        ValueError: if no blocks are found (the message says how to name them), if ``blocks`` are not
            modules of ``model`` or one lies inside another, if the blocks are already wrapped (by a live
            manager or torch's ``checkpoint_wrapper``), if Hugging Face gradient checkpointing is on, or
            if the model is compiled as a whole (or a compiled part of it is not a block): each message
            says what to do instead.
    """
    if compiled_whole(model):
        whole = type(getattr(model, "_orig_mod", model)).__name__
        raise ValueError(
            f"{whole} is compiled as a whole with torch.compile: deltaswap "
            f"plans and runs its blocks one by one, which a whole-model graph hides. Wrap the "
            f"uncompiled model and compile its blocks: SwapConfig(compile=True) (SwapStrategy(compile="
            f"True), DeltaSwapPlugin(compile=True)), or block.compile() on each block before wrapping."
        )
    _remove_orphaned_wrappers(model)
    names = {id(m): name for name, m in model.named_modules()}
    found = list(blocks) if blocks is not None else find_blocks(model, block_types)
    found = _compiled_wrappers(model, found, names)
    _check_blocks(model, found, names)
    if compile_options is None:
        _warn_compiled_inside(model, found, names)
    compiled: dict[int, Callable[..., Any]] = {id(b): b for b in found if compiled_whole(b)}
    if compile_options is not None:  # the blocks compiled whole already run as they are
        compiled.update({id(b): torch.compile(b, **compile_options) for b in found if id(b) not in compiled})
    ids = {id(b) for b in found}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_fn=_block_runner(runner)),
        check_fn=lambda m: id(m) in ids,
    )
    wrappers = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, CheckpointWrapper) and id(child._checkpoint_wrapped_module) in ids
    ]
    return WrappedBlocks(found, [names[id(b)] for b in found], wrappers, compiled)


def compiled_whole(module: nn.Module) -> bool:
    """Whether calling ``module`` runs it compiled: an ``OptimizedModule`` (``torch.compile(module)``),
    or compiled in place (``module.compile()``)."""
    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def _compiled_inside(block: nn.Module) -> bool:
    """Whether ``block``, or a module inside it, is compiled (``module.compile()``, which compiles the
    module's call in place, or an ``OptimizedModule``)."""
    return any(compiled_whole(m) for m in block.modules())


def _check_blocks(model: nn.Module, blocks: list[nn.Module], names: dict[int, str]) -> None:
    """Refuse blocks that deltaswap cannot plan, each with what to do instead.

    Raises:
        ValueError: see :func:`wrap_blocks`.
    """
    _check_given_blocks(blocks, names)
    ids = {id(b) for b in blocks}
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    # compiled modules that are not blocks: refused, unless inside a block (then run as part of it)
    # or, compiled in place, holding no block (a compiled head: it runs outside the blocks)
    parts = [name for name, m in model.named_modules()
             if id(m) not in ids and id(m) not in inside and compiled_whole(m)
             and (isinstance(m, OptimizedModule) or any(id(x) in ids for x in m.modules()))]
    if parts and blocks:  # (no blocks at all: the error below says how to name them)
        raise ValueError(
            f"{parts[0]} of {type(model).__name__} is compiled with torch.compile but is not one of the "
            f"blocks deltaswap plans ({describe_blocks([names[id(b)] for b in blocks], blocks)}): "
            f"wrap the uncompiled model and compile the blocks, with SwapConfig(compile=True) or "
            f"block.compile() on each block, or pass the compiled modules as the blocks "
            f"(mgr.wrap(model, blocks=[...]))."
        )
    if any(isinstance(b, CheckpointWrapper) or _CHECKPOINT_WRAPPED_MODULE in names[id(b)].split(".")
           for b in blocks):
        raise ValueError(
            f"the blocks of {type(model).__name__} are already wrapped (by another ActivationManager or "
            f"torch's checkpoint_wrapper): call unwrap() on that manager, or remove the wrappers, first"
        )
    if not blocks:
        raise ValueError(
            f"deltaswap found no repeated blocks in {type(model).__name__}: no ModuleList, Sequential "
            f"or ModuleDict holds two or more modules of one class with parameters. Name the block "
            f"class with SwapConfig(block_types=(YourLayer,)), or pass the modules: "
            f"mgr.wrap(model, blocks=[...])."
        )
    checkpointing = [names[id(b)] for b in blocks if getattr(b, "gradient_checkpointing", False) is True]
    if checkpointing:
        raise ValueError(
            f"Hugging Face gradient checkpointing is on in {type(model).__name__} (its layer "
            f"{checkpointing[0]} checkpoints itself): deltaswap decides what to recompute. Call "
            f"model.gradient_checkpointing_disable() (activation_checkpointing_disable() in newer "
            f"transformers) before wrapping; deltaswap turns the KV cache off in training steps, as "
            f"HF's checkpointing does."
        )


def _warn_compiled_inside(model: nn.Module, blocks: list[nn.Module], names: dict[int, str]) -> None:
    """One warning if modules inside the blocks (not the blocks) are compiled in place."""
    inner = [names[id(b)] for b in blocks if not compiled_whole(b) and _compiled_inside(b)]
    if inner:
        warnings.warn(
            f"deltaswap: {len(inner)} block(s) of {type(model).__name__} ({inner[0]} first) are "
            f"compiled in place in parts (module.compile() on modules inside them). deltaswap's "
            f"profiling step and its per-op plans run those eagerly, under dispatch modes that "
            f"torch.compile does not trace, so those steps' gradients are eager PyTorch's, not the "
            f"compiled modules' (they differ in rounding). Compile the blocks themselves "
            f"(SwapConfig(compile=True), or block.compile() on each block): compiled blocks are "
            f"planned whole and always run compiled.",
            UserWarning,
            stacklevel=4,
        )


def _block_runner(runner: RunsBlocks) -> Callable[..., Any]:
    """What a wrapped block calls: ``runner``'s block runner, through a weak reference, so that the
    model does not keep its manager (and the pinned memory it holds) alive in a cycle. Once the manager
    is gone, the block runs plainly."""
    ref = weakref.ref(runner)

    def run(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        mgr = ref()
        return block(*args, **kwargs) if mgr is None else mgr._run_block(block, *args, **kwargs)

    run.manager = ref  # type: ignore[attr-defined]
    return run


def _remove_orphaned_wrappers(model: nn.Module) -> None:
    """Take out the block wrappers of managers that are gone (dropped without ``unwrap()``), so that
    a new manager can wrap the model; the wrappers of a live manager stay (``wrap`` refuses them)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            runner = getattr(getattr(child, "checkpoint_fn", None), "func", None)
            ref = getattr(runner, "manager", None)
            if isinstance(child, CheckpointWrapper) and isinstance(ref, weakref.ref) and ref() is None:
                setattr(parent, child_name, child._checkpoint_wrapped_module)


def _compiled_wrappers(model: nn.Module, blocks: list[nn.Module], names: dict[int, str]) -> list[nn.Module]:
    """``blocks``, each block that a ``torch.compile`` wrapper holds (``model.layers[i] =
    torch.compile(layer)``, found by its class through ``block_types``) replaced by that wrapper, which
    is what the model calls."""
    modules = dict(model.named_modules())
    result = []
    for block in blocks:
        parent, _, last = names.get(id(block), "").rpartition(".")
        wrapper = modules.get(parent) if last == "_orig_mod" else None
        result.append(wrapper if isinstance(wrapper, OptimizedModule) else block)
    return result


def _check_given_blocks(blocks: Sequence[nn.Module], names: dict[int, str]) -> None:
    """Refuse blocks that are not modules of the model, or that lie inside one another.

    Raises:
        ValueError: naming the module.
    """
    for block in blocks:
        if id(block) not in names:
            raise ValueError(f"{type(block).__name__} given as a block is not a module of the model: pass "
                             f"modules of the model you wrap")
    given = sorted(names[id(b)] for b in blocks)
    for outer in given:
        inner = next((n for n in given if outer and n.startswith(f"{outer}.")), None)
        if inner is not None:
            raise ValueError(f"block {inner} lies inside block {outer}: a block runs (and is recomputed) "
                             f"with its parent; pass one of the two")
