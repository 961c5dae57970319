"""Train a GPT with a plain PyTorch loop under 🤗 Accelerate, its activations kept, swapped or recomputed
under a deltaswap plan.

The same model and generated data as ``train_gpt.py`` (the Lightning example). With ``--strategy
deltaswap`` (the default) one line, ``model = DeltaSwapPlugin(...).prepare(model)``, is all that changes
in the loop: the first step profiles the blocks, later steps run the plan that fits ``--memory-budget``.
With ``--strategy plain`` it is the loop without it. On a machine without CUDA deltaswap warns once and
trains without swapping.

At the end it prints the final loss, tokens/s and samples/s (over the steps after the first two, which
include the profiling step), the peak GPU memory on CUDA and, with deltaswap, the plan and the engine's
measurements. A run that runs out of GPU memory says so and exits with status 3.

Launch::

    python examples/accelerate_gpt.py                         # tiny model, 100 steps: seconds on a CPU
    accelerate launch --num_processes 1 examples/accelerate_gpt.py
    python examples/accelerate_gpt.py --preset gpt2-large --batch-size 32 --max-steps 20       # on a GPU
    python examples/accelerate_gpt.py --preset gpt2-large --batch-size 32 --strategy plain     # OOM
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from deltaswap.strategy import DeltaSwapPlugin
from deltaswap.swap import format_bytes

from cli import add_deltaswap_options
from gpt import GPT, PRESETS
from train_gpt import RandomSequences


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (gpt.PRESETS)")
    add_deltaswap_options(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                        help="default: bf16 on CUDA, no on a CPU")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 for tiny, 3e-4 otherwise")
    parser.add_argument("--clip", type=float, default=0.0,
                        help="clip the gradients' norm to this (0: no clipping, as train_gpt.py)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_cuda, gradient_accumulation_steps=args.grad_accum,
                              mixed_precision=args.mixed_precision or ("bf16" if on_cuda else "no"))
    torch.manual_seed(args.seed)
    cfg = PRESETS[args.preset]
    with accelerator.device:
        model = GPT(cfg)
    lr = args.lr if args.lr is not None else (3e-3 if args.preset == "tiny" else 3e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=on_cuda)
    loader = DataLoader(RandomSequences(cfg, seed=args.seed), batch_size=args.batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plugin = None
    if args.strategy == "deltaswap":
        plugin = DeltaSwapPlugin(memory_budget=args.memory_budget, policy=args.policy)
        model = plugin.prepare(model)  # the one line deltaswap adds
    print(f"{args.preset}: {args.strategy}, batch {args.batch_size} x {cfg.seq_len} tokens, "
          f"{accelerator.mixed_precision}, {accelerator.device}")

    try:
        first, last, seconds, samples = train(accelerator, model, optimizer, loader, args)
    except torch.OutOfMemoryError as err:
        print(f"out of GPU memory at batch {args.batch_size} ({args.strategy}): {str(err).splitlines()[0]}")
        return 3
    print(f"final loss {last:.4f} (step 1: {first:.4f})")
    if seconds > 0:
        print(f"{samples * cfg.seq_len / seconds:,.0f} tokens/s, {samples / seconds:,.1f} samples/s, "
              f"{seconds / max(1, args.max_steps - 2) * 1e3:.1f} ms per optimizer step over steps "
              f"3-{args.max_steps}")
    if on_cuda:
        print(f"peak GPU memory: {format_bytes(torch.cuda.max_memory_allocated())} allocated")
    if plugin is not None and plugin.plan is not None:
        print(plugin.plan)
        print(plugin.stats)
    return 0


def train(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          loader: DataLoader, args: argparse.Namespace) -> tuple[float, float, float, int]:
    """The loop: returns the first and last printed loss, and the seconds and samples of the steps
    after the first two."""
    first = last = float("nan")
    step, samples, start = 0, 0, 0.0
    for tokens, targets in loader:
        with accelerator.accumulate(model):
            loss = model(tokens, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if step == 1 or step % args.log_every == 0 or step == args.max_steps:
            last = float(loss)  # waits for the GPU: only on printed steps
            first = last if step == 1 else first
            print(f"step {step:5d}  loss {last:.4f}", flush=True)
        if step == 2:
            start = _now()
        elif step > 2:
            samples += args.batch_size * args.grad_accum
        if step >= args.max_steps:
            break
    seconds = _now() - start if step > 2 else 0.0
    return first, last, seconds, samples


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    sys.exit(main())
