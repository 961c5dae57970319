"""What a block's call arguments need before deltaswap runs the block: no KV cache, nothing mutated.

A block that deltaswap may recompute runs its forward twice, once in the forward pass and once in the
backward. Arguments the block changes in place are changed twice:

- **KV caches.** Hugging Face transformers keep a cache in the training forward (``use_cache`` defaults to
  True, and a ``DynamicCache`` is passed to every layer, which appends to it). A replay appends again:
  a shape error deep inside attention, or silently wrong attention over doubled keys. As HF's own
  gradient checkpointing does, deltaswap turns the cache off in a training step: ``use_cache=False``,
  and the cache arguments (``cache``, ``past_key_value(s)``, ``layer_past``, or any positional
  ``Cache`` object) become ``None``, with one warning naming the model.
- **Anything else the block mutates** (a list it appends to, an object whose fields it sets): found in
  the profiling step by comparing a fingerprint of the block's non-tensor arguments before and after
  its first call, and refused with an error that names the block and the argument.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")
"""Keyword arguments that carry a KV cache in Hugging Face layers (the name changed between releases)."""


def is_kv_cache(value: object) -> bool:
    """Whether ``value`` is a Hugging Face KV cache (an instance of a class named ``Cache`` or of one
    derived from it: ``DynamicCache``, ``StaticCache``, ``EncoderDecoderCache``...)."""
    if value is None or isinstance(value, torch.Tensor):  # most arguments: no class walk
        return False
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def without_cache(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """``args`` and ``kwargs`` with the KV cache turned off, and the names of what was changed (empty
    when nothing was: the arguments are then returned as they came).

    A layer that only reads the cache (HF's ``_can_checkpoint_with_cache``) keeps it, as under HF's own
    checkpointing; ``use_cache`` is turned off all the same.

    Example::

        >>> import torch.nn as nn
        >>> without_cache(nn.Identity(), (1,), {"use_cache": True})
        ((1,), {'use_cache': False}, ['use_cache=False'])
    """
    changed: list[str] = []
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return args, kwargs, changed  # tensors only (a CNN's blocks): nothing to look at
    # a class attribute of HF's layers, read from the layer's class (a torch.compile wrapper holds the
    # layer as _orig_mod), which spares nn.Module's __getattr__ a miss at every call
    layer = block._modules.get("_orig_mod", block)
    keeps_cache = bool(getattr(type(layer), "_can_checkpoint_with_cache", False))
    new_kwargs = kwargs
    if kwargs.get("use_cache"):
        new_kwargs = {**kwargs, "use_cache": False}
        changed.append("use_cache=False")
    if not keeps_cache:
        for name in CACHE_ARGUMENTS:
            if new_kwargs.get(name) is not None:
                new_kwargs = {**new_kwargs, name: None}
                changed.append(f"{name}=None")
        if any(is_kv_cache(a) for a in args):
            args_in = args
            positions = [i for i, a in enumerate(args) if is_kv_cache(a)]
            args = tuple(None if i in positions else a for i, a in enumerate(args))
            changed.extend(f"positional argument {i} ({type(args_in[i]).__name__})=None" for i in positions)
    return args, new_kwargs, changed


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_DEPTH = 4


def fingerprint(value: object, depth: int = _DEPTH) -> object:
    """A value that changes when ``value`` is changed in place, a few levels deep: the lengths and
    members of lists, dicts and sets, the fields of plain objects, the identity and version counter of
    tensors inside them. Modules are left out (their parameters are the model's business), and so are
    tensors passed directly (autograd tracks those)."""
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if depth == 0 or isinstance(value, nn.Module):
        return ("object", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value), id(value), tuple(fingerprint(v, depth - 1) for v in value))
    if isinstance(value, dict):
        return (type(value), id(value), tuple((k, fingerprint(v, depth - 1)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), id(value), len(value), frozenset(id(v) for v in value))
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return (type(value), id(value), tuple((k, fingerprint(v, depth - 1)) for k, v in fields.items()))
    return ("object", id(value))


def watched_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, object]:
    """The fingerprints of the call's arguments that a block could change in place (everything that is
    not a tensor, a module or an immutable value), by a name for people."""
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)] + \
            [(f"argument {k!r}", v) for k, v in kwargs.items()]
    return {name: fingerprint(v) for name, v in named
            if not isinstance(v, (*_IMMUTABLE, torch.Tensor, nn.Module)) and _holds_state(v)}


def _holds_state(value: object) -> bool:
    """Tuples of tensors and plain values cannot be changed in place; everything else can."""
    if isinstance(value, tuple):
        return any(not isinstance(v, (*_IMMUTABLE, torch.Tensor)) and _holds_state(v) for v in value)
    return True


def check_unchanged(before: dict[str, object], args: tuple[Any, ...], kwargs: dict[str, Any],
                    block_name: str, block: nn.Module) -> None:
    """Refuse a block that changed one of its arguments in place during its forward (``before``: the
    :func:`watched_arguments` of the same call, taken before it ran).

    Raises:
        ValueError: naming the block and the argument, and what to change.
    """
    if not before:
        return
    after = watched_arguments(args, kwargs)
    for name, print_before in before.items():
        if after.get(name) != print_before:
            value = args[int(name.rsplit(" ", 1)[1])] if name.startswith("positional") else \
                kwargs[name.split("'")[1]]
            raise ValueError(
                f"deltaswap: block {block_name} ({type(block).__name__}) changed its {name} "
                f"({type(value).__name__}) in place during its forward. deltaswap may run a block's "
                f"forward again in the backward pass (recompute), which would change it a second time. "
                f"Pass the block only values it does not modify (return new values instead), or leave "
                f"this block out of deltaswap's blocks (SwapConfig(block_types=...) or "
                f"wrap(model, blocks=[...]))."
            )
