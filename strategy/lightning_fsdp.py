"""``SwapFSDPStrategy``: Lightning's FSDP strategy, with every rank's blocks planned inside FSDP's units,
all ranks on the same :class:`~deltaswap.swap.ActivationManager` plan."""

from __future__ import annotations

import contextlib
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
    wrap_at_setup = False  # after FSDP has wrapped the model: see _setup_model

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
        model = super()._setup_model(wrap_on_cpu(self, model))
        assert self._manager is not None, "SwapFSDPStrategy._setup_model before setup"
        self._manager.wrap(model)  # the blocks inside FSDP's units, after FSDP's own wrapping
        return model


def wrap_on_cpu(strategy: FSDPStrategy, model: nn.Module) -> nn.Module:
    """On a CPU rank, wrap ``model`` in FSDP the way ``strategy`` would on a GPU; elsewhere, or if
    ``model`` already holds FSDP units, return it as it is (Lightning then keeps the wrapping).

    Lightning passes FSDP the device's index, which a CPU device lacks, so FSDP refuses it; FSDP itself
    trains on CPUs over gloo when given the device. This is what lets the FSDP composition run in CPU
    tests; the strategy's ``auto_wrap_policy`` is consumed here, as Lightning consumes it when it finds a
    wrapped model."""
    if strategy.root_device.type != "cpu" or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        return model
    wrapped = FullyShardedDataParallel(
        model, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device, **strategy.kwargs,
    )
    strategy.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn that it ignores it
    return wrapped
