"""Several processes training one model (DDP, FSDP): every rank plans from the same measurements, and
the ranks of one host split its RAM for pinned memory.

A plan never changes the gradients, but ranks that plan differently run at different speeds and peaks,
and the slowest sets the pace of every all-reduce. So each rank measures (its profile, its PCIe link),
then the ranks agree on one workload: the slowest op times, the largest tensors, the slowest link. Each
plans from that, deterministically, and all get the same plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from .hostcost import HostCost
from .planner import BlockCost, Workload
from .pool import available_host_bytes
from .profile import Bandwidth


class HostRamShare:
    """The host RAM one of ``ranks`` processes on this host may pin: what psutil reports available,
    divided by ``ranks``. Pass it as ``host_memory_available`` to
    :class:`~deltaswap.swap.ActivationManager`.

    Example::

        >>> share = HostRamShare(ranks=2)
        >>> share() <= available_host_bytes() // 2 + 1
        True
    """

    def __init__(self, ranks: int, available: Callable[[], int] = available_host_bytes) -> None:
        if ranks < 1:
            raise ValueError(f"ranks={ranks}: the number of processes on this host must be at least 1")
        self.ranks = ranks
        self._available = available

    def __call__(self) -> int:
        return self._available() // self.ranks


class RankAgreement:
    """Makes the ranks of a process group agree before each of them plans.

    Use it with :class:`~deltaswap.swap.ActivationManager` (``ranks=RankAgreement()``) once
    ``torch.distributed`` is initialized; the Lightning strategy ``"deltaswap_ddp"`` does this. Every
    call is a collective: all ranks must make it at the same point, which the manager does (a check of
    the last step's shape at the start of every step, then the planning of a new profile, and once
    after the first planned step of each input shape). The collectives run on the host, over the group
    itself if it is gloo, else over a gloo group made at the first one (no CUDA stream waits for them),
    and the per-step check does not block the host unless the step plans.

    Args:
        group: the process group (default: the world).

    .. warning::
        Every rank must profile the same input shapes in the same steps (pad or bucket variable-length
        batches the same way on every rank); a rank whose blocks ran other ops is refused with an error.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._host_group: Any = None
        self._check: tuple[Any, torch.Tensor] | None = None
        """The step check in flight: its collective's handle and result."""

    # -- collectives ----------------------------------------------------------------------------------
    def _host(self) -> Any:
        """The group the collectives run over: the group itself if it is gloo, else a gloo group made
        at the first collective (every rank is there), so that no GPU stream waits for them."""
        if self._host_group is None:
            gloo = dist.get_backend(self.group) == "gloo"
            self._host_group = self.group if gloo else dist.new_group(backend="gloo")
        return self._host_group

    def _max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over the ranks, on the host. A step check still in flight is settled
        first, so that ranks that ran different steps are refused before they plan."""
        self.settle()
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._host())
        return tensor.tolist()

    def same_step(self, key: tuple[Any, ...], planning: bool) -> None:
        """Check, at the start of a step, that every rank's last step ran the same input shape and that
        all of them (or none) have a new plan to make; made every step, it keeps the planning
        collectives matched.

        The check does not block: it is settled at the next step's check, or before this rank's next
        collective (planning), whichever comes first. A step that plans waits for it; others do not.

        Raises:
            RuntimeError: on every rank, once the ranks are found to differ.
        """
        self.settle()
        digest = _digest(repr(_portable(key)))
        flag = 1.0 if planning else 0.0
        tensor = torch.tensor([digest, -digest, flag, -flag], dtype=torch.float64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._host(), async_op=True)
        self._check = (work, tensor)

    def settle(self) -> None:
        """Wait for the step check in flight, if any.

        Raises:
            RuntimeError: if the ranks' steps differed.
        """
        if self._check is None:
            return
        (work, high), self._check = self._check, None
        work.wait()
        if high[0] != -high[1] or high[2] != -high[3]:
            raise RuntimeError(
                "deltaswap: the ranks ran batches of different shapes in the same step. Every rank must "
                "run the same model on batches of the same shape in each step: pad or bucket "
                "variable-length batches the same way on every rank."
            )

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return self._max([0.0 if flag else 1.0])[0] == 0.0

    def budget(self, budget: int) -> int:
        """The smallest rank's activation budget (ranks may hold different amounts outside activations)."""
        return int(-self._max([-float(budget)])[0])

    def workload(self, work: Workload) -> Workload:
        """``work`` as every rank agrees on it: each op's time and bytes the largest of any rank's, the
        link and the host the slowest of any rank's.

        Raises:
            RuntimeError: if the ranks profiled different ops (different models or input shapes).
        """
        digest = _structure(work)
        low, high = self._max([-digest]), self._max([digest])
        if -low[0] != high[0]:
            raise RuntimeError(
                "deltaswap: the ranks profiled different blocks or ops (another model, or another input "
                "shape in the same step). Every rank must run the same model on batches of the same shape "
                "in each step: pad or bucket variable-length batches the same way on every rank."
            )
        values = _flatten(work)
        agreed = self._max(values)
        return _unflatten(work, agreed)


# Fields agreed by their largest value (times, bytes); the link's rates by their smallest (negated).
_WORK_FIELDS = ("other_bytes", "other_ms", "peak_offset", "peak_margin", "other_grad_bytes",
                "head_transient", "backward_ratio", "lookahead")
_FLOAT_FIELDS = {"other_ms", "backward_ratio"}


def _digest(text: str) -> float:
    """A 48-bit number for ``text``, exact in a float64 (Python's ``hash`` differs between processes)."""
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big"))


def _portable(key: Any) -> Any:
    """``key`` with each device replaced by its type: every rank runs on its own ``cuda:R``."""
    if isinstance(key, torch.device):
        return key.type
    if isinstance(key, tuple):
        return tuple(_portable(k) for k in key)
    return key


def _structure(work: Workload) -> float:
    """A number identifying the blocks and ops of ``work`` (equal on ranks that ran the same ops)."""
    return _digest("|".join(",".join(f"{op.op}:{op.storable}" for op in b.ops) for b in work.blocks))


def _flatten(work: Workload) -> list[float]:
    values: list[float] = []
    for b in work.blocks:
        values += [float(b.input_bytes), float(b.saved_bytes), float(b.grad_bytes), float(b.peak_offset)]
        # what a block shares with its neighbour, negated: the ranks agree on the least (the higher peak)
        values += [-float(b.chained), -float(b.chained_saved)]
        for op in b.ops:
            values += [op.ms, float(op.out_bytes)]
    values += [float(getattr(work, name)) for name in _WORK_FIELDS]
    values.append(-1.0 if work.other_backward_ms is None else work.other_backward_ms)
    bw = work.bandwidth
    values += [-bw.d2h_gbps, -bw.h2d_gbps, -bw.duplex_gbps, bw.copy_slowdown]
    values += [work.host.launch_ms, work.host.record_ms, work.host.replay_ms]  # the slowest host
    return values


def _unflatten(work: Workload, values: list[float]) -> Workload:
    it = iter(values)
    blocks = []
    for b in work.blocks:
        input_bytes, saved_bytes, grad_bytes, peak_offset = (int(next(it)) for _ in range(4))
        chained, chained_saved = (-int(next(it)) for _ in range(2))
        ops = tuple(replace(op, ms=next(it), out_bytes=int(next(it))) for op in b.ops)
        blocks.append(BlockCost(ops, input_bytes, saved_bytes, grad_bytes, chained, chained_saved,
                                b.input_storages, b.saved_inputs,  # which calls share a tensor
                                peak_offset))
    fields: dict[str, Any] = {}
    for name in _WORK_FIELDS:
        value = next(it)
        fields[name] = value if name in _FLOAT_FIELDS else int(value)
    other_backward = next(it)
    d2h, h2d, duplex, slowdown = (next(it) for _ in range(4))
    launch, record, replay = (next(it) for _ in range(3))
    return replace(
        work, blocks=tuple(blocks), **fields,
        other_backward_ms=None if other_backward < 0 else other_backward,
        bandwidth=Bandwidth(-d2h, -h2d, -duplex, slowdown),
        host=HostCost(launch, record, replay),
    )
