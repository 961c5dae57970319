"""Fit the test LitGPT with Lightning DDP on two CPU processes (gloo); run as a script, since Lightning's
DDP launcher starts the second rank by running the same command again.

    python tests/ddp_fit.py STRATEGY OUT_DIR [MEMORY_BUDGET]

Rank 0 saves the trained weights to ``OUT_DIR/weights.pt``; every rank writes the plan it ran to
``OUT_DIR/plan_rank{R}.txt`` (deltaswap only).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "examples")]

import lightning as L  # noqa: E402
import torch  # noqa: E402

import deltaswap.strategy  # noqa: E402  (registers "deltaswap_ddp")

from lightning_helpers import LitGPT, loader  # noqa: E402


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    if strategy == "deltaswap_ddp" and len(sys.argv) > 3:
        strategy = deltaswap.strategy.SwapDDPStrategy(memory_budget=sys.argv[3], min_bytes=0)
    L.seed_everything(0, verbose=False)
    module = LitGPT()
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out,
    )
    trainer.fit(module, loader(batches=8))
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        (out / f"plan_rank{trainer.global_rank}.txt").write_text(str(plan))
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / "weights.pt")


if __name__ == "__main__":
    main()
