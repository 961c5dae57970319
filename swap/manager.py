"""The one object the integrations drive: wrap a model once, run each training forward under the plan.

profile -> plan -> execute -> observe: the first step with a new input shape runs under the cheapest-
memory plan (every block checkpointed, its ops timed); the planner then chooses keep / swap / recompute
for each block and op under the memory budget; later steps with that shape run the plan; the stats report
what it did against what was predicted.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .arguments import without_cache
from .backend import CopyBackend, CudaCopyBackend
from .blockprofile import BlockProfile, SavedBytes, grad_bytes, shape_key
from .calibration import MARGIN_DOWN, PeakCheck, PeakChecks, calibrate, forward_scale
from .config import UNLIMITED, SwapConfig, format_budget, format_bytes
from .discovery import describe_blocks
from .hostcost import NO_HOST_COST, HostCost, measure_host_cost
from .offloader import ActivationOffloader
from .planner import (
    BlockMode,
    BlockPlan,
    Plan,
    Workload,
    make_plan,
    plan_auto,
    plan_first,
    plan_manual,
)
from .pool import HostMemoryError, available_host_bytes, share_note
from .profile import Bandwidth, measure_bandwidth
from .ranks import RankAgreement
from .recompute import OpPolicy, checkpoint_all, checkpoint_with_policy
from .stats import OffloadStats
from .weak import weakly
from .wrapping import WrappedBlocks, wrap_blocks

PLAN_CACHE_SIZE = 8
"""Plans kept for different input shapes; the least recently used is dropped beyond this."""

_NO_PCIE = Bandwidth(1e-6, 1e-6, 2e-6)  # without a GPU there is nothing to swap to: never worth it


@dataclass(frozen=True)
class ManagerStats:
    """What the last step did, and what the plan predicted for it."""

    engine: OffloadStats
    """The swap engine's measurements (bytes moved, GB/s, stall)."""
    profiling: bool
    """Whether the last step was a profiling step (cheapest-memory plan, ops timed)."""
    forward_ms: float
    """Measured forward time of the last step (CUDA events; wall clock on a CPU)."""
    predicted_peak: int
    """The plan's predicted activation peak (0 before a plan exists)."""
    predicted_ms: float
    """The plan's predicted forward+backward time (0 before a plan exists)."""
    measured_ms: float = 0.0
    """Measured time from the start of the forward to the end of the blocks' backward (the step's
    forward+backward, less the embedding's backward); 0 until that backward has run."""
    recompute_ops: int = 0
    """Ops the plan runs again in the backward pass."""
    recompute_ms: float = 0.0
    """The plan's predicted time for them."""

    def __str__(self) -> str:
        return (f"ManagerStats(profiling={self.profiling}, forward {self.forward_ms:.1f} ms, "
                f"forward+backward {self.measured_ms:.1f} ms (predicted {self.predicted_ms:.1f} ms), "
                f"predicted peak {format_bytes(self.predicted_peak)}, {self.recompute_ops} ops recomputed)\n"
                f"{self.engine}")


class ActivationManager:
    """Chooses, for every tensor a model saves, whether to keep it, swap it to pinned host memory, or
    recompute it, so that the step fits ``memory_budget`` at the least measured cost.

    Use it when a model's activations do not fit: wrap the model once, run each training forward inside
    :meth:`step`. The first step with a new input shape is a profiling step (every block checkpointed, its
    ops timed); later steps run the plan. Evaluation and ``no_grad`` forwards are never affected.

    Args:
        config: budget and policy (:class:`~deltaswap.swap.config.SwapConfig`).
        backend: the copy backend (default: CUDA on ``device`` when available; without CUDA nothing is
            swapped and only recompute is planned).
        device: the device the model trains on (default: that of the model's first parameter when the
            first step begins). A CPU device swaps nothing (one warning) and plans only recompute.
        host_memory_available: the host RAM this process may pin (default: psutil's available RAM;
            :class:`~deltaswap.swap.ranks.HostRamShare` divides it between the ranks of a host).
        ranks: with several processes training one model, makes them plan from the same numbers
            (:class:`~deltaswap.swap.ranks.RankAgreement`), so that every rank runs the same plan.

    Example::

        >>> mgr = ActivationManager(SwapConfig(memory_budget="12GiB", policy="auto"))
        >>> model = mgr.wrap(model)                      # doctest: +SKIP
        >>> for x, y in loader:                          # doctest: +SKIP
        ...     with mgr.step():
        ...         loss = loss_fn(model(x), y)
        ...     loss.backward()
        >>> print(mgr.plan)                              # doctest: +SKIP
        >>> print(mgr.stats)                             # doctest: +SKIP

    .. warning::
        The wrapped blocks are replaced by torch's ``CheckpointWrapper`` (state-dict keys unchanged).
        In training steps the blocks' KV-cache arguments are turned off (one warning), and a block that
        changes a non-tensor argument in place is refused. Compiled blocks
        (``SwapConfig(compile=True)``) are planned whole: kept, swapped or recomputed. A block whose ops
        change with the data (not only with the shapes) is profiled again each time they change.
    """

    def __init__(
        self,
        config: SwapConfig | None = None,
        *,
        backend: CopyBackend | None = None,
        device: torch.device | str | int | None = None,
        host_memory_available: Callable[[], int] = available_host_bytes,
        ranks: RankAgreement | None = None,
    ) -> None:
        self.config = config if config is not None else SwapConfig()
        self._host_memory_available = host_memory_available
        self._ranks = ranks
        self._offloader = ActivationOffloader(
            self.config.offload_config(), backend=backend, device=device,
            host_memory_available=host_memory_available,
        )
        self._device_given = device is not None or backend is not None
        self._model: nn.Module | None = None
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        self._works: dict[tuple[Any, ...], tuple[Workload, BlockProfile, Any]] = {}
        self._calibrated: dict[tuple[Any, ...], Workload] = {}
        self._manual: dict[tuple[Any, ...], tuple[BlockPlan, ...]] = {}
        self._late: set[tuple[Any, ...]] = set()
        self._observed: set[tuple[Any, ...]] = set()
        self._peaks = PeakChecks()  # measured activation peaks against the predictions, per shape
        self._check: PeakCheck | None = None  # the last step's, if it measured its peak
        self._warned_budget: set[tuple[Any, ...]] = set()
        self._plan: Plan | None = None
        self._profile: BlockProfile | None = None
        self._pending: tuple[tuple[Any, ...], BlockProfile, Any, Any, int] | None = None
        self._stale: set[tuple[Any, ...]] = set()
        self._engine: contextlib.ExitStack | None = None
        self._warned_cache = False
        self._warned_diverged = False
        self._engine_on = False
        self._engine_ran = False
        self._counted: SavedBytes | None = None
        self._expected: dict[tuple[Any, ...], tuple[tuple[str, ...], ...]] = {}
        self._call = 0
        self._key: tuple[Any, ...] = ()
        self._in_step = False
        self._step_plan: Plan | None = None
        self._step_marks: tuple[Any, Any] | None = None
        self._bandwidth: Bandwidth | None = None
        self._host_cost: HostCost | None = None
        self._baseline = 0
        self._step_clean = False
        self._backward_mark: Any = None
        self._last_model: weakref.ref[nn.Module] | None = None
        self._wrapped = WrappedBlocks()  # the blocks, their names, what runs them compiled
        self._warmed: set[tuple[Any, ...]] = set()  # input shapes the compiled blocks have run with
        self._warming = False

    # -- setup --------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, blocks: Sequence[nn.Module] | None = None) -> nn.Module:
        """Find the model's blocks and route their calls through the manager. Returns the same model
        object, modified in place.

        The blocks are ``blocks`` if given (modules of ``model``, none inside another), else the modules
        of ``SwapConfig.block_types``, else every container's repeated children
        (:func:`~deltaswap.swap.discovery.find_blocks`); :attr:`block_names` lists them, and every plan
        says how much of the step's activations lies outside them.

        Calling it again with the same model does nothing; :meth:`unwrap` undoes it.

        With ``SwapConfig(compile=...)`` each block is compiled with ``torch.compile`` (the model's own
        modules stay as they are); blocks already compiled (``block.compile()``, or an
        ``OptimizedModule`` as the block) are taken as they are. Compiled blocks are profiled as they
        run and planned whole (keep, swap or recompute); the first step of each input shape compiles
        them and is not timed.

        Warning:
            Blocks with modules inside them compiled in place (but not compiled themselves) are wrapped
            with one warning: the profiling step and per-op plans run those modules eagerly, so those
            steps' gradients are eager PyTorch's.

        Raises:
            ValueError: if no blocks are found (the message says how to name them), if ``blocks`` are
                not modules of ``model`` or one lies inside another, if the blocks are already wrapped
                by another manager or by torch's ``checkpoint_wrapper``, if Hugging Face gradient
                checkpointing is on, if this manager already wraps another model, or if the model is
                compiled as a whole with ``torch.compile`` (or a compiled part of it is not a block):
                the message says to compile the blocks instead.
        """
        if self._model is model:
            return model
        last = self._last_model() if self._last_model is not None else None
        if last is not None and last is not model:
            self.replan()  # the cached plans were measured on another model
        if self._model is not None:
            raise ValueError("this ActivationManager already wraps another model: use one manager per model, "
                             "or call unwrap() first")
        wrapped = wrap_blocks(model, blocks, self, block_types=self.config.block_types,
                              compile_options=self.config.compile_options())
        self._wrapped, self._model = wrapped, model
        self._warmed = set()  # new compiled callables: each shape compiles
        self._last_model = weakref.ref(model)
        return model

    def unwrap(self) -> nn.Module | None:
        """Put the original blocks back into the model (state-dict keys never changed) and forget it;
        returns the model (``None`` if nothing was wrapped). Plans stay cached for a later :meth:`wrap`
        of the same model (wrapping another one forgets them)."""
        model = self._model
        self._wrapped.unwrap()
        self._wrapped, self._model = WrappedBlocks(), None
        return model

    def close(self) -> None:
        """Give the pinned host memory back; call when training with this manager is over. A later
        step allocates it again."""
        self._offloader.close()

    @property
    def model(self) -> nn.Module | None:
        """The wrapped model (``None`` before :meth:`wrap` and after :meth:`unwrap`)."""
        return self._model

    @property
    def blocks(self) -> list[nn.Module]:
        """The modules the model now calls for its blocks (torch CheckpointWrapper modules, in order).
        Hooks on them run once per forward pass, never in a recompute."""
        return self._wrapped.block_wrappers

    @property
    def block_names(self) -> list[str]:
        """The qualified names of the wrapped blocks in the model, in order (e.g. ``blocks.0``)."""
        return list(self._wrapped.names)

    @property
    def blocks_summary(self) -> str:
        """The wrapped blocks for people, a run of one class at a time:
        ``layer1.0 .. layer4.2: Bottleneck x16``."""
        return describe_blocks(self._wrapped.names, self._wrapped.blocks)

    def replan(self, config: SwapConfig | None = None) -> None:
        """Forget every plan (optionally switching to a new budget or policy); the next step profiles
        again. The engine and its pinned pool are kept."""
        if config is not None:
            if config.offload_config() != self.config.offload_config():
                raise ValueError("replan can change the budget, policy, block types and bandwidth; the "
                                 "engine settings (min_bytes, look-ahead, pool) need a new manager")
            if self._model is not None and config.compile_options() != self.config.compile_options():
                raise ValueError("replan cannot change compile while a model is wrapped: call unwrap(), "
                                 "then wrap the model again under the new config")
            self.config = config
        self._plans.clear()
        self._works.clear()
        self._calibrated.clear()
        self._manual.clear()
        self._observed.clear()
        self._peaks = PeakChecks()
        self._warned_budget.clear()
        self._late.clear()
        self._expected.clear()
        self._stale.clear()
        self._plan, self._pending, self._bandwidth, self._host_cost = None, None, None, None
        self._check = None

    # -- per step -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self) -> Iterator[ActivationManager]:
        """Run one training forward pass under the current plan (or profile it). Call ``backward``
        after the block, outside it.

        Warning:
            On CUDA, the profiling step of each input shape and the first steps that run its plan (up
            to :data:`~deltaswap.swap.calibration.PEAK_CHECKS`, while their plan is one no step has
            measured yet) reset the allocator's peak statistics
            (``torch.cuda.reset_peak_memory_stats``) at the first block: they measure their activation
            peak against the plan's prediction. The profiling step also resets them as the head's
            backward and each block's backward end (it measures the peak of each). A
            ``torch.cuda.max_memory_allocated()`` read across those steps sees the resets."""
        if self._model is None:
            raise RuntimeError("call ActivationManager.wrap(model) before step()")
        param = next(self._model.parameters(), None)
        if param is not None and param.device.type not in ("cuda", "cpu"):
            raise ValueError(f"deltaswap trains on CUDA devices (and on the CPU, without swapping); the "
                             f"model is on {param.device}. Move it to a CUDA device, or train without "
                             f"deltaswap.")
        if not self._device_given and self._offloader.backend is None and param is not None:
            self._offloader.set_device(param.device)
        budget = self.config.memory_budget
        if param is not None and param.device.type == "cuda" and isinstance(budget, int):
            check_budget_fits(budget, torch.cuda.get_device_properties(param.device).total_memory)
        if self._ranks is not None and self._key:
            # every rank must plan in the same steps: refuse ranks whose last steps differed in shape
            self._ranks.same_step(self._key, self._pending is not None)
        self._finish_profiling()
        self._finish_late_profiles()
        self._observe()
        self._observe_peak()
        for key in self._stale:  # a block ran other ops than profiled: profile that shape again
            self._forget(key)
        self._stale.clear()
        self._call, self._step_plan, self._profile, self._warming = 0, None, None, False
        self._backward_mark = None
        pool_before = self._offloader.pinned_bytes_reserved
        self._step_clean = False
        counted = None
        with contextlib.ExitStack() as engine:
            self._engine, self._engine_on = engine, False
            if self._offloader.backend is None and self._device_is_cpu() and self._key not in self._plans:
                # no engine to count what is saved outside the blocks: count it for a profiling step
                counted = SavedBytes()
                engine.enter_context(counted.hooks())
            self._counted = counted
            if self._plan is None or not self._plan.moves_nothing:
                self._enter_engine()  # else at the first block, if this step's plan is another one
            start = self._mark()
            self._baseline = torch.cuda.memory_allocated() if self._on_cuda() else 0
            self._in_step = True
            try:
                yield self
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(self._out_of_memory(err)) from err
            else:
                if self._warming:  # the compiled blocks have run with this shape: the next step profiles
                    self._warmed.add(self._key)
            finally:
                self._in_step = False
                if self._check is not None:  # armed in this step: a floor for its peak
                    self._check.floor = torch.cuda.memory_allocated() - self._baseline
                self._engine, self._engine_ran, self._counted = None, self._engine_on, None
                self._step_marks = (start, self._mark())
        # a step that grew the pinned pool (pinned allocations synchronize) does not represent the others
        self._step_clean = self._offloader.pinned_bytes_reserved == pool_before
        if self._profile is not None:
            if self._on_cuda():
                self._profile.forward_end = torch.cuda.memory_allocated() - self._profile.baseline
            # counted: what was saved outside the block calls, each storage once; the engine: each kept
            # tensor, the checkpointed calls' inputs among them (in a profiling step nothing swaps)
            saved = counted.outside if counted is not None else self._offloader.saved_bytes
            self._pending = (self._key, self._profile, *self._step_marks, saved, counted is not None)

    def _device_is_cpu(self) -> bool:
        param = next(self._model.parameters(), None) if self._model is not None else None
        return param is not None and param.device.type == "cpu"

    def _enter_engine(self) -> None:
        """Start the swap engine for the rest of this step. A step whose plan swaps nothing (it keeps
        or recomputes) never starts it: no saved-tensor hooks, no per-tensor or per-module work, nothing
        to pay when nothing moves."""
        if self._engine is not None and not self._engine_on:
            if self._model is not None:
                self._offloader.note_buffers(self._model.buffers())
            self._engine.enter_context(self._offloader)
            self._engine.enter_context(self._offloader.swapping(False))
            self._engine_on = True

    def _out_of_memory(self, err: torch.OutOfMemoryError) -> str:
        """What to tell a user whose step ran out of GPU memory: the plan's numbers and what to change.
        Nothing is left behind: the next step (a smaller batch is a new shape, profiled again) runs."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
        plan = self._step_plan
        if self._warming:
            return (f"deltaswap: out of GPU memory in the first step of this input shape, which compiles "
                    f"the blocks with every block checkpointed (the least memory deltaswap can train "
                    f"with). Lower the batch size or the sequence length. ({first})")
        if plan is None:
            return (f"deltaswap: out of GPU memory in the profiling step of this input shape, which runs "
                    f"with the least memory deltaswap can profile with (the first block of each kind "
                    f"plainly, every other block checkpointed). Lower the batch size or the sequence "
                    f"length. ({first})")
        return (f"deltaswap: out of GPU memory in a step under the plan (policy {plan.policy}, budget "
                f"{format_budget(plan.budget)}, predicted activation peak "
                f"{format_bytes(plan.predicted_peak)}). Lower memory_budget to leave more room for what "
                f"is not activations, or lower the batch size; the next step can run a smaller batch "
                f"without restarting. ({first})")

    # -- results ------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan of the last input shape (``None`` until a profiling step has finished). With
        ``ranks``, plans are made only at the start of a step (planning is collective), so a profiling
        step's plan shows from the next step on."""
        if self._ranks is None:
            self._finish_profiling()
        return self._plan

    @property
    def workload(self) -> Workload | None:
        """What the plan of the last input shape was made from: the measured (and calibrated) cost of
        every block call, the bandwidth, and the memory outside the blocks. ``None`` before profiling
        (with ``ranks``: before the step after it)."""
        if self._ranks is None:
            self._finish_profiling()
        return self._calibrated.get(self._key)

    def use_plan(self, blocks: Sequence[BlockPlan] | None) -> Plan:
        """Run a hand-made plan for the last input shape instead of the policy's, until :meth:`replan`;
        ``None`` goes back to the policy. Returns the plan with its prediction.

        Use it to compare plans by measurement (the benchmark's grid does), or to pin a plan you know.
        With ``ranks`` it is collective: call it on every rank, between the same two steps.
        Build the blocks from :attr:`workload` with :func:`~deltaswap.swap.planner.keep_block`,
        :func:`~deltaswap.swap.planner.swap_block` and :func:`~deltaswap.swap.planner.checkpoint_block`.

        Example::

            >>> work = mgr.workload                                            # doctest: +SKIP
            >>> mgr.use_plan([swap_block(work.blocks[0])]
            ...              + [checkpoint_block(c, {}) for c in work.blocks[1:]])  # doctest: +SKIP

        Raises:
            RuntimeError: if no step has been profiled yet.
            ValueError: if ``blocks`` does not have one entry per block call, or stores op outputs of a
                compiled block.
        """
        work = self.workload
        if work is None:
            raise RuntimeError("use_plan needs a profiled input shape: run one step under mgr.step() first")
        if blocks is None:
            self._manual.pop(self._key, None)
        else:
            if len(blocks) != len(work.blocks):
                raise ValueError(f"use_plan needs one BlockPlan per block call: got {len(blocks)} for "
                                 f"{len(work.blocks)} block calls")
            stored = next((k for k, (b, c) in enumerate(zip(blocks, work.blocks, strict=True))
                           if c.compiled and b.per_op), None)
            if stored is not None:
                name = work.block_names[stored] if stored < len(work.block_names) else "?"
                raise ValueError(f"block call {stored} ({name}) runs compiled: it is planned whole (keep, "
                                 f"swap, or checkpoint storing nothing), so its plan cannot store op outputs")
            self._manual[self._key] = tuple(blocks)
        self._store_plan(self._key, work, warn=blocks is None)  # a plan given by hand: the user's call
        assert self._plan is not None
        return self._plan

    @property
    def stats(self) -> ManagerStats:
        """Measured behaviour of the last step and the plan's prediction for it."""
        marks = self._step_marks
        forward_ms = self._elapsed(*marks) if marks is not None else 0.0
        measured_ms = 0.0
        if marks is not None and self._backward_mark is not None:
            measured_ms = self._elapsed(marks[0], self._backward_mark)
        plan = self._step_plan
        # a step whose plan swapped nothing ran without the engine: it moved and kept nothing itself
        engine = (self._offloader.stats if self._engine_ran else
                  OffloadStats(pinned_bytes_reserved=self._offloader.pinned_bytes_reserved))
        return ManagerStats(
            engine=engine,
            profiling=plan is None,
            forward_ms=forward_ms,
            predicted_peak=plan.predicted_peak if plan else 0,
            predicted_ms=plan.predicted_ms if plan else 0.0,
            measured_ms=measured_ms,
            recompute_ops=plan.recompute_ops if plan else 0,
            recompute_ms=plan.recompute_ms if plan else 0.0,
        )

    # -- the block runner ---------------------------------------------------------------------------
    def _run_block(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled = self._wrapped.compiled.get(id(block))
        run = compiled if compiled is not None else block
        if not self._in_step or not torch.is_grad_enabled():
            return run(*args, **kwargs)  # evaluation, no_grad, or outside a step: untouched
        args, kwargs = self._without_cache(block, args, kwargs)
        call = self._call
        self._call += 1
        if call == 0:
            self._first_block(args, kwargs)
        plan = self._step_plan
        if self._warming:  # compiling for this shape, with the least memory; nothing timed
            return checkpoint_all(run, *args, fn_kwargs=kwargs)
        if plan is None:
            return self._profile_block(call, block, compiled, *args, **kwargs)
        if call >= len(plan.blocks):  # more block calls than when this shape was profiled: least memory
            self._diverged(self._key, self._wrapped.name_of.get(id(block), "?"))
            with self._offloader.swapping(False):
                return checkpoint_all(run, *args, fn_kwargs=kwargs)
        bp = plan.blocks[call]
        if bp.mode is BlockMode.CHECKPOINT:
            with self._offloader.swapping(bp.swap_input):
                if not bp.per_op or compiled is not None:  # nothing stored: torch's checkpoint alone
                    return checkpoint_all(run, *args, fn_kwargs=kwargs)
                return checkpoint_with_policy(block, *args, policy=self._op_policy(call, bp, block),
                                              store=self._offloader.store, fn_kwargs=kwargs)
        if bp.mode is BlockMode.KEEP and not self._engine_on:
            return run(*args, **kwargs)
        with self._offloader.swapping(bp.mode is BlockMode.SWAP):
            return run(*args, **kwargs)

    def _first_block(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """At the step's first block call: find the plan of this input shape, or begin profiling it."""
        self._key = shape_key(args, kwargs)
        self._step_plan = self._plans.get(self._key)
        if self._step_plan is not None:
            self._plans.move_to_end(self._key)
            self._plan = self._step_plan
        elif self._wrapped.compiled and self._key not in self._warmed:
            self._warming = True  # compiling takes seconds: profile at the next step of this shape
        else:
            self._profile = BlockProfile("cuda" if self._on_cuda() else "cpu")
        first = _first_grad_tensor(args)
        if first is not None:  # its gradient arrives when the blocks' backward ends
            first.register_hook(weakly(self._backward_done, self._arm_peak_check()))
        if self._step_plan is None or not self._step_plan.moves_nothing:
            self._enter_engine()

    def _without_cache(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The block's arguments with any KV cache turned off (:func:`~deltaswap.swap.arguments.
        without_cache`); the first time, one warning naming the model."""
        args, kwargs, changed = without_cache(block, args, kwargs)
        if changed and not self._warned_cache:
            self._warned_cache = True
            model = type(self._model).__name__ if self._model is not None else "the model"
            warnings.warn(
                f"deltaswap: {model} keeps a KV cache in its training forward; deltaswap turns it off in "
                f"training steps ({', '.join(changed)} in {type(block).__name__}), as Hugging Face's "
                f"gradient checkpointing does: a recomputed layer would add to the cache a second time. "
                f"Set model.config.use_cache = False to train without it and silence this warning.",
                UserWarning,
                stacklevel=4,
            )
        return args, kwargs

    def _op_policy(self, call: int, bp: BlockPlan, block: nn.Module) -> OpPolicy:
        """The per-op policy of block call ``call``, guarded: from the first op that differs from the
        profile, the call recomputes everything and the shape is profiled again at the next step."""
        work = self._works.get(self._key)
        if work is None:
            return bp.policy()
        expected = self._expected.get(self._key)
        if expected is None:
            expected = self._expected[self._key] = tuple(tuple(op.op for op in b.ops) for b in work[0].blocks)
        name = self._wrapped.name_of.get(id(block), "?")
        return bp.policy(expected[call], weakly(self._diverged, self._key, name))

    def _diverged(self, key: tuple[Any, ...], name: str) -> None:
        """A block call ran other ops (or the step more block calls) than when ``key`` was profiled."""
        if key in self._stale:
            return
        self._stale.add(key)
        if not self._warned_diverged:
            self._warned_diverged = True
            warnings.warn(
                f"deltaswap: block {name} ran other ops than when this input shape was profiled (or the "
                f"step called more blocks); it recomputes everything in this step, and the shape is "
                f"profiled again at the next step. Blocks whose ops depend on the data (not only on "
                f"shapes) are profiled again whenever they change: leave them out of deltaswap's blocks "
                f"if that happens often.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _backward_done(self, check: PeakCheck | None, grad: torch.Tensor) -> None:
        self._backward_mark = self._mark()
        if check is not None:
            check.measured = torch.cuda.max_memory_allocated() - check.baseline

    def _arm_peak_check(self) -> PeakCheck | None:
        """On CUDA, while this step's plan is one no step of its input shape has measured (at most
        :data:`~deltaswap.swap.calibration.PEAK_CHECKS` steps per shape), measure the step's activation
        peak: CUDA's peak statistics are reset here, at the first block, and read when the blocks'
        backward ends."""
        key, plan = self._key, self._step_plan
        if plan is None or not self._on_cuda() or key not in self._works or key in self._manual:
            return None  # a plan given by hand is run as given
        if not self._peaks.wants(key, plan):
            return None
        model = self._model
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                    if p.grad is not None) if model is not None else 0
        torch.cuda.reset_peak_memory_stats()
        self._check = self._peaks.arm(key, plan, self._baseline, grads_held=grads)
        return self._check

    def _profile_block(self, call: int, block: nn.Module, compiled: Callable[..., Any] | None,
                       *args: Any, **kwargs: Any) -> Any:
        profile = self._profile
        assert profile is not None
        if self._on_cuda():
            if call == 0:
                profile.baseline = self._baseline
                torch.cuda.reset_peak_memory_stats()
            first = _first_grad_tensor(args)
            if first is not None:  # its gradient arrives when this call's backward ends (call 0: the blocks')
                done = self._blocks_done if call == 0 else self._call_done
                first.register_hook(weakly(done, profile, call))
        inside = self._counted.in_block() if self._counted is not None else contextlib.nullcontext()
        with self._offloader.swapping(False), inside:
            out = profile.run(call, block, self._wrapped.name_of.get(id(block), type(block).__name__),
                              self._offloader.store, compiled, *args, **kwargs)
        last = _first_grad_tensor(tree_leaves(out))
        if self._on_cuda() and last is not None:
            last.register_hook(weakly(self._head_done, profile))  # the last block's fires first
        return out

    def _head_done(self, profile: BlockProfile, grad: torch.Tensor) -> None:
        if profile.head_mark is None:
            profile.head_peak = torch.cuda.max_memory_allocated() - profile.baseline
            profile.head_mark = self._mark()
            torch.cuda.reset_peak_memory_stats()

    def _call_done(self, profile: BlockProfile, call: int, grad: torch.Tensor) -> None:
        """Call ``call``'s backward is done: the peak since the one after it (or the head) was done is
        its own; the next call's is measured from here."""
        profile.backward_peaks.append((call, torch.cuda.max_memory_allocated() - profile.baseline))
        torch.cuda.reset_peak_memory_stats()

    def _blocks_done(self, profile: BlockProfile, call: int, grad: torch.Tensor) -> None:
        profile.backward_peaks.append((call, torch.cuda.max_memory_allocated() - profile.baseline))
        profile.blocks_peak = max(peak for _, peak in profile.backward_peaks)
        profile.blocks_mark = self._mark()

    # -- planning -----------------------------------------------------------------------------------
    def _finish_profiling(self) -> None:
        if self._pending is None:
            return
        key, profile, start, end, saved_total, counted_outside = self._pending
        self._pending = None
        blocks = profile.costs()
        plain = set(profile.plain_calls)
        block_ms = sum(b.forward_ms for b in blocks)
        other_ms = max(0.0, self._elapsed(start, end) - block_ms)
        # the engine saw the checkpointed calls' inputs and what lies outside the blocks
        other_bytes = saved_total if counted_outside else max(0, saved_total - sum(
            n for k, n in enumerate(profile.input_tensors) if k not in plain))
        work = Workload(
            blocks=blocks,
            other_bytes=other_bytes,
            other_ms=other_ms,
            bandwidth=self._measured_bandwidth(),
            host=self._measured_host_cost(),
            min_bytes=int(self.config.min_bytes),
            lookahead=self.config.offload_config().lookahead_bytes(
                other_bytes + sum(b.saved_bytes for b in blocks)
            ),
            lookahead_fraction=(self.config.prefetch_lookahead
                                if isinstance(self.config.prefetch_lookahead, float) else None),
            other_grad_bytes=(max(0, grad_bytes(self._model)
                                  - sum(grad_bytes(b) for b in self._wrapped.blocks)) if self._model else 0),
            plain_calls=tuple(profile.plain_calls),
            block_names=tuple(profile.names),
        )
        self._works[key] = (work, profile, end)
        self._observed.discard(key)
        self._store_plan(key, calibrate(work, profile, self._times(profile, end), 1.0))
        if profile.blocks_mark is None and self._on_cuda():
            self._late.add(key)  # its backward has not run yet (gradient accumulation): calibrate later

    def _times(self, profile: BlockProfile, end: Any) -> tuple[float, float]:
        """The head's and the blocks' backward times of a profiling step, once its backward has run."""
        if profile.head_mark is None or profile.blocks_mark is None:
            return (0.0, 0.0)
        return (self._elapsed(end, profile.head_mark), self._elapsed(profile.head_mark, profile.blocks_mark))

    def _finish_late_profiles(self) -> None:
        """Calibrate the plans whose profiling step's backward ran after the next step began."""
        for key in [k for k in self._late if k in self._works and self._works[k][1].blocks_mark is not None]:
            self._late.discard(key)
            work, profile, end = self._works[key]
            self._store_plan(key, calibrate(work, profile, self._times(profile, end), 1.0))

    def _store_plan(self, key: tuple[Any, ...], work: Workload, *, warn: bool = True) -> None:
        manual = self._manual.get(key)
        budget = self._budget()
        work = replace(work, peak_margin=self._peaks.margin(key))
        if self._ranks is not None:  # every rank plans from the same numbers, so all get the same plan
            budget = self._ranks.budget(budget)
            work = self._ranks.workload(work)
        if manual is not None:
            plan = plan_manual(work, manual, budget)
        elif self.config.policy == "auto" and key not in self._observed:
            plan = plan_first(work, budget)  # no step has measured the forward's speed yet
        else:
            plan = make_plan(work, self.config.policy, budget)
        if manual is None:
            plan = self._within_host_memory(work, plan, budget)
        self._calibrated[key] = work
        if warn and plan.predicted_peak > plan.budget and key not in self._warned_budget:
            self._warned_budget.add(key)  # once per input shape
            warnings.warn(
                f"deltaswap: the smallest plan found needs {format_bytes(plan.predicted_peak)} of "
                f"activations, {format_bytes(plan.predicted_peak - plan.budget)} over the budget of "
                f"{format_bytes(plan.budget)}; training goes on with it. Lower the batch size or raise "
                f"memory_budget.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._forget(next(iter(self._plans)))
        self._plan = plan

    def _forget(self, key: tuple[Any, ...]) -> None:
        """Drop the plan of input shape ``key`` and what it was made from: its next step profiles."""
        plan = self._plans.pop(key, None)
        if plan is not None and plan is self._plan:
            self._plan = None
        self._warmed.discard(key)
        for cache in (self._works, self._calibrated, self._manual, self._expected):
            cache.pop(key, None)
        self._peaks.forget(key)
        self._observed.discard(key)
        self._warned_budget.discard(key)
        self._late.discard(key)

    def _within_host_memory(self, work: Workload, plan: Plan, budget: int) -> Plan:
        """``plan``, if the host has the RAM to hold what it swaps; else (``auto``) a plan that swaps
        nothing, if one fits the budget, with a warning.

        Raises:
            HostMemoryError: if no plan fits both, naming the sizes and what to change.
        """
        swapped = sum(b.swapped_bytes for b in plan.blocks)
        if swapped == 0:
            return plan
        reserve = int(self.config.offload_config().host_ram_reserve)  # type: ignore[arg-type]
        room = max(0, self._host_memory_available() - reserve) + self._offloader.pinned_bytes_reserved
        fits = swapped <= room
        if self._ranks is not None:
            fits = self._ranks.all(fits)  # one rank short of host RAM: all ranks take the same fallback
        if fits:
            return plan
        local = plan_auto(work, budget, swap=False) if self.config.policy == "auto" else None
        if local is not None and local.predicted_peak <= budget:
            warnings.warn(
                f"deltaswap: the plan would swap {format_bytes(swapped)} to host memory per step, but only "
                f"{format_bytes(room)} of host RAM is free beyond host_ram_reserve"
                f"{share_note(self._host_memory_available)}; training recomputes "
                f"instead (slower). Free host RAM, or lower host_ram_reserve, to let it swap.",
                RuntimeWarning,
                stacklevel=4,
            )
            return local
        raise HostMemoryError(
            f"deltaswap: the plan for this input shape swaps {format_bytes(swapped)} to host memory per "
            f"step, but only {format_bytes(room)} of host RAM is free beyond host_ram_reserve "
            f"({format_bytes(reserve)}){share_note(self._host_memory_available)}, and without swapping "
            f"the activations need more than the budget "
            f"of {format_budget(budget)}. Lower the batch size, raise memory_budget, or free host RAM."
        )

    def _observe(self) -> None:
        """After the first step that ran a plan, compare its forward time with the prediction, rescale
        the measured op times if they differ by more than 5%, and plan once more (the first plan was
        made before any step measured the forward's speed: see :func:`~deltaswap.swap.planner.plan_first`)."""
        plan, marks, key = self._step_plan, self._step_marks, self._key
        if plan is None or marks is None or key in self._observed or key not in self._works:
            return
        clean = self._step_clean
        if self._ranks is not None:
            clean = self._ranks.all(clean)  # re-plan on every rank in the same step, or on none
        if not clean:
            return
        self._observed.add(key)
        work, profile, end = self._works[key]
        times = self._times(profile, end)
        scale = forward_scale(calibrate(work, profile, times, 1.0), plan, self._elapsed(*marks))
        self._store_plan(key, calibrate(work, profile, times, scale))

    def _observe_peak(self) -> None:
        """After a step that measured its activation peak (:meth:`_arm_peak_check`), add what it came to
        above its plan's prediction to every later prediction for that input shape
        (:class:`~deltaswap.swap.calibration.PeakChecks`), and plan again if that moved."""
        check, self._check = self._check, None
        if check is None or check.key not in self._works or check.key in self._manual:
            return
        measured = check.activation_peak is not None
        if self._ranks is not None:
            measured = not self._ranks.all(not measured)  # some rank measured it: all count it measured
        down = MARGIN_DOWN if self.config.policy == "auto" else 1.0  # a fixed policy: the plan measured
        changed = self._peaks.record(check, down, measured=measured) is not None
        if self._ranks is not None and measured:
            changed = not self._ranks.all(not changed)  # re-plan on every rank in the same step, or none
        if changed:
            self._store_plan(check.key, self._calibrated[check.key])  # the ranks agree on the largest

    def _budget(self) -> int:
        budget = self.config.memory_budget
        if not self._on_cuda():
            # no device memory to fit: keep everything unless a size was given
            return budget if isinstance(budget, int) else UNLIMITED
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if isinstance(budget, int):
            check_budget_fits(budget, total)
            return budget
        if isinstance(budget, float):
            return int(budget * total)
        assert self._model is not None
        params = sum(p.numel() * p.element_size() for p in self._model.parameters())
        static = max(torch.cuda.memory_allocated(), 4 * params)  # weights, grads, two Adam moments
        return max(0, int(0.9 * total) - static)

    def _measured_bandwidth(self) -> Bandwidth:
        if self._bandwidth is None:
            if self.config.bandwidth_gbps is not None:
                rate = self.config.bandwidth_gbps
                self._bandwidth = Bandwidth(rate, rate, 2 * rate)
            elif not self._on_cuda():
                self._bandwidth = _NO_PCIE
            else:
                self._bandwidth = measure_bandwidth()
        return self._bandwidth

    def _measured_host_cost(self) -> HostCost:
        """The host's time per op on this device (measured once); none on a CPU, where the host runs
        the ops itself and the op times already hold it."""
        if self._host_cost is None:
            self._host_cost = measure_host_cost() if self._on_cuda() else NO_HOST_COST
        return self._host_cost

    # -- clocks -------------------------------------------------------------------------------------
    def _on_cuda(self) -> bool:
        return isinstance(self._offloader.backend, CudaCopyBackend)

    def _mark(self) -> Any:
        if self._on_cuda():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _elapsed(start: Any, end: Any) -> float:
        if isinstance(start, torch.cuda.Event):
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def check_budget_fits(budget: int, device_bytes: int) -> None:
    """Refuse a ``memory_budget`` in bytes larger than the device it is for.

    Raises:
        ValueError: naming both sizes and what to write instead.
    """
    if budget > device_bytes:
        raise ValueError(
            f"memory_budget={format_bytes(budget)} is more than the device has "
            f"({format_bytes(device_bytes)}); give a smaller size, a fraction such as 0.6, or 'auto' "
            f"(what is left after weights, gradients and optimizer state)"
        )


def _first_grad_tensor(values: Sequence[Any]) -> torch.Tensor | None:
    """The first tensor of ``values`` that requires a gradient."""
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)
