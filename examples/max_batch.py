"""Find the largest batch that trains on one GPU, plain and with deltaswap, and how fast each runs.

For each strategy the batch doubles from ``--start`` until a trial fails with CUDA out-of-memory (or
reaches ``--limit``), then bisects between the last batch that fitted and the first that did not. A trial
builds a fresh model (same seed) and fused AdamW, and trains ``--warmup`` + ``--steps`` steps on one
batch in a plain PyTorch loop (bf16 autocast); samples/s is timed with CUDA events over the last
``--steps``. With deltaswap the model is wrapped by an ``ActivationManager``: its first step profiles and
the next ones run (and re-calibrate) the plan for ``--memory-budget``, hence the warm-up steps.

The default model is GPT2-XL (48 layers, d_model 1600, seq 1024, vocab 50257) with the loss computed in
checkpointed chunks of ``--loss-chunk`` positions (``gpt.GPTConfig.loss_chunk``), the same model for both
strategies, so that the full fp32 logits cap neither. The table gives each strategy's largest batch, its
samples/s there, the best samples/s over the batches tried, and the ratios against plain; the lines
below it say what else holds GPU memory (weights, gradients, AdamW states) and each strategy's peak.

Launch (one GPU; a few minutes, mostly deltaswap's larger batches)::

    python examples/max_batch.py --out max_batch.json
    python examples/max_batch.py --strategies deltaswap --start 32 --steps 2     # one strategy, fewer steps
    python examples/max_batch.py --preset gpt2-medium --loss-chunk 0 --policy recompute

Without CUDA it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaswap.swap import ActivationManager, HostMemoryError, SwapConfig

from cli import add_deltaswap_options
from gpt import GPT, PRESETS, GPTConfig, random_batch

GiB = 1 << 30
STRATEGIES = ("plain", "deltaswap")


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch size ``b <= limit`` for which ``fits(b)`` holds, assuming that every batch
    smaller than one that fits also fits.

    Doubles from ``start`` (the last try is ``limit`` itself when a doubling would pass it) until a batch
    fails, then bisects between the last batch that fitted and the first that failed. ``fits`` is called
    at most once per batch size, about ``2 * log2(result / start)`` times in all.

    Args:
        fits: runs a trial at a batch size and says whether it fitted.
        start: the first batch size tried (at least 1).
        limit: the largest batch size tried (at least ``start``).

    Returns:
        The largest batch that fitted, or 0 if ``start`` did not.

    Example::

        >>> largest_batch(lambda b: b <= 37, start=1, limit=1024)
        37
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        return 0
    good, bad = start, None
    while good < limit:
        size = min(2 * good, limit)
        if not fits(size):
            bad = size
            break
        good = size
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


@dataclass
class Trial:
    """One batch size tried with one strategy."""

    batch: int
    fits: bool
    samples_per_s: float = 0.0
    """Over the timed steps (0 if it did not fit)."""
    peak_gib: float = 0.0
    """``torch.cuda.max_memory_allocated`` over the trial (up to the failure if it did not fit; deltaswap's
    profiling step resets the counter once, in its backward pass, and every later step is counted)."""
    seconds: float = 0.0
    """Wall time of the whole trial, model construction included."""
    plan: str = ""
    """deltaswap: the plan's budget, predicted peak and step time."""
    error: str = ""
    """Why it did not fit (the first line of the error)."""
    warnings: list[str] = field(default_factory=list)
    """Warnings raised during the trial (e.g. deltaswap's smallest plan exceeding the budget)."""


@dataclass
class Search:
    """Every trial of one strategy and the largest batch found."""

    strategy: str
    max_batch: int = 0
    trials: list[Trial] = field(default_factory=list)

    def trial(self, batch: int) -> Trial | None:
        return next((t for t in self.trials if t.batch == batch), None)

    @property
    def at_max(self) -> Trial | None:
        """The trial at the largest batch that fitted."""
        return self.trial(self.max_batch)

    @property
    def best(self) -> Trial | None:
        """The fastest trial (samples/s) that fitted."""
        fitted = [t for t in self.trials if t.fits]
        return max(fitted, key=lambda t: t.samples_per_s) if fitted else None


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA out-of-memory (including the forms cuBLAS and cuDNN raise when their workspace fails), or
    deltaswap's pinned host pool running out of host RAM."""
    if isinstance(err, (torch.OutOfMemoryError, HostMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
    )


def train_steps(cfg: GPTConfig, strategy: str, batch: int, args: argparse.Namespace, trial: Trial) -> None:
    """Build the model and optimizer, train ``args.warmup + args.steps`` steps at ``batch`` and fill in
    ``trial``'s samples/s (and plan). Raises CUDA out-of-memory if it does not fit."""
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = GPT(cfg)
    manager = None
    if strategy == "deltaswap":
        manager = ActivationManager(SwapConfig(memory_budget=args.memory_budget, policy=args.policy))
        manager.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens, targets = random_batch(cfg, batch, "cuda", torch.Generator().manual_seed(args.seed))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start.record()
        planned = manager.step() if manager is not None else contextlib.nullcontext()
        with planned, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    end.record()
    end.synchronize()
    trial.samples_per_s = batch * args.steps / (start.elapsed_time(end) / 1e3)
    if manager is not None and manager.plan is not None:
        plan = manager.plan
        trial.plan = (f"plan: budget {plan.budget / GiB:.1f} GiB, predicted peak "
                      f"{plan.predicted_peak / GiB:.1f} GiB, predicted "
                      f"{plan.predicted_ms / max(plan.plain_ms, 1e-9):.3f}x keeping everything")


def run_trial(cfg: GPTConfig, strategy: str, batch: int, args: argparse.Namespace) -> Trial:
    """One trial; CUDA out-of-memory makes it a trial that did not fit. Whatever happened, the trial's
    tensors are freed and the allocator's cache emptied, so the next trial starts clean."""
    trial = Trial(batch=batch, fits=False)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train_steps(cfg, strategy, batch, args, trial)
            trial.fits = True
        except RuntimeError as err:  # torch.OutOfMemoryError and HostMemoryError are RuntimeErrors
            if not is_out_of_memory(err):
                raise
            trial.error = str(err).strip().splitlines()[0][:200]
    # the exception (and with it the frames holding the model) is gone here
    torch.cuda.synchronize()
    trial.seconds = time.perf_counter() - began
    trial.peak_gib = torch.cuda.max_memory_allocated() / GiB
    trial.warnings = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    gc.collect()
    torch.cuda.empty_cache()
    return trial


def search(cfg: GPTConfig, strategy: str, args: argparse.Namespace) -> Search:
    """The largest batch of ``strategy`` (see :func:`largest_batch`), printing each trial."""
    result = Search(strategy)

    def fits(batch: int) -> bool:
        trial = run_trial(cfg, strategy, batch, args)
        result.trials.append(trial)
        outcome = f"{trial.samples_per_s:8.2f} samples/s" if trial.fits else f"OOM ({trial.error[:60]})"
        print(f"  {strategy:<9} batch {batch:5d}: {outcome}  peak {trial.peak_gib:5.1f} GiB  "
              f"({trial.seconds:.1f} s){'  ' + trial.plan if trial.plan else ''}", flush=True)
        for message in trial.warnings:
            print(f"    warning: {message}", flush=True)
        return trial.fits

    result.max_batch = largest_batch(fits, args.start, args.limit)
    return result


def model_state(cfg: GPTConfig) -> dict[str, float]:
    """GiB of fp32 weights, their gradients and AdamW's two moments (the memory that is not activations)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(cfg).parameters())
    weights = params * 4 / GiB
    return {"parameters": params, "weights_gib": weights, "grads_gib": weights,
            "adamw_states_gib": 2 * weights, "total_gib": 4 * weights}


def summarize(results: list[Search], state: dict[str, float], total_gib: float) -> dict[str, Any]:
    """Print the table and return the numbers it shows (for ``--out``)."""
    rows: dict[str, dict[str, Any]] = {}
    print(f"\n{'strategy':<10}{'max batch':>10}{'samples/s at max':>18}{'best samples/s (batch)':>24}"
          f"{'peak GiB at max':>17}")
    for r in results:
        at_max, best = r.at_max, r.best
        rows[r.strategy] = {
            "max_batch": r.max_batch,
            "samples_per_s_at_max": at_max.samples_per_s if at_max else 0.0,
            "best_samples_per_s": best.samples_per_s if best else 0.0,
            "best_batch": best.batch if best else 0,
            "peak_gib_at_max": at_max.peak_gib if at_max else 0.0,
        }
        row = rows[r.strategy]
        best_text = f"{row['best_samples_per_s']:.2f} ({row['best_batch']})"
        print(f"{r.strategy:<10}{r.max_batch:>10}{row['samples_per_s_at_max']:>18.2f}{best_text:>24}"
              f"{row['peak_gib_at_max']:>17.1f}")
    summary: dict[str, Any] = {"strategies": rows}
    plain, swap = rows.get("plain"), rows.get("deltaswap")
    if plain and swap and plain["max_batch"] > 0 and plain["best_samples_per_s"] > 0:
        summary["max_batch_ratio"] = swap["max_batch"] / plain["max_batch"]
        summary["speed_ratio"] = swap["samples_per_s_at_max"] / plain["best_samples_per_s"]
        print(f"deltaswap / plain: max batch {summary['max_batch_ratio']:.2f}x; samples/s at deltaswap's max "
              f"batch / plain's best samples/s {summary['speed_ratio']:.3f}x")
    print(f"not activations: {state['total_gib']:.1f} GiB of the GPU's {total_gib:.1f} GiB "
          f"({state['parameters'] / 1e9:.2f}B parameters: fp32 weights {state['weights_gib']:.1f} + grads "
          f"{state['grads_gib']:.1f} + AdamW states {state['adamw_states_gib']:.1f} GiB)")
    for r in results:
        if r.at_max is not None:
            left = total_gib - r.at_max.peak_gib
            print(f"{r.strategy} at batch {r.max_batch}: peak {r.at_max.peak_gib:.1f} GiB, of which "
                  f"{r.at_max.peak_gib - state['total_gib']:.1f} GiB beyond weights, grads and AdamW states; "
                  f"{left:.1f} GiB of the GPU never allocated")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-xl", choices=sorted(PRESETS))
    parser.add_argument("--loss-chunk", type=int, default=128,
                        help="positions per checkpointed chunk of the loss (0: unchunked)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--start", type=int, default=1, help="first batch size tried")
    parser.add_argument("--limit", type=int, default=1024, help="largest batch size tried")
    add_deltaswap_options(parser, strategy=False)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per trial (deltaswap: profiling, first plan, re-calibrated plan)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every trial and the summary as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("max_batch.py measures GPU memory: it needs a CUDA device, and none is available.",
              file=sys.stderr)
        return 2
    cfg = dataclasses.replace(PRESETS[args.preset], loss_chunk=args.loss_chunk)
    device = torch.cuda.get_device_name()
    total_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    state = model_state(cfg)
    print(f"{args.preset} (loss_chunk {cfg.loss_chunk}), bf16 autocast, fused AdamW, "
          f"{args.warmup}+{args.steps} steps per trial, on {device} ({total_gib:.1f} GiB)")

    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = {"args": options, "model": dataclasses.asdict(cfg), "device": device,
                              "device_gib": total_gib, "model_state": state, "searches": []}
    results = []
    for strategy in args.strategies:
        results.append(search(cfg, strategy, args))
        report["searches"] = [dataclasses.asdict(r) for r in results]
        write(args.out, report)  # after each strategy: a run cut short keeps what it measured
    report["summary"] = summarize(results, state, total_gib)
    write(args.out, report)
    return 0


def write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
