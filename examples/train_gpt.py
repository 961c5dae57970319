"""Train a GPT with Lightning, its activations kept, swapped or recomputed under a deltaswap plan.

The model is the examples' nanoGPT-style decoder (``gpt.py``) in a small ``LightningModule``; the data is
generated (a noisy repeating token pattern the model learns within a few dozen steps), so nothing is
downloaded. With ``--strategy deltaswap`` (the default) the Trainer runs
``deltaswap.strategy.SwapStrategy``: the first step profiles the blocks and later steps run the plan that
fits ``--memory-budget``. With ``--strategy plain`` it is Lightning's own single-device training, for
comparison. On a machine without CUDA deltaswap warns once and trains without swapping.

At the end it prints the final loss, tokens/s and samples/s (measured over the steps after the first two,
which include the profiling step), the peak GPU memory on CUDA and, with deltaswap, the plan's predicted
peak and step time and the engine's measurements. Metrics go to ``<--log-dir>/train_gpt/version_N/
metrics.csv`` (Lightning's CSVLogger).

Launch::

    python examples/train_gpt.py                      # tiny model, 100 steps: 10-20 s on a laptop CPU
    python examples/train_gpt.py --preset gpt2-large --batch-size 16 --max-steps 30          # on a GPU
    python examples/train_gpt.py --preset gpt2-large --batch-size 16 --max-steps 30 --strategy plain
    python examples/train_gpt.py --preset gpt2-large --batch-size 16 --max-steps 30 --devices 2   # DDP

With ``--devices N`` (N > 1) it trains with Lightning's DDP, one process per device (``"deltaswap_ddp"``,
or ``"ddp"`` with ``--strategy plain``); ``--batch-size`` is then the batch of each rank, throughput is
counted over all ranks and every rank prints its own peak memory. Lightning's launcher starts the other
ranks by running the same command again. With ``--fsdp`` it trains with Lightning's FSDP instead (each
GPT block an FSDP unit, fully sharded; ``deltaswap.strategy.SwapFSDPStrategy``, or ``"fsdp"``'s
``FSDPStrategy`` with ``--strategy plain``), on any number of devices (CUDA only)::

    python examples/train_gpt.py --preset gpt2-large --batch-size 16 --max-steps 30 --devices 2 --fsdp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from deltaswap.swap import format_bytes
from deltaswap.swap.config import format_budget

from cli import add_deltaswap_options
from gpt import GPT, PRESETS, Block, GPTConfig, random_batch
from overlap import CommOverlap


class RandomSequences(IterableDataset):
    """An endless stream of ``(tokens, next_tokens)`` pairs from :func:`gpt.random_batch`, the same
    stream for the same ``seed``.

    Args:
        cfg: the model's shape (vocabulary and sequence length).
        seed: seed of the stream's generator.
        rows: sequences generated per call of ``random_batch``.

    .. note::
        Every DataLoader worker would produce the same stream: load it with ``num_workers=0``.
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0, rows: int = 64) -> None:
        super().__init__()
        self.cfg, self.seed, self.rows = cfg, seed, rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            tokens, targets = random_batch(self.cfg, self.rows, "cpu", generator)
            yield from zip(tokens, targets, strict=True)


class GPTModule(L.LightningModule):
    """A :class:`gpt.GPT` trained on next-token cross-entropy with AdamW (fused on CUDA) and a linear
    learning-rate warm-up.

    The model is built in :meth:`configure_model`, so Lightning creates it directly on the training
    device (a GPT2-XL is not initialised on the CPU first).

    Args:
        cfg: the model's shape.
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the matrices and embeddings (not of biases and norms).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
    """

    def __init__(
        self, cfg: GPTConfig, lr: float = 3e-3, weight_decay: float = 0.1, warmup_steps: int = 10
    ) -> None:
        super().__init__()
        self.save_hyperparameters({**asdict(cfg), "lr": lr, "weight_decay": weight_decay,
                                   "warmup_steps": warmup_steps})
        self.cfg, self.lr, self.weight_decay, self.warmup_steps = cfg, lr, weight_decay, warmup_steps
        self.model: GPT | None = None

    def configure_model(self) -> None:
        if self.model is None:  # Lightning calls this hook at every fit
            self.model = GPT(self.cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        assert self.model is not None, "GPTModule.forward before configure_model"
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = self(tokens, targets)
        self.log("train_loss", loss, batch_size=tokens.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda")
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Speedometer(Callback):
    """Prints the loss every ``every`` steps and measures throughput over the steps after the first
    ``skip`` (which include deltaswap's profiling step and the optimizer's first, state-allocating step).

    Args:
        every: print the loss every this many optimizer steps (and at the last step).
        skip: steps left out of the throughput.
        until: the last step timed (default: the Trainer's ``max_steps``); the steps after it are left
            out (a step profiled by ``CommOverlap``, say).
    """

    def __init__(self, every: int = 10, skip: int = 2, until: int | None = None) -> None:
        self.every, self.skip, self.until = every, skip, until
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._start: float | None = None
        self.timed_steps = 0
        self.timed_samples = 0
        self.timed_tokens = 0
        self.timed_seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, last = trainer.global_step, trainer.global_step >= trainer.max_steps
        if step == 1 or step % self.every == 0 or last:  # .item() waits for the GPU: only here
            self.last_loss = float(outputs["loss"])
            self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
            rank_zero_print(f"step {step:5d}  loss {self.last_loss:.4f}")
        end = min(self.until, trainer.max_steps) if self.until is not None else trainer.max_steps
        if step == self.skip:
            self._start = self._now(pl_module.device)
        elif self.skip < step <= end and self._start is not None:
            tokens, ranks = batch[0], trainer.world_size  # every rank runs a batch of the same shape
            self.timed_steps += 1
            self.timed_samples += tokens.shape[0] * ranks
            self.timed_tokens += tokens.numel() * ranks
            if step == end:
                self.timed_seconds = self._now(pl_module.device) - self._start

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (gpt.PRESETS)")
    add_deltaswap_options(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step on each device")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices to train on; more than 1 trains with Lightning's DDP, a process each")
    parser.add_argument("--fsdp", action="store_true",
                        help="train with Lightning's FSDP (each block a unit, fully sharded; CUDA only)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--precision", default=None,
                        help="Lightning precision (default: bf16-mixed on CUDA, 32-true on a CPU)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 3e-3 for tiny, 3e-4 for the larger presets)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10, help="print and log the loss every N steps")
    parser.add_argument("--log-dir", default="lightning_logs", help="root of the CSV logs")
    parser.add_argument("--timeline-step", type=int, default=3,
                        help="plot deltaswap's memory timeline of this step (CUDA only; 0: off)")
    parser.add_argument("--profile-step", type=int, default=0,
                        help="profile the step after this many steps with torch.profiler and report how "
                             "much of its gradient communication overlaps computation (CUDA only; 0: off); "
                             "the throughput is measured before it")
    parser.add_argument("--summary", default=None,
                        help="write the run's measurements to this JSON file (under DDP one per rank, "
                             "_rank{R} added before the suffix)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices {args.devices}: train on at least one device")
    if args.fsdp and not torch.cuda.is_available():
        parser.error("--fsdp: Lightning's FSDP trains on CUDA GPUs, and none is available here")
    return args


def swap_callbacks(args: argparse.Namespace, on_cuda: bool) -> list[Callback]:
    """deltaswap's Lightning callbacks: the monitor, the plan summary and, on CUDA with matplotlib, the
    memory timeline of step ``--timeline-step``."""
    from deltaswap.callbacks import SwapMonitor, SwapPlanSummary

    callbacks: list[Callback] = [SwapMonitor(), SwapPlanSummary()]
    if on_cuda and args.timeline_step > 0:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no memory timeline (pip install matplotlib)")
        else:
            from deltaswap.callbacks import MemoryTimeline

            callbacks.append(MemoryTimeline(step=args.timeline_step))
    return callbacks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if on_cuda else "32-true")
    lr = args.lr if args.lr is not None else (3e-3 if args.preset == "tiny" else 3e-4)
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
    L.seed_everything(args.seed, verbose=False)

    cfg = PRESETS[args.preset]
    module = GPTModule(cfg, lr=lr, warmup_steps=args.warmup_steps)
    # the profiled step is slower: it is left out of the throughput
    speedometer = Speedometer(every=args.log_every, until=args.profile_step or None)
    callbacks: list[Callback] = [speedometer]
    strategy = training_strategy(args)
    if args.strategy == "deltaswap":
        callbacks += swap_callbacks(args, on_cuda)
    if args.profile_step > 0:
        callbacks.append(CommOverlap(step=args.profile_step, dirpath=args.log_dir))
    logger = CSVLogger(args.log_dir, name="train_gpt")
    trainer = L.Trainer(
        accelerator="cuda" if on_cuda else "cpu", devices=args.devices, strategy=strategy,
        precision=precision, max_steps=args.max_steps, logger=logger, log_every_n_steps=args.log_every,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
    )
    # each rank draws its own stream (Lightning shards map-style datasets, not iterable ones)
    stream = RandomSequences(cfg, seed=args.seed + trainer.global_rank)
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=0, pin_memory=on_cuda)
    devices = f"{args.devices} x " if args.devices > 1 else ""
    rank_zero_print(f"{args.preset}: {args.strategy}, batch {args.batch_size} x {cfg.seq_len} tokens per "
                    f"device, {precision}, {devices}{'cuda' if on_cuda else 'cpu'}")
    with warnings.catch_warnings():
        # the data is generated in the main process on purpose (see RandomSequences)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader)

    report(trainer, speedometer, on_cuda)
    rank_zero_print(f"metrics: {logger.log_dir}/metrics.csv")
    if args.summary:
        write_summary(Path(args.summary), args, trainer, speedometer)
    return 0


def write_summary(path: Path, args: argparse.Namespace, trainer: L.Trainer, speedometer: Speedometer) -> Path:
    """Write this rank's measurements as JSON (``_rank{R}`` added to the name under DDP): throughput
    over all ranks, peak GPU memory, and with deltaswap the plan's prediction, the activation peak that
    ``MemoryTimeline`` measured and the bytes swapped in the last step; the ``CommOverlap`` profile if
    one was taken."""
    if trainer.world_size > 1:
        path = path.with_name(f"{path.stem}_rank{trainer.global_rank}{path.suffix}")
    seconds = speedometer.timed_seconds
    on_cuda = trainer.strategy.root_device.type == "cuda"
    summary: dict[str, Any] = {
        "preset": args.preset, "strategy": args.strategy, "devices": args.devices,
        "rank": trainer.global_rank, "batch_size": args.batch_size, "steps": trainer.global_step,
        "memory_budget": args.memory_budget, "policy": args.policy,
        "samples_per_s": speedometer.timed_samples / seconds if seconds > 0 else None,
        "timed_steps": speedometer.timed_steps, "timed_samples": speedometer.timed_samples,
        "final_loss": speedometer.last_loss,
        "peak_allocated": torch.cuda.max_memory_allocated(trainer.strategy.root_device) if on_cuda else None,
        "host_available": psutil.virtual_memory().available,
    }
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        stats = trainer.strategy.stats
        summary.update(predicted_peak=plan.predicted_peak, predicted_ms=plan.predicted_ms,
                       plain_ms=plan.plain_ms, budget=plan.budget,
                       bytes_offloaded=stats.engine.bytes_offloaded if stats is not None else None)
    for callback in trainer.callbacks:
        if type(callback).__name__ == "MemoryTimeline":
            summary["activation_peak"] = callback.measured_peak
        elif isinstance(callback, CommOverlap):
            summary["overlap"] = callback.as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return path


def training_strategy(args: argparse.Namespace) -> Any:
    """The Trainer's strategy for ``--strategy``, ``--devices`` and ``--fsdp``: deltaswap's on one device,
    DDP or FSDP, or Lightning's own (``"auto"``, ``"ddp"``, ``FSDPStrategy``) for ``plain``."""
    if args.fsdp:
        from deltaswap.strategy import SwapFSDPStrategy

        fsdp = {"auto_wrap_policy": {Block}, "sharding_strategy": "FULL_SHARD"}
        if args.strategy == "plain":
            return FSDPStrategy(**fsdp)
        return SwapFSDPStrategy(memory_budget=args.memory_budget, policy=args.policy, **fsdp)
    if args.strategy == "plain":
        return "ddp" if args.devices > 1 else "auto"
    from deltaswap.strategy import SwapDDPStrategy, SwapStrategy

    kind = SwapDDPStrategy if args.devices > 1 else SwapStrategy
    return kind(memory_budget=args.memory_budget, policy=args.policy)


def rank_zero_print(text: str) -> None:
    """Print on the first rank only (every rank of a DDP run executes this script)."""
    if rank_zero_only.rank == 0:
        print(text, flush=True)


def report(trainer: L.Trainer, speedometer: Speedometer, on_cuda: bool) -> None:
    """Print the final loss, the throughput (all ranks together), each rank's peak GPU memory and what
    deltaswap planned and did."""
    rank_zero_print(f"final loss {speedometer.last_loss:.4f} (step 1: {speedometer.first_loss:.4f})")
    if speedometer.timed_seconds > 0:
        seconds = speedometer.timed_seconds
        rank_zero_print(f"{speedometer.timed_tokens / seconds:,.0f} tokens/s, "
                        f"{speedometer.timed_samples / seconds:,.1f} samples/s over steps "
                        f"{speedometer.skip + 1}-{speedometer.skip + speedometer.timed_steps}")
    else:
        rank_zero_print(f"throughput: not measured (it needs more than {speedometer.skip} steps)")
    rank = f"rank {trainer.global_rank} " if trainer.world_size > 1 else ""
    if on_cuda:
        # deltaswap's profiling step and SwapMonitor reset the peak counter: with deltaswap this is the
        # peak since the last logged step, without it the peak of the whole run
        device = trainer.strategy.root_device
        print(f"{rank}peak GPU memory: {format_bytes(torch.cuda.max_memory_allocated(device))} allocated, "
              f"{format_bytes(torch.cuda.max_memory_reserved(device))} reserved", flush=True)
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None and trainer.global_rank == 0:
        budget = format_budget(plan.budget)
        print(f"deltaswap plan: policy {plan.policy}, budget {budget}, predicted peak "
              f"{format_bytes(plan.predicted_peak)}, predicted step {plan.predicted_ms:.1f} ms "
              f"({plan.predicted_ms / max(plan.plain_ms, 1e-9):.3f}x keeping everything)")
        print(f"deltaswap stats: {trainer.strategy.stats}")


if __name__ == "__main__":
    raise SystemExit(main())
