"""The host (CPU) time of deltaswap's per-op path, measured: what a block that stores some of its op
outputs costs the host, beside what its kernels cost the GPU.

A checkpointed block that stores some outputs runs every op through Python dispatch modes, in the
forward (recording) and again in its recompute (replaying). When the GPU runs a block's kernels faster
than the host can issue them that way, the host sets the pace: the planner takes each such block's
time as the longer of the two (:func:`~deltaswap.swap.planner.simulate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .recompute import _UNCOUNTED, OpDecision, checkpoint_all, checkpoint_with_policy


@dataclass(frozen=True)
class HostCost:
    """Measured host time per op, in milliseconds. All zero: the host is never the bottleneck (what
    the planner assumes where nothing was measured, e.g. on a CPU, where host and device are one)."""

    launch_ms: float = 0.0
    """Issuing one op of a plain forward with autograd recording (a kernel launch and its graph node)."""
    record_ms: float = 0.0
    """Extra, per op, of a forward through deltaswap's recording mode (a checkpointed block that stores
    some outputs), over torch's plain checkpoint."""
    replay_ms: float = 0.0
    """Extra, per op, of that block's recompute in the backward (the replaying mode), over torch's plain
    checkpoint's."""


NO_HOST_COST = HostCost()
"""The host never sets the pace."""

_WIDTH = 64


def _probe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A small transformer-like block: matmuls, an activation, a residual add and a norm."""
    h = F.gelu(x @ w1)
    return F.layer_norm(x + h @ w2, (_WIDTH,))


def _store_first(index: int, op: object) -> OpDecision:
    return OpDecision.KEEP if index == 0 else OpDecision.RECOMPUTE


def measure_host_cost(
    device: torch.device | int | str | None = None, *, repeats: int = 50, trials: int = 5
) -> HostCost:
    """Time, on the host, ``repeats`` calls of a small block on ``device`` (kernels so small that the
    host, not the device, sets the pace): plainly, under torch's checkpoint, and under deltaswap's
    per-op checkpoint, forward and backward. The median of ``trials``; about a second (on an H200's
    host). Waits for the device; uses constant values, so no random generator moves.

    Example::

        >>> cost = measure_host_cost("cuda")          # doctest: +SKIP
        >>> cost.record_ms, cost.replay_ms            # doctest: +SKIP
        (0.04, 0.03)
    """
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    x = torch.full((8, _WIDTH), 0.5, device=dev, requires_grad=True)
    w1 = torch.full((_WIDTH, _WIDTH), 0.01, device=dev, requires_grad=True)
    w2 = torch.full((_WIDTH, _WIDTH), 0.02, device=dev, requires_grad=True)
    ops = _count_ops(lambda: _probe(x, w1, w2))
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: _probe(x, w1, w2),
        "all": lambda: checkpoint_all(_probe, x, w1, w2),
        "selective": lambda: checkpoint_with_policy(_probe, x, w1, w2, policy=_store_first),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(trials + 1):  # the first round warms up
        for name, run in runs.items():
            samples[name].append(_host_ms(run, repeats, dev))
    medians = {name: _median(values[1:]) for name, values in samples.items()}
    per_op = 1.0 / (repeats * ops)
    (plain_fwd, _), (all_fwd, all_bwd), (sel_fwd, sel_bwd) = medians.values()
    x.grad = w1.grad = w2.grad = None
    return HostCost(
        launch_ms=max(0.0, plain_fwd * per_op),
        record_ms=max(0.0, (sel_fwd - all_fwd) * per_op),
        replay_ms=max(0.0, (sel_bwd - all_bwd) * per_op),
    )


def _host_ms(run: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, float]:
    """Host milliseconds of ``repeats`` forwards, then of their backwards (the device idle before each)."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    outs = [run() for _ in range(repeats)]
    forward = time.perf_counter() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for out in outs:
        out.backward(torch.ones_like(out))
    backward = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return forward * 1e3, backward * 1e3


def _median(values: list[tuple[float, float]]) -> tuple[float, float]:
    forward, backward = sorted(v[0] for v in values), sorted(v[1] for v in values)
    return forward[len(forward) // 2], backward[len(backward) // 2]


def _count_ops(run: Callable[[], Any]) -> int:
    """The aten ops ``run`` dispatches, as deltaswap's modes count them."""
    counter = _OpCounter()
    with torch.no_grad(), counter:
        run()
    return max(1, counter.ops)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func not in _UNCOUNTED:
            self.ops += 1
        return func(*args, **(kwargs or {}))
