"""Framework adapters (Lightning ``SwapStrategy``, Accelerate ``DeltaSwapPlugin``): thin layers over
:class:`deltaswap.swap.ActivationManager`. Not written yet; they follow once the planner meets its
targets (see the README's status)."""
