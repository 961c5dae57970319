"""Framework adapters: thin layers over :class:`deltaswap.swap.ActivationManager`.

- :class:`SwapStrategy`: Lightning's single-device strategy with every training forward under the plan.
  Importing this package registers it as ``Trainer(strategy="deltaswap")``.
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

SwapStrategy.register_strategies(StrategyRegistry)

__all__ = ["DeltaSwapPlugin", "SwapStrategy"]
