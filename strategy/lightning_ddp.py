"""``SwapDDPStrategy``: Lightning's DDP strategy, with every rank's training forward run under the same
:class:`~deltaswap.swap.ActivationManager` plan."""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from deltaswap.swap import ActivationManager

from .lightning import PlannedRanks, split_options, swap_config


class SwapDDPStrategy(PlannedRanks, DDPStrategy):
    """Distributed data parallel training (one process per device) with each rank's activations kept,
    swapped to pinned host memory or recomputed to fit ``memory_budget``, all ranks on one plan.

    Use it where you would use ``strategy="ddp"``: ``Trainer(strategy="deltaswap_ddp", devices=N)`` after
    ``import deltaswap.strategy``, or this class for options. Each rank profiles its blocks and measures
    its own PCIe link; before planning, the ranks agree on the slowest op times, the largest tensors and
    the slowest link (one small all-reduce per input shape), so every rank runs the same plan. The host
    RAM a rank may pin is the host's available RAM divided by the ranks on that host. Gradients are
    those of plain DDP.

    Args:
        memory_budget: most GPU memory each rank's activations may take (see
            :class:`~deltaswap.swap.SwapConfig`); ``"auto"`` fits each device, then the ranks take the
            smallest.
        policy: ``"auto"``, ``"delta"``, ``"swap"``, ``"recompute"`` or ``"keep"``.
        **options: :class:`~deltaswap.swap.SwapConfig` fields (``block_types``, ``min_bytes``, ...); any
            other keyword goes to Lightning's ``DDPStrategy`` (``process_group_backend``, ``timeout``,
            ``find_unused_parameters``, ...).

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.strategy import SwapDDPStrategy
        >>> trainer = Trainer(strategy=SwapDDPStrategy(memory_budget="40GiB"), devices=2,
        ...                   precision="bf16-mixed")               # doctest: +SKIP

    .. warning::
        Every rank must run batches of the same shape in each step (pad or bucket variable lengths the
        same way on all ranks): ranks that profiled different ops are refused with an error. On CPUs
        (gloo) it trains without swapping, with one warning per rank.
    """

    strategy_name = "deltaswap_ddp"
    strategy_description = ("deltaswap on Lightning's DDP: every rank keeps, swaps or recomputes each "
                            "activation to fit a memory budget, on one agreed plan")

    def __init__(
        self, memory_budget: int | float | str = "auto", policy: str = "auto", **options: Any
    ) -> None:
        ours, theirs = split_options("SwapDDPStrategy", options, DDPStrategy.__init__,
                                     DistributedDataParallel.__init__)
        self.swap_config = swap_config(memory_budget, policy, ours)
        super().__init__(**theirs)
        self._manager: ActivationManager | None = None
        self._open_step: contextlib.ExitStack | None = None
