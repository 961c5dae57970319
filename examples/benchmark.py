"""Benchmark deltaswap's swap engine against torch's built-ins on one GPU.

Measures pinned and pageable PCIe bandwidth (device->host, host->device, both at once), then trains a
GPT-style decoder (bf16 autocast, SDPA attention, fused AdamW) under:

- ``plain``: nothing saved differently (the reference every ratio is taken against, in this process);
- ``checkpoint``: torch per-block activation checkpointing (``use_reentrant=False``);
- ``save_on_cpu``: torch's ``save_on_cpu(pin_memory=True)``;
- ``swap_all``: deltaswap swapping every saved activation of at least ``--min-bytes``;
- ``swap_first2``: deltaswap swapping only the first two blocks' activations;
- ``engine_only``: deltaswap's hooks active but nothing swapped (its host-side overhead alone);
- ``sac_matmul``: torch selective checkpointing that saves matmul and attention outputs;
- ``ds_swap``, ``ds_recompute``, ``ds_delta``: deltaswap's ActivationManager with that policy;
- ``auto_mid``, ``auto_sac``, ``auto_ckpt``, ``auto_min``: the ``auto`` policy with the budget midway
  between plain's and sac_matmul's measured peaks, at sac_matmul's, at checkpoint's, and as small as it
  goes (those modes must run first, in the same process);
- ``compiled``: every block compiled with ``torch.compile`` (inductor, regional: one graph for the
  blocks), nothing else; ``tc_budget50``, ``tc_budget20``: the same with torch.compile's own activation
  memory budget (``torch._functorch.config.activation_memory_budget`` 0.5 and 0.2: its partitioner
  recomputes inside each block's graph, and swaps nothing);
- ``dsc_at50``, ``dsc_at20``, ``dsc_min``: deltaswap with ``SwapConfig(compile=True)`` (the same
  compiled blocks, planned whole: kept, swapped or recomputed), ``auto`` at the measured peak of
  ``tc_budget50``, of ``tc_budget20`` (those must run first), and as small as it goes. Each compiled mode
  compiles anew (``torch._dynamo.reset()``); its warm-up steps hold the compilation.

With ``--fsdp``, the model is wrapped in FSDP on this one GPU, each block a unit, as Lightning's
``FSDPStrategy(auto_wrap_policy={Block})`` wraps it (one rank: a process group of one). ``plain`` is then
plain FSDP; ``checkpoint`` is FSDP's own activation checkpointing of every block (what Lightning's
``activation_checkpointing_policy={Block}`` applies, a second copy of the model); ``ds_*`` and ``auto_*``
plan the blocks inside FSDP's units, as ``deltaswap_fsdp`` does. Only ``plain``, ``checkpoint``,
``ds_*``, ``auto_ckpt`` and ``auto_min`` run under ``--fsdp``.

With ``--grid``, each of ``auto_mid``, ``auto_sac`` and ``auto_ckpt`` is followed by a grid of hand-made
plans at the same budget (``grid_<budget>_<plan>``): the first 0, 1 or 2 blocks swapped, then per block
one of keep (K), selective recompute that stores the matmul and attention outputs (C) or full recompute
(R), as the first M blocks of one kind and the rest of another, with the smallest M predicted to fit.
The summary compares ``auto`` with the fastest grid plan whose measured peak is within 5% of the budget.

For ``swap_all`` it prints the transfer-bound time ``max(T_fwd, B/BW_d2h) + max(T_bwd, B/BW_h2d) + T_opt``
(bandwidths measured here, times from the plain run) and the GPU memory still held at the end of the
forward pass by tensors whose copies had not finished.

Launch::

    python examples/benchmark.py                                  # 16 layers, d 2048, seq 2048, batch 8
    python examples/benchmark.py --preset gpt2-medium --batch-size 4 --out out/bench.json
    python examples/benchmark.py --modes plain swap_first2 --steps 10
    python examples/benchmark.py --fsdp --preset gpt2-large --batch-size 16 \
        --modes plain checkpoint ds_recompute auto_ckpt auto_min
    python examples/benchmark.py --modes plain compiled tc_budget50 tc_budget20 dsc_at50 dsc_at20 dsc_min
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from deltaswap.swap import ActivationManager, ActivationOffloader, OffloadConfig, SwapConfig
from deltaswap.swap.planner import (
    BlockCost,
    BlockPlan,
    Workload,
    checkpoint_block,
    keep_block,
    simulate,
    swap_block,
)
from deltaswap.swap.profile import copy_rate, duplex_rate
from deltaswap.swap.recompute import OpDecision

from gpt import GPT, PRESETS, Block, random_batch

GiB = 1 << 30
TC_BUDGETS = {"compiled": 1.0, "tc_budget50": 0.5, "tc_budget20": 0.2}
"""torch.compile's ``activation_memory_budget`` of each torch.compile mode."""
DSC_PEERS = {"dsc_at50": "tc_budget50", "dsc_at20": "tc_budget20", "dsc_min": None}
"""The torch.compile mode whose measured peak is each compiled deltaswap mode's budget."""
COMPILED_MODES = (*TC_BUDGETS, *DSC_PEERS)
MODES = (
    "plain", "checkpoint", "sac_matmul", "swap_first2", "swap_all", "save_on_cpu", "engine_only",
    "ds_swap", "ds_recompute", "ds_delta", "auto_mid", "auto_sac", "auto_ckpt", "auto_min",
    *COMPILED_MODES,
)
DEFAULT_MODES = ("plain", "checkpoint", "sac_matmul", "swap_first2", "swap_all", "save_on_cpu",
                 "ds_recompute", "ds_delta", "ds_swap", "auto_mid", "auto_sac", "auto_ckpt", "auto_min")
FSDP_MODES = ("plain", "checkpoint", "ds_swap", "ds_recompute", "ds_delta", "auto_ckpt", "auto_min")
aten = torch.ops.aten
SAC_SAVED = {
    aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
}


# -- PCIe ------------------------------------------------------------------------------------------
def _footprint_rates(total: int, piece: int) -> tuple[float, float]:
    """D2H and H2D GB/s of ``piece``-byte copies walking once over ``total`` bytes of pinned memory (1 GiB
    chunks, as the engine's pool holds them), rather than reusing one buffer: the regime the engine copies
    in, where the host memory's address translations are not warm."""
    chunks = [torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True) for _ in range(total >> 30)]
    slices = [c[i : i + piece] for c in chunks for i in range(0, c.numel(), piece)]
    dev = torch.empty(piece, dtype=torch.uint8, device="cuda")
    rates = []
    for to_host in (True, False):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for host in slices:
            if to_host:
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(piece * len(slices) / start.elapsed_time(end) / 1e6)
    return rates[0], rates[1]


def benchmark_bandwidth() -> dict[str, float]:
    """Pinned and pageable copy rates in GB/s (1e9 bytes/s)."""
    out: dict[str, float] = {}
    out["pinned_d2h_8GiB_walk"], out["pinned_h2d_8GiB_walk"] = _footprint_rates(8 << 30, 64 << 20)
    for label, nbytes, reps in (("256MB", 256 << 20, 8), ("1MB", 1 << 20, 200)):
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for kind, pinned in (("pinned", True), ("pageable", False)):
            if kind == "pageable" and label == "1MB":
                continue
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            out[f"{kind}_d2h_{label}"] = copy_rate(host, dev, repeats=reps if pinned else 3)
            out[f"{kind}_h2d_{label}"] = copy_rate(dev, host, repeats=reps if pinned else 3)
    h_out, h_in = (torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    d_out, d_in = (torch.empty(256 << 20, dtype=torch.uint8, device="cuda") for _ in range(2))
    out["pinned_duplex_256MB"] = duplex_rate((h_out, d_out), (d_in, h_in), repeats=8)
    return out


# -- training modes --------------------------------------------------------------------------------
def _checkpoint_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return checkpoint(block, x, use_reentrant=False)


def _sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAC_SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    contexts = partial(create_selective_checkpoint_contexts, _sac_policy)
    return checkpoint(block, x, use_reentrant=False, context_fn=contexts)


def _auto_budget(mode: str, results: dict[str, Any]) -> int | None:
    """The budget of an ``auto_*`` mode from peaks measured earlier in this run (None if missing)."""
    measured = ("plain", "sac_matmul", "checkpoint")
    peak = {k: results[k]["act_peak_gib"] * GiB for k in measured if k in results}
    wanted = {"auto_mid": ("plain", "sac_matmul"), "auto_sac": ("sac_matmul",),
              "auto_ckpt": ("checkpoint",), "auto_min": ()}[mode]
    if not all(k in peak for k in wanted):
        return None
    return 1 if not wanted else int(sum(peak[k] for k in wanted) / len(wanted))


SAC_SAVED_NAMES = {str(op) for op in SAC_SAVED}
GRID_KINDS = {
    "K": keep_block,
    "C": lambda c: checkpoint_block(c, {op.index: OpDecision.KEEP for op in c.ops
                                        if op.op in SAC_SAVED_NAMES and op.storable and op.out_bytes}),
    "R": lambda c: checkpoint_block(c, {}),
}


def grid_plans(work: Workload, budget: int) -> dict[str, list[BlockPlan]]:
    """Hand-made plans for ``budget`` (see the module docstring), by name: ``s1_R3C12`` swaps block 0,
    recomputes the next 3 fully and the other 12 selectively."""
    blocks: tuple[BlockCost, ...] = work.blocks
    out: dict[str, list[BlockPlan]] = {}
    for swapped in (0, 1, 2):
        head = [swap_block(c) for c in blocks[:swapped]]
        rest = blocks[swapped:]
        for first, then in (("C", "K"), ("R", "K"), ("R", "C")):
            for m in range(len(rest) + 1):
                plans = head + [GRID_KINDS[first if i < m else then](c) for i, c in enumerate(rest)]
                if simulate(work, plans).peak <= budget:
                    name = f"s{swapped}_{first}{m}{then}{len(rest) - m}"
                    if plans not in out.values():
                        out[name] = plans
                    break
    return out


def fsdp_models(model: GPT, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """``model`` wrapped in FSDP (each :class:`Block` a unit, fully sharded, ``use_orig_params`` as
    Lightning sets it) and a copy of it wrapped the same way with FSDP's activation checkpointing of
    every block applied after, as Lightning's ``FSDPStrategy(activation_checkpointing_policy={Block})``
    applies it. On one process, a process group of one (NCCL on CUDA, gloo on a CPU) is started if none
    is; the last value says whether this call started it."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)

    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(m, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device,
                                        sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True)

    peer = wrap(copy.deepcopy(model))
    apply_activation_checkpointing(
        peer, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, Block))
    return wrap(model), peer, started


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_mode(
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    ctx_factory: Callable[[], contextlib.AbstractContextManager],
    *,
    warmup: int,
    steps: int,
    profile: str | None = None,
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps under ``ctx_factory()``; time and measure the last ``steps``."""
    times: dict[str, list[float]] = {"step": [], "fwd": [], "bwd": [], "opt": []}
    peaks, fwd_end, losses = [], [], []
    for i in range(warmup + steps):
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        with ctx_factory(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
            held = torch.cuda.memory_allocated() - before  # host-side allocator stats: no sync
        ev[1].record()
        loss.backward()
        ev[2].record()
        peak = torch.cuda.max_memory_allocated() - before
        optimizer.step()
        ev[3].record()
        torch.cuda.synchronize()
        if i >= warmup:
            times["step"].append(ev[0].elapsed_time(ev[3]))
            times["fwd"].append(ev[0].elapsed_time(ev[1]))
            times["bwd"].append(ev[1].elapsed_time(ev[2]))
            times["opt"].append(ev[2].elapsed_time(ev[3]))
            peaks.append(peak)
            fwd_end.append(held)
            losses.append(loss.item())
    if profile is not None:
        _profile_step(model, optimizer, batch, ctx_factory, Path(f"{profile}_{name}.txt"))
    result: dict[str, Any] = {f"{k}_ms": _median(v) for k, v in times.items()}
    result["act_peak_gib"] = max(peaks) / GiB
    result["fwd_end_gib"] = _median(fwd_end) / GiB
    result["loss"] = losses[-1]
    print(f"  {name:<12} step {result['step_ms']:8.1f} ms  act peak {result['act_peak_gib']:6.2f} GiB",
          flush=True)
    return result


def _profile_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    ctx_factory: Callable[[], contextlib.AbstractContextManager],
    path: Path,
) -> None:
    """One more step under torch.profiler: the kernel and copy table, for looking at where time went."""
    from torch.profiler import ProfilerActivity, profile, record_function

    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("forward"), ctx_factory(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        with record_function("backward"):
            loss.backward()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages()
    path.write_text(table.table(sort_by="self_cuda_time_total", row_limit=40) + "\n\nby host time:\n"
                    + table.table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--min-bytes", default="1MiB")
    parser.add_argument("--lookahead", default="0.25", help="prefetch_lookahead: a fraction or a size")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument("--grid", action="store_true", help="after each auto_* mode, measure hand-made plans")
    parser.add_argument("--grid-steps", type=int, default=4, help="timed steps per grid plan")
    parser.add_argument("--plot", default=None, help="write a Pareto plot (step time vs peak) to this PNG")
    parser.add_argument("--profile", default=None, help="write a torch.profiler summary of one step per mode")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON results")
    parser.add_argument("--fsdp", action="store_true",
                        help="wrap the model in FSDP on this GPU, each block a unit (see above)")
    args = parser.parse_args(argv)
    if args.fsdp and any(m not in FSDP_MODES for m in args.modes):
        parser.error(f"--fsdp runs only the modes {', '.join(FSDP_MODES)}")
    if args.grid and any(m in COMPILED_MODES for m in args.modes):
        parser.error("--grid plans the uncompiled blocks: run the compiled modes without it")
    if not torch.cuda.is_available():
        print("benchmark.py measures PCIe and GPU step times: it needs a CUDA device.", file=sys.stderr)
        return 2
    lookahead: float | str = float(args.lookahead) if "." in args.lookahead else args.lookahead

    cfg = PRESETS[args.preset]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    bandwidth = benchmark_bandwidth()
    for key, value in bandwidth.items():
        print(f"  {key:<24}{value:7.1f} GB/s")

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    net: torch.nn.Module = model  # what is trained: the model, or its FSDP wrapper
    peer: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None  # --fsdp: FSDP's own checkpointing
    if args.fsdp:
        net, peer_net, started = fsdp_models(model, torch.device("cuda", torch.cuda.current_device()))
        if started:  # ended at exit, as NCCL asks
            atexit.register(torch.distributed.destroy_process_group)
        peer = (peer_net, torch.optim.AdamW(peer_net.parameters(), lr=1e-4, fused=True))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    batch = random_batch(cfg, args.batch_size, "cuda", torch.Generator().manual_seed(0))
    print(f"model: {args.preset} {n_params / 1e6:.0f}M params, batch {args.batch_size}, seq {cfg.seq_len}"
          + (", FSDP on one GPU" if args.fsdp else ""))

    config = OffloadConfig(min_bytes=args.min_bytes, prefetch_lookahead=lookahead)
    manager: ActivationManager | None = None
    if any(m.startswith(("ds_", "auto_")) for m in args.modes):
        manager = ActivationManager(SwapConfig(min_bytes=args.min_bytes, prefetch_lookahead=lookahead))
        manager.wrap(net)  # outside manager.step() the wrapped blocks run plainly
    results: dict[str, Any] = {}
    for mode in args.modes:
        if mode in COMPILED_MODES:
            if manager is not None:
                manager.unwrap()  # the compiled modes compile the blocks themselves
            result = run_compiled_mode(mode, model, optimizer, batch, results, args, lookahead)
            if manager is not None:
                manager.wrap(net)
            if result is not None:
                results[mode] = result
            continue
        offloader: ActivationOffloader | None = None
        if not args.fsdp:  # under FSDP, checkpoint trains the copy FSDP checkpoints itself
            model.block_runner = {"checkpoint": _checkpoint_block, "sac_matmul": _sac_block}.get(mode)
        if mode.startswith(("ds_", "auto_")):
            assert manager is not None
            budget = _auto_budget(mode, results) if mode.startswith("auto_") else "auto"
            if budget is None:
                print(f"  {mode:<12} skipped: needs the peaks of plain, sac_matmul and checkpoint first")
                continue
            policy = mode[3:] if mode.startswith("ds_") else "auto"
            manager.replan(SwapConfig(min_bytes=args.min_bytes, prefetch_lookahead=lookahead, policy=policy,
                                      memory_budget=budget))
            results[mode] = run_mode(mode, net, optimizer, batch, manager.step, warmup=max(args.warmup, 3),
                                     steps=args.steps, profile=args.profile)
            results[mode]["plan"] = _plan_summary(manager, budget)
            results[mode]["engine"] = asdict(manager.stats.engine)
            work = manager.workload
            results[mode]["workload"] = asdict(work) if work is not None else None  # for offline planning
            if args.grid and mode in ("auto_mid", "auto_sac", "auto_ckpt"):
                assert isinstance(budget, int)
                run_grid(mode, budget, manager, net, optimizer, batch, args.grid_steps, results)
            continue
        if mode == "swap_all":
            offloader = ActivationOffloader(config)
        elif mode == "swap_first2":
            offloader = ActivationOffloader(config, modules=list(model.blocks[:2]))
        elif mode == "engine_only":
            offloader = ActivationOffloader(OffloadConfig(min_bytes=1 << 60))
        if offloader is not None:
            factory: Callable[[], contextlib.AbstractContextManager] = lambda o=offloader: o  # noqa: E731
        elif mode == "save_on_cpu":
            factory = lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)  # noqa: E731
        else:
            factory = contextlib.nullcontext
        trained, opt = peer if peer is not None and mode == "checkpoint" else (net, optimizer)
        results[mode] = run_mode(
            mode, trained, opt, batch, factory, warmup=args.warmup, steps=args.steps, profile=args.profile
        )
        if offloader is not None:
            stats = offloader.stats
            results[mode]["engine"] = {k: getattr(stats, k) for k in stats.__dataclass_fields__}
            offloader.close()
    model.block_runner = None

    summary = summarize(results, bandwidth)
    if args.plot:
        pareto_plot(results, args.plot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
        "batch_size": args.batch_size, "fsdp": args.fsdp, "bandwidth_gbps": bandwidth, "modes": results,
        "summary": summary,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


def run_compiled_mode(
    mode: str,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    results: dict[str, Any],
    args: argparse.Namespace,
    lookahead: float | str,
) -> dict[str, Any] | None:
    """One of :data:`COMPILED_MODES`, compiled anew (None if the peak its budget needs is missing)."""
    torch._dynamo.reset()  # each mode compiles with its own settings
    model.block_runner = None  # not the checkpointing of an earlier mode
    if mode in DSC_PEERS:
        peer = DSC_PEERS[mode]
        if peer is not None and peer not in results:
            print(f"  {mode:<12} skipped: needs the peak of {peer} first")
            return None
        budget = int(results[peer]["act_peak_gib"] * GiB) if peer is not None else 1
        manager = ActivationManager(SwapConfig(min_bytes=args.min_bytes, prefetch_lookahead=lookahead,
                                               memory_budget=budget, compile=True))
        manager.wrap(model)
        try:  # warm-up: compiling, profiling, the first plan, its re-plan
            result = run_mode(mode, model, optimizer, batch, manager.step, warmup=max(args.warmup, 4),
                              steps=args.steps, profile=args.profile)
            result["plan"] = _plan_summary(manager, budget)
            result["engine"] = asdict(manager.stats.engine)
        finally:
            manager.unwrap()
            manager.close()
        return result
    compiled = {id(b): torch.compile(b) for b in model.blocks}
    model.block_runner = lambda block, h: compiled[id(block)](h)
    try:
        with torch._functorch.config.patch(activation_memory_budget=TC_BUDGETS[mode]):
            return run_mode(mode, model, optimizer, batch, contextlib.nullcontext, warmup=max(args.warmup, 2),
                            steps=args.steps, profile=args.profile)
    finally:
        model.block_runner = None


def run_grid(
    mode: str,
    budget: int,
    manager: ActivationManager,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    results: dict[str, Any],
) -> None:
    """Measure the hand-made plans of :func:`grid_plans` at ``budget``, right after ``mode``."""
    work = manager.workload
    assert work is not None
    for name, plans in grid_plans(work, budget).items():
        manager.use_plan(plans)
        key = f"grid_{mode.removeprefix('auto_')}_{name}"
        results[key] = run_mode(key, model, optimizer, batch, manager.step, warmup=2, steps=steps)
        results[key]["plan"] = _plan_summary(manager, budget, show=False)
        results[key]["engine"] = asdict(manager.stats.engine)
    manager.use_plan(None)


def _plan_summary(manager: ActivationManager, budget: int | str, *, show: bool = True) -> dict[str, Any]:
    plan = manager.plan
    assert plan is not None
    if show:
        print(plan)
    return {
        "budget_gib": plan.budget / GiB,
        "predicted_peak_gib": plan.predicted_peak / GiB,
        "predicted_ms": plan.predicted_ms,
        "kept_gib": sum(b.kept_bytes for b in plan.blocks) / GiB,
        "swapped_gib": sum(b.swapped_bytes for b in plan.blocks) / GiB,
        "recompute_ms": sum(b.recompute_ms for b in plan.blocks),
        "modes": [b.mode.value + ("+in" if b.swap_input else "") for b in plan.blocks],
        "calibration": plan.calibration,
    }


def pareto_plot(results: dict[str, Any], path: str) -> None:
    """Step time (x plain) against activation peak, one point per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("--plot needs matplotlib: pip install 'deltaswap[plot]'", file=sys.stderr)
        return
    plain = results["plain"]["step_ms"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, r in results.items():
        if mode.startswith("grid_"):
            ax.scatter(r["act_peak_gib"], r["step_ms"] / plain, color="tab:gray", s=8, alpha=0.6)
            continue
        ours = mode.startswith(("ds_", "auto_", "swap_"))
        ax.scatter(r["act_peak_gib"], r["step_ms"] / plain, color="tab:red" if ours else "tab:blue")
        ax.annotate(mode, (r["act_peak_gib"], r["step_ms"] / plain), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("activation peak (GiB)")
    ax.set_ylabel("step time (x plain)")
    ax.set_title("deltaswap (red), torch (blue), hand-made plans (gray): step time vs activation memory")
    ax.set_yscale("log")
    ratio = FuncFormatter(lambda v, _: f"{v:.2f}x")
    ax.yaxis.set_major_formatter(ratio)
    ax.yaxis.set_minor_formatter(ratio)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def summarize(results: dict[str, Any], bandwidth: dict[str, float]) -> dict[str, Any]:
    """Print the table (ratios against plain from this process) and the swap-all transfer bound."""
    summary: dict[str, Any] = {}
    plain = results.get("plain")
    print(f"\n{'mode':<12}{'step ms':>9}{'x plain':>9}{'fwd ms':>8}{'bwd ms':>8}{'act peak GiB':>14}"
          f"{'fwd-end GiB':>13}{'swapped GiB':>13}{'D2H GB/s':>10}{'H2D GB/s':>10}{'stall ms':>10}"
          f"{'budget GiB':>12}{'pred peak':>11}{'f+b ms':>8}{'pred ms':>9}")
    for mode, r in results.items():
        ratio = r["step_ms"] / plain["step_ms"] if plain else float("nan")
        eng = r.get("engine", {})
        swapped = eng.get("bytes_offloaded", 0) / GiB
        print(f"{mode:<12}{r['step_ms']:9.1f}{ratio:9.3f}{r['fwd_ms']:8.1f}{r['bwd_ms']:8.1f}"
              f"{r['act_peak_gib']:14.2f}{r['fwd_end_gib']:13.2f}{swapped:13.2f}"
              f"{eng.get('d2h_gbps', 0):10.1f}{eng.get('h2d_gbps', 0):10.1f}"
              f"{eng.get('backward_stall_ms', 0):10.1f}", end="")
        plan = r.get("plan")
        if plan:
            print(f"{plan['budget_gib']:12.2f}{plan['predicted_peak_gib']:11.2f}"
                  f"{r['fwd_ms'] + r['bwd_ms']:8.1f}{plan['predicted_ms']:9.1f}", end="")
        print()
        summary[f"{mode}_x_plain"] = ratio
    for mode in ("auto_mid", "auto_sac", "auto_ckpt", "auto_min", *DSC_PEERS):  # is each budget kept?
        if mode not in results:
            continue
        r, plan = results[mode], results[mode]["plan"]
        warned = plan["predicted_peak_gib"] > plan["budget_gib"]  # the manager warned: cannot be met
        kept = r["act_peak_gib"] <= plan["budget_gib"]
        error = r["act_peak_gib"] / plan["predicted_peak_gib"] - 1
        summary[f"{mode}_budget_kept"] = kept or warned
        summary[f"{mode}_peak_vs_predicted"] = error
        verdict = "kept" if kept else ("over, warned" if warned else "OVER, not warned")
        print(f"{mode}: budget {plan['budget_gib']:.2f} GiB {verdict}; measured peak {r['act_peak_gib']:.2f} "
              f"GiB, {error:+.1%} against the predicted {plan['predicted_peak_gib']:.2f}")
    for mode in ("auto_mid", "auto_sac", "auto_ckpt"):
        prefix = f"grid_{mode.removeprefix('auto_')}_"
        if mode not in results or not plain:
            continue
        budget = results[mode]["plan"]["budget_gib"]
        fits = {k: r for k, r in results.items()
                if k.startswith(prefix) and r["act_peak_gib"] <= budget * 1.05}
        if not fits:
            continue
        best = min(fits, key=lambda k: fits[k]["step_ms"])
        gap = results[mode]["step_ms"] / fits[best]["step_ms"] - 1
        summary[f"{mode}_vs_best_grid"] = gap
        print(f"{mode}: {results[mode]['step_ms'] / plain['step_ms']:.3f} x plain; best of {len(fits)} "
              f"hand-made plans within 5% of the budget: {best} at "
              f"{fits[best]['step_ms'] / plain['step_ms']:.3f} x ({gap:+.1%} for auto)")
    if plain and "swap_all" in results:
        eng = results["swap_all"]["engine"]
        d2h_s = eng["bytes_offloaded"] / (bandwidth["pinned_d2h_256MB"] * 1e9) * 1e3
        h2d_s = eng["bytes_prefetched"] / (bandwidth["pinned_h2d_256MB"] * 1e9) * 1e3
        bound = max(plain["fwd_ms"], d2h_s) + max(plain["bwd_ms"], h2d_s) + plain["opt_ms"]
        summary["swap_all_bound_ms"] = bound
        summary["swap_all_x_bound"] = results["swap_all"]["step_ms"] / bound
        summary["swap_all_inflight_at_fwd_end_gib"] = eng["inflight_bytes_at_exit"] / GiB
        print(f"\nswap_all: {eng['bytes_offloaded'] / GiB:.2f} GiB each way; transfer-bound time "
              f"max({plain['fwd_ms']:.1f}, {d2h_s:.1f}) + max({plain['bwd_ms']:.1f}, {h2d_s:.1f}) + "
              f"opt {plain['opt_ms']:.1f} = {bound:.1f} ms; measured {results['swap_all']['step_ms']:.1f} ms "
              f"= {summary['swap_all_x_bound']:.3f} x bound")
        print(f"swap_all: at the end of the forward pass the GPU still held "
              f"{results['swap_all']['fwd_end_gib']:.2f} GiB (plain: {plain['fwd_end_gib']:.2f} GiB); "
              f"{summary['swap_all_inflight_at_fwd_end_gib']:.2f} GiB of it were tensors whose copy to host "
              f"had not finished")
    return summary


if __name__ == "__main__":
    sys.exit(main())
