"""``SwapFSDPStrategy``: Lightning's FSDP strategy, with every rank's blocks planned inside FSDP's units,
all ranks on the same :class:`~deltaswap.swap.ActivationManager` plan."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from typing_extensions import override

from deltaswap.swap import ActivationManager

from .lightning import PlannedRanks, split_options, swap_config


class SwapFSDPStrategy(PlannedRanks, FSDPStrategy):
    """Fully sharded data parallel training (one process per device) with each rank's activations kept,
    swapped to pinned host memory or recomputed to fit ``memory_budget``, all ranks on one plan.

    Use it where you would use ``strategy="fsdp"``: ``Trainer(strategy="deltaswap_fsdp", devices=N)``
    after ``import deltaswap.strategy``, or this class for options. FSDP wraps the model first, by its
    ``auto_wrap_policy`` (give it the block class, e.g. ``auto_wrap_policy={Block}``); deltaswap then
    plans the blocks inside FSDP's units, the way Lightning's ``activation_checkpointing_policy`` wraps
    them. A block is therefore recomputed in the backward while FSDP holds its parameters gathered, and
    the parameters FSDP gathers for the forward are never swapped: FSDP frees and re-gathers them itself.
    Parameters, gradients and optimizer state are sharded as with ``strategy="fsdp"``; deltaswap handles
    the activations. As under ``"deltaswap_ddp"``, each rank profiles and measures its own PCIe link, the
    ranks agree on the slowest op times, the largest tensors and the slowest link before planning, and
    the host RAM a rank may pin is the host's available RAM divided by its ranks. Gradients are those of
    plain FSDP.

    Args:
        memory_budget: most GPU memory each rank's activations may take (see
            :class:`~deltaswap.swap.SwapConfig`); ``"auto"`` fits each device, then the ranks take the
            smallest.
        policy: ``"auto"``, ``"delta"``, ``"swap"``, ``"recompute"`` or ``"keep"``.
        **options: :class:`~deltaswap.swap.SwapConfig` fields (``block_types``, ``min_bytes``, ...); any
            other keyword goes to Lightning's ``FSDPStrategy`` (``auto_wrap_policy``,
            ``sharding_strategy``, ``cpu_offload``, ``mixed_precision``, ...) and through it to
            ``FullyShardedDataParallel``.

    Raises:
        ValueError: with ``activation_checkpointing_policy`` (or the older ``activation_checkpointing``):
            deltaswap decides what to recompute itself; drop that option.

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.strategy import SwapFSDPStrategy
        >>> trainer = Trainer(strategy=SwapFSDPStrategy(memory_budget="40GiB", auto_wrap_policy={Block}),
        ...                   devices=4, precision="bf16-mixed")      # doctest: +SKIP

    .. warning::
        Every rank must run batches of the same shape in each step, as under ``"deltaswap_ddp"``.
        Without an ``auto_wrap_policy`` FSDP makes one unit of the whole model, which then stays gathered
        for the whole forward and backward: give the block class. On CPUs (gloo, for tests) it trains
        without swapping, with one warning per rank; Lightning's own ``"fsdp"`` refuses CPUs.
    """

    strategy_name = "deltaswap_fsdp"
    strategy_description = ("deltaswap on Lightning's FSDP: every rank keeps, swaps or recomputes each "
                            "activation inside FSDP's units to fit a memory budget, on one agreed plan")
    wrap_at_setup = False  # inside FSDP's units, once FSDP has wrapped the model

    def __init__(
        self, memory_budget: int | float | str = "auto", policy: str = "auto", **options: Any
    ) -> None:
        ours, theirs = split_options("SwapFSDPStrategy", options, FSDPStrategy.__init__,
                                     FullyShardedDataParallel.__init__)
        for name in ("activation_checkpointing_policy", "activation_checkpointing"):
            if theirs.get(name) is not None:
                raise ValueError(
                    f"SwapFSDPStrategy plans which activations to recompute itself: remove {name}= (or use "
                    f"strategy='fsdp' with it, without deltaswap)"
                )
        self.swap_config = swap_config(memory_budget, policy, ours)
        super().__init__(**theirs)
        self._manager: ActivationManager | None = None
        self._open_step: contextlib.ExitStack | None = None

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        return setup_model(self, model, super()._setup_model)


def setup_model(
    strategy: FSDPStrategy, model: nn.Module, setup: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """``setup(model)`` (Lightning's ``FSDPStrategy._setup_model``), with the model first wrapped in FSDP
    the way ``strategy`` would wrap it on a GPU when this rank trains on a CPU.

    Lightning passes FSDP the device's index, which a CPU device lacks, so FSDP refuses it; FSDP itself
    trains on CPUs over gloo when given the device. This lets the FSDP composition run in CPU tests.

    Args:
        strategy: the FSDP strategy whose options (``auto_wrap_policy``, ``sharding_strategy``, ...) apply.
        model: the model to set up; if it already holds FSDP units, Lightning keeps them as they are.
        setup: Lightning's own model setup, given the wrapped model.

    Returns:
        The model as ``setup`` returns it.
    """
    if strategy.root_device.type != "cpu" or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        return setup(model)
    wrapped = FullyShardedDataParallel(
        model, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device, **strategy.kwargs,
    )
    # applied: without it, Lightning would warn that it ignores the policy (and drop it for later fits)
    policy = strategy.kwargs.pop("auto_wrap_policy", None)
    try:
        return setup(wrapped)
    finally:
        if policy is not None:
            strategy.kwargs["auto_wrap_policy"] = policy
