"""deltaswap's engine: swap activations to pinned host memory over asynchronous CUDA streams.

Knows nothing of Lightning or Accelerate; the adapters in :mod:`deltaswap.strategy` call into it.

Example::

    >>> from deltaswap.swap import offload_activations
    >>> off = offload_activations(min_bytes="1MiB")
    >>> with off:                                   # doctest: +SKIP
    ...     loss = model(x).float().pow(2).mean()
    >>> loss.backward()                             # doctest: +SKIP
    >>> print(off.stats)                            # doctest: +SKIP
"""

from .backend import Copy, CopyBackend, CudaCopyBackend, SyncCopyBackend
from .config import OffloadConfig, SwapConfig, format_bytes, parse_bytes
from .hostcost import HostCost, measure_host_cost
from .manager import ActivationManager, ManagerStats
from .offloader import ActivationOffloader, offload_activations
from .planner import Plan
from .pool import HostMemoryError, PinnedPool
from .profile import Bandwidth, OpProfiler, OpRecord, measure_bandwidth
from .ranks import HostRamShare, RankAgreement
from .recompute import LocalStore, OpDecision, OpPolicy, checkpoint_with_policy
from .stats import OffloadStats

__all__ = [
    "ActivationManager",
    "ActivationOffloader",
    "Bandwidth",
    "Copy",
    "CopyBackend",
    "CudaCopyBackend",
    "HostCost",
    "HostMemoryError",
    "HostRamShare",
    "LocalStore",
    "ManagerStats",
    "OffloadConfig",
    "OffloadStats",
    "OpDecision",
    "OpPolicy",
    "OpProfiler",
    "OpRecord",
    "PinnedPool",
    "Plan",
    "RankAgreement",
    "SwapConfig",
    "SyncCopyBackend",
    "checkpoint_with_policy",
    "format_bytes",
    "measure_bandwidth",
    "measure_host_cost",
    "offload_activations",
    "parse_bytes",
]
