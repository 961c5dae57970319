"""Accelerate's training loop, with or without DeltaSwapPlugin, shared by the Accelerate tests."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from deltaswap.strategy import DeltaSwapPlugin

from gpt import GPT
from lightning_helpers import CFG, loader


def train(
    plugin: DeltaSwapPlugin | None,
    *,
    mixed_precision: str = "no",
    accumulation: int = 1,
    plugin_first: bool = False,
    steps: int = 4,
    cpu: bool = True,
) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """Train a seeded GPT with Accelerate's loop (accumulation, clipping, SGD); returns its weights and
    the model. ``plugin_first`` prepares the plugin before ``accelerator.prepare``."""
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    model = GPT(CFG)
    if plugin is not None and plugin_first:
        model = plugin.prepare(model)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              gradient_accumulation_steps=accumulation)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader(batches=steps))
    if plugin is not None and not plugin_first:
        model = plugin.prepare(model)
    torch.manual_seed(1)
    for x, y in data:
        with accelerator.accumulate(model):
            loss = model(x, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # clipping unscales fp16 gradients: once per optimizer step
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], model
