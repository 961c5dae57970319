"""``SwapStrategy``: Lightning's single-device strategy, with every training forward run under a
:class:`~deltaswap.swap.ActivationManager` plan."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from deltaswap.swap import ActivationManager, HostRamShare, RankAgreement, SwapConfig

from .views import ManagerViews

if TYPE_CHECKING:
    from lightning.fabric.strategies.registry import _StrategyRegistry


def swap_config(memory_budget: int | float | str, policy: str, options: dict[str, Any]) -> SwapConfig:
    """A :class:`SwapConfig` from an adapter's arguments; an unknown option names the valid ones."""
    valid = {f.name for f in fields(SwapConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown deltaswap option(s) {', '.join(unknown)}; the options are those of "
                        f"SwapConfig: {', '.join(sorted(valid))}")
    return SwapConfig(memory_budget=memory_budget, policy=policy, **options)


def split_options(
    strategy: str, options: dict[str, Any], *takers: Callable[..., Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a distributed strategy's keyword arguments into :class:`SwapConfig` fields and the keywords
    of ``takers`` (the Lightning strategy and the torch wrapper it passes its extra keywords to); any
    other keyword is refused with both lists."""
    names = {f.name for f in fields(SwapConfig)}
    ours = {k: v for k, v in options.items() if k in names}
    theirs = {k: v for k, v in options.items() if k not in names}
    accepted = {p for taker in takers for p in inspect.signature(taker).parameters} - {"self", "kwargs"}
    unknown = sorted(set(theirs) - accepted)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: {strategy} takes the fields of SwapConfig "
                        f"({', '.join(sorted(names))}) and the keywords of "
                        f"{' and of '.join(t.__qualname__.split('.')[0] for t in takers)}")
    return ours, theirs


class PlannedTraining(ManagerViews):
    """What the deltaswap Lightning strategies share: the blocks wrapped once at setup (unwrapped at
    teardown), every ``training_step`` run under the plan, and under manual optimization the planned
    forward closed at the first ``backward``. Mixed in before a Lightning strategy class."""

    swap_config: SwapConfig
    _open_step: contextlib.ExitStack | None = None
    wrap_at_setup: ClassVar[bool] = True
    """Wrap the LightningModule's blocks before the Lightning strategy's own ``setup`` (``False``: after
    it, inside the model as the strategy has wrapped it, as FSDP needs)."""
    strategy_name: str
    strategy_description: str
    """What ``StrategyRegistry`` lists for ``strategy_name``."""

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.strategy_description)

    def _new_manager(self) -> ActivationManager:
        """The manager for this strategy's device (and ranks)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer) -> None:
        if self._manager is None:
            self._manager = self._new_manager()
        if self.wrap_at_setup:
            self._manager.wrap(self.lightning_module)  # type: ignore[attr-defined]  # before the optimizers exist
        super().setup(trainer)  # type: ignore[misc]
        if not self.wrap_at_setup:
            self._manager.wrap(self.model)  # type: ignore[attr-defined]  # as the strategy wrapped it

    @override
    def teardown(self) -> None:
        if self._manager is not None:
            self._manager.unwrap()
        super().teardown()  # type: ignore[misc]

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._manager is not None, f"{type(self).__name__}.training_step before setup"
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._manager.step())
            self._open_step = stack
            try:
                return super().training_step(*args, **kwargs)  # type: ignore[misc]
            finally:
                self._open_step = None

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._open_step is not None:  # manual optimization: the forward under the plan ends here
            stack, self._open_step = self._open_step, None
            stack.close()
        return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]


class PlannedRanks(PlannedTraining):
    """:class:`PlannedTraining` for strategies of one process per device (DDP, FSDP): the ranks agree on
    their measurements so that every rank runs the same plan, and the ranks of a host split its RAM."""

    num_processes: int
    root_device: torch.device

    def _new_manager(self) -> ActivationManager:
        return ActivationManager(
            self.swap_config,
            device=self.root_device,
            host_memory_available=HostRamShare(max(1, self.num_processes)),
            ranks=RankAgreement(),
        )


class SwapStrategy(PlannedTraining, SingleDeviceStrategy):
    """Train on one device with activations kept, swapped to pinned host memory or recomputed, per
    saved tensor, so that they fit ``memory_budget`` at the least measured cost.

    Use it when a LightningModule runs out of GPU memory in training: pass it as the ``strategy`` (or
    ``strategy="deltaswap"`` after ``import deltaswap.strategy``). At setup it wraps the model's repeated
    blocks once (state-dict keys unchanged); every training forward then runs under the plan. The first
    step of each input shape profiles the blocks; later steps run the plan. Validation, test, prediction
    and ``no_grad`` forwards are not affected. Gradients are bitwise equal to training without it.

    Args:
        memory_budget: most GPU memory the activations may take: ``"auto"``, bytes, a size string
            (``"12GiB"``) or a fraction of device memory (see :class:`~deltaswap.swap.SwapConfig`).
        policy: ``"auto"``, ``"delta"``, ``"swap"``, ``"recompute"`` or ``"keep"``.
        device: the device to train on; default: the one the Trainer's ``accelerator`` and ``devices``
            choose.
        **options: any other :class:`~deltaswap.swap.SwapConfig` field (``block_types``, ``min_bytes``,
            ``prefetch_lookahead``, ``bandwidth_gbps``, ``pinned_bytes``, ``host_ram_reserve``).

    Example::

        >>> from lightning import Trainer
        >>> from deltaswap.strategy import SwapStrategy
        >>> trainer = Trainer(strategy=SwapStrategy(memory_budget="12GiB"), precision="bf16-mixed")
        >>> trainer.fit(model, loader)                          # doctest: +SKIP
        >>> print(trainer.strategy.plan)                        # doctest: +SKIP

    .. warning::
        On a CPU it warns once and trains without swapping (``policy="recompute"`` still recomputes).
        With manual optimization the plan covers the forward passes before the first
        ``manual_backward`` of each ``training_step``. The pinned host memory stays with the strategy
        between fits (plans and pool are reused); ``trainer.strategy.manager.close()`` gives it back.
    """

    strategy_name = "deltaswap"
    strategy_description = "deltaswap: keep, swap or recompute each activation to fit a memory budget"

    def __init__(
        self,
        memory_budget: int | float | str = "auto",
        policy: str = "auto",
        *,
        device: torch.device | str | int | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **options: Any,
    ) -> None:
        self.swap_config = swap_config(memory_budget, policy, options)
        super().__init__(device="cpu" if device is None else device, accelerator=accelerator,
                         checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self._device_given = device is not None
        self.parallel_devices: list[torch.device] | None = None
        """Filled in by the Trainer from its ``accelerator`` and ``devices`` flags."""
        self._manager: ActivationManager | None = None
        self._open_step: contextlib.ExitStack | None = None

    # -- device ---------------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        if self._device_given or not self.parallel_devices:
            return self._root_device
        return torch.device(self.parallel_devices[0])

    @override
    def setup_environment(self) -> None:
        if self.parallel_devices is not None and len(self.parallel_devices) > 1 and not self._device_given:
            raise ValueError(
                f"SwapStrategy trains on one device, but the Trainer was given {len(self.parallel_devices)} "
                f"devices: pass devices=1 (or devices=[index] to pick one)"
            )
        super().setup_environment()

    def _new_manager(self) -> ActivationManager:
        return ActivationManager(self.swap_config, device=self.root_device)

