"""What the Lightning examples with the models users bring share: the strategy, the Trainer and its fit,
and what a run reports (``train_hf.py``, ``train_vision.py``)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from deltaswap.swap import format_bytes

from train_gpt import Speedometer, swap_callbacks


def training_strategy(args: argparse.Namespace) -> Any:
    """deltaswap's ``SwapStrategy`` with ``--memory-budget`` and ``--policy``, or Lightning's ``"auto"``."""
    if args.strategy == "plain":
        return "auto"
    from deltaswap.strategy import SwapStrategy

    return SwapStrategy(memory_budget=args.memory_budget, policy=args.policy)


def fit(args: argparse.Namespace, module: L.LightningModule, loader: DataLoader, *, name: str,
        precision: str, on_cuda: bool) -> tuple[L.Trainer, Speedometer, CSVLogger]:
    """Train ``module`` on ``loader`` for ``--max-steps`` on one device, deltaswap's callbacks with
    ``--strategy deltaswap``, metrics to ``<--log-dir>/<name>/version_N/metrics.csv``."""
    speedometer = Speedometer(every=args.log_every)
    callbacks: list[Callback] = [speedometer]
    if args.strategy == "deltaswap":
        callbacks += swap_callbacks(args, on_cuda)
    logger = CSVLogger(args.log_dir, name=name)
    trainer = L.Trainer(
        accelerator="cuda" if on_cuda else "cpu", devices=1, strategy=training_strategy(args),
        precision=precision, max_steps=args.max_steps, logger=logger, log_every_n_steps=args.log_every,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # generated in the main process
        trainer.fit(module, loader)
    return trainer, speedometer, logger


def summarize(trainer: L.Trainer, speedometer: Speedometer, **fields: Any) -> dict[str, Any]:
    """The run's measurements after ``fields``: the first and final loss, samples/s over the timed steps,
    peak GPU memory (``None`` on a CPU) and, with deltaswap, the plan's block calls, predicted peak and
    step time."""
    seconds = speedometer.timed_seconds
    device = trainer.strategy.root_device
    summary: dict[str, Any] = {
        **fields, "steps": trainer.global_step,
        "first_loss": speedometer.first_loss, "final_loss": speedometer.last_loss,
        "samples_per_s": speedometer.timed_samples / seconds if seconds > 0 else None,
        "peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "plan_blocks": None, "block_names": None, "predicted_peak": None, "predicted_ms": None,
    }
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        summary.update(plan_blocks=len(plan.blocks), block_names=list(plan.block_names),
                       predicted_peak=plan.predicted_peak, predicted_ms=plan.predicted_ms,
                       plain_ms=plan.plain_ms, budget=plan.budget, policy=plan.policy)
    return summary


def report(summary: dict[str, Any], trainer: L.Trainer, logger: CSVLogger, throughput: str,
           summary_path: str | None) -> None:
    """Print the loss, ``throughput`` (a line, or ``""`` when not measured), the peak GPU memory and
    what deltaswap planned and did; write ``summary`` as JSON to ``summary_path`` if given."""
    print(f"final loss {summary['final_loss']:.4f} (step 1: {summary['first_loss']:.4f})")
    print(throughput if throughput else "throughput: not measured (it needs more than 2 steps)")
    if summary["peak_allocated"] is not None:
        # deltaswap's profiling step and SwapMonitor reset the peak counter: with deltaswap this is the
        # peak since the last logged step, without it the peak of the whole run
        print(f"peak GPU memory: {format_bytes(summary['peak_allocated'])} allocated")
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        print(f"deltaswap plan:\n{plan}")
        print(f"deltaswap stats: {trainer.strategy.stats}")
    print(f"metrics: {logger.log_dir}/metrics.csv")
    if summary_path:
        path = Path(summary_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
