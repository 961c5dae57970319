"""Trace what each mode of one model costs the GPU and the host: kernels launched, device time and host
time per step, and the step time, the modes in turn (``bench_models.py``'s modes, plus ``wrapped``).

Use it when two modes that should run the same GPU work differ in step time: it tells a real difference
(more kernels, more device time) from the host's (the same kernels, launched slower). On the GPU machine
the host changes speed between phases of a run (``cudaLaunchKernel`` at 6.6 and 10.4 us per call, for
the same steps), and torch's checkpoint and deltaswap's recompute make steps host-bound.

For each mode, built from the same weights as in :mod:`bench_models` (one model, each mode set up anew in
every round): ``--rounds`` rounds of ``--steps`` timed steps after ``--warmup`` warm-up steps (6), each
step's time (CUDA events; the wall clock on a CPU), the host time until the forward returns and until
``backward()`` returns (before any synchronization: on a GPU-bound step the host waits ahead of the GPU,
on a host-bound one these are the step), and the activation peak (on a CPU, of the tensors the step
creates, as :mod:`bench_models` counts it); then ``torch.profiler`` over 3 more steps: kernel launches
per step (on a CPU: ATen ops run), device time per step (CUDA kernels' self time) and host time per step
(the profiler's self CPU time, all threads). Modes:

- ``plain``, ``checkpoint`` (torch's per-block checkpointing of deltaswap's blocks), ``ds_recompute``,
  ``ds_swap``, ``auto_fits``, ``auto_ckpt``, ``auto_mid``: as in :mod:`bench_models` (``auto_ckpt`` and
  ``auto_mid`` need ``plain`` and ``checkpoint`` before them);
- ``wrapped``: deltaswap wraps the blocks, but the steps run outside ``mgr.step()`` (the wrapper alone:
  a few Python calls per block, no GPU work).

Launch::

    python examples/trace_modes.py --model resnet50 --modes plain wrapped checkpoint ds_recompute auto_fits
    python examples/trace_modes.py --model bert --attn eager --rounds 3 --steps 8 --out out/trace_bert.json
    python examples/trace_modes.py --tiny --device cpu --model resnet50 --steps 2     # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from deltaswap.swap import ActivationManager, SwapConfig
from deltaswap.swap.discovery import find_blocks

import bench_models as bm

MODES = ("plain", "wrapped", *bm.MODES[1:])
WARMUP = 6
"""Default warm-up steps of every mode in every round (deltaswap's profiling, first plan and re-plan
among them: at least 3)."""
PROFILED_STEPS = 3
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@contextlib.contextmanager
def mode_session(mode: str, bench: bm.Bench, min_bytes: str) -> Iterator[bm.Session]:
    """``mode``'s way of running a step (:func:`bench_models.session`, and ``wrapped``)."""
    if mode != "wrapped":
        with bm.session(mode, bench, find_blocks(bench.model), min_bytes) as run:
            yield run
        return
    bench.reset()
    mgr = ActivationManager(SwapConfig(min_bytes=min_bytes))
    mgr.wrap(bench.model)
    try:
        yield bm.Session(contextlib.nullcontext, cache=True)  # outside mgr.step(): the wrapper alone
    finally:
        mgr.unwrap()
        mgr.close()


def timed_step(bench: bm.Bench, batch: bm.Batch, run: bm.Session, optimizer: torch.optim.Optimizer,
               bf16: bool) -> dict[str, float]:
    """One training step (:func:`bench_models.train_step`): its time, its host times to the forward's
    and the backward's return, its activation peak."""
    m, _ = bm.train_step(bench, batch, run.context, cache=run.cache, bf16=bf16, optimizer=optimizer)
    return {"ms": m.ms, "host_forward_ms": m.host_forward_ms, "host_backward_ms": m.host_backward_ms,
            "peak": m.peak}


def profiled(step: Callable[[], Any], cuda: bool) -> dict[str, float]:
    """Per step, over :data:`PROFILED_STEPS` steps of ``step()``: kernel launches (ATen ops on a CPU),
    device time, host time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
    events = prof.key_averages()
    if cuda:
        launches = sum(e.count for e in events if e.key in LAUNCHES)
    else:
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
    return {
        "launches_per_step": launches / PROFILED_STEPS,
        "device_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / PROFILED_STEPS,
        "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / PROFILED_STEPS,
    }


def trace(name: str, modes: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every mode of model ``name``: its timed steps over the rounds, and one profiled run."""
    shape = bm.default_shape(name, args.tiny)
    bench = bm.build(name, shape, tiny=args.tiny, attn=args.attn, device=device)
    batch = bench.make_batch(shape.batch, torch.Generator().manual_seed(0))
    bf16 = args.dtype == "bf16"
    peaks: dict[str, int] = {}
    steps: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    out: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for rnd in range(args.rounds + 1):  # the last round is the profiled one
        for mode in modes:
            budget = bm.auto_budget(mode, peaks, device) if mode != "wrapped" else "auto"
            if budget is None:
                out[mode]["skipped"] = "needs the peaks of plain and checkpoint first"
                continue
            with mode_session(mode, bench, args.min_bytes) as run:
                run.budget(budget)
                optimizer = torch.optim.AdamW(bench.params, lr=1e-4, fused=device.type == "cuda")
                for _ in range(args.warmup):
                    timed_step(bench, batch, run, optimizer, bf16)
                step = partial(timed_step, bench, batch, run, optimizer, bf16)
                if rnd < args.rounds:
                    steps[mode] += [step() for _ in range(args.steps)]
                    peaks.setdefault(mode, max(s["peak"] for s in steps[mode]))
                else:
                    out[mode].update(profiled(step, device.type == "cuda"))
                del optimizer, step
            bm.free_memory(bench)
    plain = [s["ms"] for s in steps.get("plain", [])]
    for mode in modes:
        if not steps[mode]:
            continue
        ms = [s["ms"] for s in steps[mode]]
        out[mode].update(
            step_ms=statistics.median(ms), best_ms=min(ms), step_ms_all=ms,
            host_forward_ms=statistics.median(s["host_forward_ms"] for s in steps[mode]),
            host_backward_ms=statistics.median(s["host_backward_ms"] for s in steps[mode]),
            act_peak_bytes=max(s["peak"] for s in steps[mode]),
        )
        if plain:
            out[mode].update(x_plain=out[mode]["step_ms"] / statistics.median(plain),
                             x_plain_best=min(ms) / min(plain))
    return out


def line(mode: str, r: dict[str, Any]) -> str:
    if "step_ms" not in r:
        return f"{mode:<13}{r.get('skipped', '')}"
    return (f"{mode:<13}step {r['step_ms']:8.2f} ms  x plain {r.get('x_plain', float('nan')):.3f} (best "
            f"{r.get('x_plain_best', float('nan')):.3f})  host to fwd/bwd end {r['host_forward_ms']:7.2f} / "
            f"{r['host_backward_ms']:7.2f} ms  peak {r['act_peak_bytes'] / bm.GiB:.4f} GiB  launches/step "
            f"{r.get('launches_per_step', 0):.0f}  device {r.get('device_ms_per_step', 0):.2f} ms  host "
            f"{r.get('host_ms_per_step', 0):.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=bm.MODELS)
    parser.add_argument("--modes", nargs="+", default=["plain", "wrapped", "checkpoint", "ds_recompute",
                                                        "auto_fits", "auto_ckpt"], choices=MODES,
                        help="run in the order given")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="warm-up steps per mode and round")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs")
    parser.add_argument("--min-bytes", default="1MiB", help="deltaswap's min_bytes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="trace_modes.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 3:
        raise SystemExit("--steps and --rounds must be at least 1, --warmup at least 3 (deltaswap's "
                         "profiling step, its first plan and the re-plan after it)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deltaswap's CPU and KV-cache warnings, once per manager
        result = trace(args.model, list(args.modes), args, device)
    print(f"{args.model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{args.dtype}, {args.rounds} rounds x {args.steps} steps")
    for mode, r in result.items():
        print("  " + line(mode, r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": str(device), "dtype": args.dtype,
                                          "attn": args.attn, "rounds": args.rounds, "steps": args.steps,
                                          "modes": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
