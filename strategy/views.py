"""What both adapters show of their :class:`~deltaswap.swap.ActivationManager`."""

from __future__ import annotations

from deltaswap.swap import ActivationManager, ManagerStats, Plan


class ManagerViews:
    """``manager``, ``plan`` and ``stats`` of an adapter holding its manager in ``_manager``."""

    _manager: ActivationManager | None

    @property
    def manager(self) -> ActivationManager | None:
        """The :class:`~deltaswap.swap.ActivationManager` (``None`` before the model is prepared)."""
        return self._manager

    @property
    def plan(self) -> Plan | None:
        """The plan of the last input shape (``None`` until the first training step has run)."""
        return self._manager.plan if self._manager is not None else None

    @property
    def stats(self) -> ManagerStats | None:
        """Measured behaviour of the last training step and the plan's prediction for it."""
        return self._manager.stats if self._manager is not None else None
