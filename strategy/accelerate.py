"""``DeltaSwapPlugin``: deltaswap beside a 🤗 Accelerate ``Accelerator``, with no change to the loop."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import nn

from deltaswap.swap import ActivationManager, SwapConfig

from .views import ManagerViews


@dataclass
class DeltaSwapPlugin(SwapConfig, ManagerViews):
    """Run every training forward of a model under an :class:`~deltaswap.swap.ActivationManager` plan:
    activations kept, swapped to pinned host memory or recomputed so that they fit ``memory_budget``.

    Use it when a plain PyTorch loop under Accelerate runs out of GPU memory. Accelerate's
    ``kwargs_handlers`` take only its own classes, so the plugin works beside the ``Accelerator``: its
    :meth:`prepare` wraps the model's repeated blocks (state-dict keys unchanged) and the model's
    ``forward`` (an attribute of that model object, as Accelerate's mixed precision sets one), so nothing
    else in the loop changes. Call it before or after ``accelerator.prepare``. Forwards
    in ``eval()`` mode or without gradients are not affected. Gradients are bitwise equal to the loop
    without it. Its fields are those of :class:`~deltaswap.swap.SwapConfig`, validated the same way.

    Example::

        >>> from accelerate import Accelerator
        >>> from deltaswap.strategy import DeltaSwapPlugin
        >>> accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)   # doctest: +SKIP
        >>> plugin = DeltaSwapPlugin(memory_budget="auto", policy="auto")
        >>> model = plugin.prepare(model)                                              # doctest: +SKIP
        >>> for x, y in loader:                                                        # doctest: +SKIP
        ...     with accelerator.accumulate(model):
        ...         loss = loss_fn(model(x), y)
        ...         accelerator.backward(loss)
        ...         optimizer.step(); optimizer.zero_grad()
        >>> print(plugin.plan); print(plugin.stats)                                    # doctest: +SKIP

    .. warning::
        On a CPU (``Accelerator(cpu=True)``) it warns once and trains without swapping
        (``policy="recompute"`` still recomputes). One model per plugin; a model spread over several
        processes (DDP, FSDP) is not supported here.
    """

    _manager: ActivationManager | None = field(default=None, init=False, repr=False, compare=False)
    _stepping: bool = field(default=False, init=False, repr=False, compare=False)
    _closed: bool = field(default=False, init=False, repr=False, compare=False)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap ``model``'s blocks and run its training forwards under the plan; returns the same model.

        Raises:
            ValueError: if the model has no repeated blocks (name them with ``block_types``), or if this
                plugin already prepared another model.
        """
        if self._manager is not None:
            if model is self._manager.model:
                return model
            raise ValueError("this DeltaSwapPlugin already prepared another model: use one plugin per model")
        manager = ActivationManager(SwapConfig(**{f.name: getattr(self, f.name) for f in fields(SwapConfig)}))
        manager.wrap(model)
        self._manager = manager
        # The new forward lives on the model: it reaches the model and this plugin weakly, so that
        # neither the model nor the plugin (and the manager's pinned memory) is held in a cycle. The
        # forward it wraps is kept as a function (another wrapper's, if one came first) and its model.
        previous = model.forward
        function = getattr(previous, "__func__", None)
        owner = weakref.ref(model)
        plugin = weakref.ref(self)

        def forward(*args: Any, **kwargs: Any) -> Any:
            module, self_ = owner(), plugin()
            assert module is not None  # the model runs this: it is alive
            call = partial(function, module) if function is not None else previous
            if (self_ is None or self_._closed or self_._stepping or self_._manager is None
                    or not (module.training and torch.is_grad_enabled())):
                return call(*args, **kwargs)  # evaluation, no_grad, a call inside the step, no plugin
            self_._stepping = True
            try:
                with self_._manager.step():  # closed on any exception, KeyboardInterrupt included
                    return call(*args, **kwargs)
            finally:
                self_._stepping = False

        # the model's signature, for whoever inspects it (``__wrapped__`` would hold the model strongly)
        forward.__signature__ = inspect.signature(previous)  # type: ignore[attr-defined]
        if function is not None:
            del previous  # kept as its function: the bound method would hold the model
        model.forward = forward  # type: ignore[method-assign]
        return model

    def close(self) -> None:
        """Give the pinned host memory back (training is over); the model then trains plainly."""
        if self._manager is not None:
            self._closed = True  # every later forward passes straight through
            self._manager.close()


