"""Lightning callbacks that show what :class:`~deltaswap.strategy.SwapStrategy` does.

- :class:`SwapMonitor`: logs, per step, the bytes swapped, copy rates, stalls, recompute, and the
  measured against the predicted activation peak and step time (keys ``deltaswap/...``).
- :class:`SwapPlanSummary`: prints the plan as a table (per block: keep / swap / checkpoint, bytes kept,
  swapped and recomputed) once it exists, and again when a new plan replaces it.
- :class:`MemoryTimeline`: records GPU memory over one step and plots it against the plan's prediction
  (needs matplotlib: ``pip install 'deltaswap[plot]'``; importing this package does not import it).

Example::

    >>> from lightning import Trainer
    >>> from deltaswap.callbacks import MemoryTimeline, SwapMonitor, SwapPlanSummary
    >>> from deltaswap.strategy import SwapStrategy
    >>> trainer = Trainer(strategy=SwapStrategy(memory_budget="12GiB"),
    ...                   callbacks=[SwapMonitor(), SwapPlanSummary(), MemoryTimeline(step=3)])
    >>> trainer.fit(model, loader)                                       # doctest: +SKIP
"""

from .monitor import SwapMonitor
from .summary import SwapPlanSummary, format_plan
from .timeline import MemoryTimeline, plot_timeline

__all__ = ["MemoryTimeline", "SwapMonitor", "SwapPlanSummary", "format_plan", "plot_timeline"]
