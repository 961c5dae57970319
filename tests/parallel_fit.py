"""Fit the test LitGPT with Lightning DDP or FSDP on several processes; run as a script, since Lightning's
launcher starts the other ranks by running the same command again.

    python tests/parallel_fit.py STRATEGY OUT_DIR [--devices N] [--budget B] [--policy P]
                                 [--cuda --precision bf16-mixed] [--model gpt2]

STRATEGY is ``ddp``, ``deltaswap_ddp``, ``fsdp`` or ``deltaswap_fsdp`` (FSDP units: the GPT blocks,
fully sharded). On CPUs the ranks talk over gloo; with ``--cuda`` each uses one GPU (NCCL), with
deterministic kernels and math attention so that two runs can be compared bit for bit. Rank 0 saves the
trained weights (FSDP's full state dict) to ``OUT_DIR/weights.pt``; with deltaswap every rank writes the
plan it ran to ``OUT_DIR/plan_rank{R}.txt`` and the bytes its last step swapped out and back to
``OUT_DIR/swapped_rank{R}.txt``; under FSDP, whether the strategy still holds its ``auto_wrap_policy``
for a later fit to ``OUT_DIR/policy_rank{R}.txt``. ``--model gpt2`` trains Hugging Face's GPT-2 (a tiny
config, its KV cache on as by default; the plain strategies train it with the cache off, as deltaswap
does) instead, with its blocks as FSDP units, and every rank writes the cache length of each training
step's output to ``OUT_DIR/cache_rank{R}.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "examples")]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts (deterministic cuBLAS)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402
from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE as FSDP_PREFIX  # noqa: E402
from typing_extensions import override  # noqa: E402

import deltaswap.strategy  # noqa: E402  (registers the deltaswap strategies)
from deltaswap.strategy.lightning_fsdp import setup_model  # noqa: E402

from gpt import Block  # noqa: E402
from lightning_helpers import LitGPT, LitHF, hf_batches, loader  # noqa: E402


class PlainFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, which refuses CPUs; on a CPU rank the model is wrapped as deltaswap's FSDP
    strategy wraps it there, so that the two can be compared on CPUs."""

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        return setup_model(self, model, super()._setup_model)


def make_strategy(args: argparse.Namespace, block: type[nn.Module]) -> Any:
    ours = {"memory_budget": args.budget or "auto", "policy": args.policy, "min_bytes": 0}
    if args.strategy == "ddp":
        return "ddp"
    if args.strategy == "deltaswap_ddp":
        custom = args.budget is not None or args.policy != "auto"
        return deltaswap.strategy.SwapDDPStrategy(**ours) if custom else "deltaswap_ddp"
    fsdp = {"auto_wrap_policy": {block}, "sharding_strategy": "FULL_SHARD"}
    if args.strategy == "fsdp":
        return PlainFSDPStrategy(**fsdp)
    return deltaswap.strategy.SwapFSDPStrategy(**ours, **fsdp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=("ddp", "deltaswap_ddp", "fsdp", "deltaswap_fsdp"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--budget", default=None, help="deltaswap's memory budget (with min_bytes=0)")
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--cuda", action="store_true", help="train on GPUs instead of CPU processes")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--model", default="gpt", choices=("gpt", "gpt2"),
                        help="gpt: the tests' LitGPT; gpt2: Hugging Face's GPT-2, tiny, KV cache on")
    args = parser.parse_args()
    exact = contextlib.nullcontext()
    if args.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        exact = sdpa_kernel(SDPBackend.MATH)
    L.seed_everything(0, verbose=False)
    block: type[nn.Module] = Block
    if args.model == "gpt2":
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        module: L.LightningModule = LitHF("gpt2")
        if not args.strategy.startswith("deltaswap"):
            module.model.config.use_cache = False  # the plain run as deltaswap trains it: no cache
        block, data = GPT2Block, hf_batches(batches=8)
    else:
        module, data = LitGPT(), loader(batches=8)
    trainer = L.Trainer(
        strategy=make_strategy(args, block), accelerator="gpu" if args.cuda else "cpu", devices=args.devices,
        max_steps=4, precision=args.precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=args.out,
    )
    with exact:
        trainer.fit(module, data)
    rank = trainer.global_rank
    if isinstance(module, LitHF):
        (args.out / f"cache_rank{rank}.txt").write_text(" ".join(map(str, module.caches)))
    plan = getattr(trainer.strategy, "plan", None)
    if plan is not None:
        (args.out / f"plan_rank{rank}.txt").write_text(str(plan))
        stats = trainer.strategy.stats
        engine = stats.engine if stats is not None else None
        moved = (engine.bytes_offloaded, engine.bytes_prefetched) if engine is not None else (0, 0)
        (args.out / f"swapped_rank{rank}.txt").write_text(f"{moved[0]} {moved[1]}")
    if isinstance(trainer.strategy, FSDPStrategy):  # a later fit wraps its model the same way
        (args.out / f"policy_rank{rank}.txt").write_text(str("auto_wrap_policy" in trainer.strategy.kwargs))
    with gathered(trainer.strategy):
        weights = {k.replace(f"{FSDP_PREFIX}.", ""): v.detach().cpu().clone()
                   for k, v in module.state_dict().items()}
    if rank == 0:
        torch.save(weights, args.out / "weights.pt")


def gathered(strategy: Any) -> contextlib.AbstractContextManager[Any]:
    """Every rank holds the full weights inside (FSDP's ``summon_full_params``; every rank calls it).
    Not Lightning's full state dict: FSDP's copy of it to the CPU crashes when the weights are there."""
    if not isinstance(strategy, FSDPStrategy):
        return contextlib.nullcontext()
    return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False)


if __name__ == "__main__":
    main()
