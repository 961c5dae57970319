"""Fit the test LitGPT with Lightning DDP on two processes; run as a script, since Lightning's DDP launcher
starts the second rank by running the same command again.

    python tests/ddp_fit.py STRATEGY OUT_DIR [--budget B] [--policy P] [--cuda --precision bf16-mixed]

On CPUs the ranks talk over gloo; with ``--cuda`` each uses one GPU (NCCL), with deterministic kernels and
math attention so that two runs can be compared bit for bit. Rank 0 saves the trained weights to
``OUT_DIR/weights.pt``; with deltaswap every rank writes the plan it ran to ``OUT_DIR/plan_rank{R}.txt``
and the bytes its last step swapped out and back to ``OUT_DIR/swapped_rank{R}.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "examples")]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts (deterministic cuBLAS)

import lightning as L  # noqa: E402
import torch  # noqa: E402

import deltaswap.strategy  # noqa: E402  (registers "deltaswap_ddp")

from lightning_helpers import LitGPT, loader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=("ddp", "deltaswap_ddp"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", default=None, help="deltaswap's memory budget (with min_bytes=0)")
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--cuda", action="store_true", help="train on two GPUs instead of two CPU processes")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    strategy: str | deltaswap.strategy.SwapDDPStrategy = args.strategy
    if args.strategy == "deltaswap_ddp" and (args.budget is not None or args.policy != "auto"):
        strategy = deltaswap.strategy.SwapDDPStrategy(memory_budget=args.budget or "auto", policy=args.policy,
                                                      min_bytes=0)
    exact = contextlib.nullcontext()
    if args.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        exact = sdpa_kernel(SDPBackend.MATH)
    L.seed_everything(0, verbose=False)
    module = LitGPT()
    trainer = L.Trainer(
        strategy=strategy, accelerator="gpu" if args.cuda else "cpu", devices=2, max_steps=4,
        precision=args.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=args.out,
    )
    with exact:
        trainer.fit(module, loader(batches=8))
    rank = trainer.global_rank
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        (args.out / f"plan_rank{rank}.txt").write_text(str(plan))
        stats = trainer.strategy.stats
        engine = stats.engine if stats is not None else None
        moved = (engine.bytes_offloaded, engine.bytes_prefetched) if engine is not None else (0, 0)
        (args.out / f"swapped_rank{rank}.txt").write_text(f"{moved[0]} {moved[1]}")
    if rank == 0:
        weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save(weights, args.out / "weights.pt")


if __name__ == "__main__":
    main()
