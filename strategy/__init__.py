"""Framework adapters: thin layers over :class:`deltaswap.swap.ActivationManager`.

- :class:`SwapStrategy`: Lightning's single-device strategy with every training forward under the plan.
  Importing this package registers it as ``Trainer(strategy="deltaswap")``.
- :class:`SwapDDPStrategy`: the same on Lightning's DDP, every rank on one agreed plan:
  ``Trainer(strategy="deltaswap_ddp", devices=N)``.
- :class:`SwapFSDPStrategy`: the same on Lightning's FSDP, planned inside FSDP's units:
  ``Trainer(strategy="deltaswap_fsdp", devices=N)``.
- :class:`DeltaSwapPlugin`: the same beside a 🤗 Accelerate ``Accelerator``:
  ``model = plugin.prepare(model)``.

Example::

    >>> import deltaswap.strategy
    >>> from lightning import Trainer
    >>> trainer = Trainer(strategy="deltaswap", precision="bf16-mixed")     # doctest: +SKIP
"""

from lightning.pytorch.strategies import StrategyRegistry

from .accelerate import DeltaSwapPlugin
from .lightning import SwapStrategy
from .lightning_ddp import SwapDDPStrategy
from .lightning_fsdp import SwapFSDPStrategy

SwapStrategy.register_strategies(StrategyRegistry)
SwapDDPStrategy.register_strategies(StrategyRegistry)
SwapFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["DeltaSwapPlugin", "SwapDDPStrategy", "SwapFSDPStrategy", "SwapStrategy"]
