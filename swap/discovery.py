"""Find the blocks of a model that deltaswap plans one by one.

A *block* is a module whose call is kept, swapped or recomputed as a unit: a transformer layer, a ResNet
bottleneck, a T5 encoder or decoder layer. Models bring them in many arrangements: one ``ModuleList`` of
layers (GPT, Llama, BERT), two stacks (T5's encoder and decoder), four ``Sequential`` stages of different
widths (ResNet), stages between which single modules sit (Swin's patch merging, a UNet's down and up
blocks). Discovery covers all of them: every container's repeated children, outermost only.

Example::

    >>> import torch.nn as nn
    >>> class Layer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    >>> model = nn.Module()
    >>> model.stage1 = nn.Sequential(Layer(), Layer())
    >>> model.stage2 = nn.Sequential(Layer(), Layer(), Layer())
    >>> len(find_blocks(model))
    5
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
"""Modules that only hold others: searched inside before they are taken as blocks."""


def find_blocks(model: nn.Module, block_types: tuple[type, ...] | None = None) -> list[nn.Module]:
    """The modules to plan per block, in the order of ``model.named_modules()``.

    With ``block_types``: every module of those classes, outermost only (a block inside another block
    runs, and is recomputed, with its parent).

    Without: in every container (``ModuleList``, ``Sequential``, ``ModuleDict``) anywhere in the model,
    the children of a class that occurs there at least twice and that have parameters. A container
    among them is searched first, and taken as a block only if it holds none (a ``ModuleList`` of
    ``Sequential(Linear, Tanh)`` layers). The search does not go inside a block it found, and goes on
    inside every other module. So a GPT's layers, all four stages of a ResNet (16 bottlenecks, the
    first of each stage with its downsample), T5's encoder and decoder layers, or a UNet's resnets
    inside its down blocks are all found.

    Where a block sits inside an FSDP unit (``FullyShardedDataParallel``), the block is the module the
    unit wraps: planned inside the unit, a block is recomputed while FSDP holds its parameters
    gathered, as torch's activation checkpointing composes with FSDP.

    Example::

        >>> blocks = find_blocks(torchvision.models.resnet50())          # doctest: +SKIP
        >>> len(blocks), type(blocks[0]).__name__                         # doctest: +SKIP
        (16, 'Bottleneck')
    """
    if block_types is not None:
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, block_types)]
        # only the outermost: a block inside another block runs (and is recomputed) with its parent
        outer = [(name, m) for name, m in found
                 if not any(name.startswith(f"{other}.") for other, _ in found if other != name)]
        return [m for _, m in outer]
    return list(_repeated_children(model))


def _repeated_children(module: nn.Module) -> Iterator[nn.Module]:
    """Blocks under ``module`` (see :func:`find_blocks`), in module order."""
    children = list(module.children())
    repeated: set[int] = set()
    if isinstance(module, CONTAINERS):
        counts: dict[type, int] = {}
        for child in children:
            inner = inside_fsdp_unit(child)
            if _has_parameters(inner):
                counts[type(inner)] = counts.get(type(inner), 0) + 1
        repeated = {id(c) for c in children if counts.get(type(inside_fsdp_unit(c)), 0) >= 2}
    for child in children:
        if id(child) in repeated and not isinstance(child, CONTAINERS):
            yield inside_fsdp_unit(child)
            continue
        inner = list(_repeated_children(child))
        if inner or id(child) not in repeated:
            yield from inner
        else:  # a repeated container with no blocks inside (a user's Sequential(Linear, Tanh) layers)
            yield child


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def inside_fsdp_unit(module: nn.Module) -> nn.Module:
    """The module an FSDP unit wraps (``module`` itself if it is none)."""
    if not torch.distributed.is_available():
        return module
    from torch.distributed.fsdp import FullyShardedDataParallel

    return module.module if isinstance(module, FullyShardedDataParallel) else module


def describe_blocks(names: list[str], blocks: list[nn.Module]) -> str:
    """One line per run of blocks of one class, for people: ``layer1.0 .. layer4.2: Bottleneck x16``.

    Example::

        >>> describe_blocks(["h.0", "h.1"], [nn.Linear(1, 1), nn.Linear(1, 1)])
        'h.0 .. h.1: Linear x2'
    """
    runs: list[tuple[str, str, str, int]] = []  # (class, first name, last name, count)
    for name, block in zip(names, blocks, strict=True):
        cls = type(block).__name__
        if runs and runs[-1][0] == cls:
            runs[-1] = (cls, runs[-1][1], name, runs[-1][3] + 1)
        else:
            runs.append((cls, name, name, 1))
    return "; ".join(f"{first} .. {last}: {cls} x{n}" if n > 1 else f"{first}: {cls}"
                     for cls, first, last, n in runs)
