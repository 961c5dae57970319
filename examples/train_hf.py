"""Train a Hugging Face causal language model with Lightning, its activations kept, swapped or recomputed
under a deltaswap plan.

The model is a ``transformers`` model built from a config with random weights (``--model gpt2``, ``llama``,
``qwen2`` or ``mistral`` at ``--size tiny``, ``small`` or ``base``; nothing is downloaded). Apart from its
shape the config keeps Hugging Face's defaults, ``use_cache=True`` among them: the model builds a KV cache
in its training forward, as it does out of the box, and deltaswap turns the cache off in the training
steps it plans (as Hugging Face's own gradient checkpointing does). The data is generated: a noisy
repeating token pattern (``gpt.random_batch``) that the model learns within a few dozen steps, fed as
``model(input_ids=x, labels=x).loss``.

With ``--strategy deltaswap`` (the default) the Trainer runs ``deltaswap.strategy.SwapStrategy``: the first
step profiles the model's decoder layers and later steps run the plan that fits ``--memory-budget``. With
``--strategy plain`` it is Lightning's own single-device training, for comparison. On a machine without
CUDA deltaswap warns once and trains without swapping.

At the end it prints the final loss, tokens/s and samples/s (measured over the steps after the first two,
which include the profiling step), the peak GPU memory on CUDA and, with deltaswap, the plan and the
engine's measurements. Metrics go to ``<--log-dir>/train_hf/version_N/metrics.csv``.

Launch::

    python examples/train_hf.py                               # tiny GPT-2, 30 steps: seconds on a CPU
    python examples/train_hf.py --model llama                 # tiny Llama
    python examples/train_hf.py --model gpt2 --size base --batch-size 32 --max-steps 30      # on a GPU
    python examples/train_hf.py --model llama --size base --batch-size 8 --max-steps 30      # ~1B, GPU
    python examples/train_hf.py --model llama --size base --batch-size 8 --max-steps 30 --strategy plain
    python examples/train_hf.py --model llama --size base --batch-size 16 --memory-budget 24GiB
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cli import add_deltaswap_options
from gpt import GPTConfig, random_batch
from lightning_run import fit, report, summarize

MODELS = ("gpt2", "llama", "qwen2", "mistral")
"""The model families ``--model`` builds (Hugging Face config classes ``GPT2Config``, ``LlamaConfig``,
``Qwen2Config``, ``MistralConfig``)."""


@dataclass(frozen=True)
class Size:
    """The shape of a ``--size`` preset, for every family."""

    layers: int
    """Decoder layers."""
    hidden: int
    """Width of the residual stream."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention; GPT-2 has as many as ``heads``)."""
    intermediate: int
    """Width of the MLP (Llama-shaped families; GPT-2 uses 4 x ``hidden``)."""
    vocab: int
    """Number of token ids."""
    seq_len: int
    """Default ``--seq-len`` (and at least the model's longest position)."""


SIZES: dict[str, Size] = {
    "tiny": Size(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=172, vocab=512, seq_len=64),
    "small": Size(layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1376, vocab=8192, seq_len=512),
    # gpt2: the real GPT-2 (124M, GPT2Config's defaults); the others: a ~1.1B Llama shape (TinyLlama's)
    "base": Size(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632, vocab=32000, seq_len=1024),
}


def hf_config(model: str, size: str) -> Any:
    """The Hugging Face config of ``--model`` at ``--size``: Hugging Face's defaults except the shape.

    ``gpt2 --size base`` is ``GPT2Config()`` itself, the 124M GPT-2 (12 layers, 768 wide, 50257 tokens,
    1024 positions).
    """
    import transformers

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: one of {', '.join(MODELS)}")
    shape = SIZES[size]
    if model == "gpt2":
        if size == "base":
            return transformers.GPT2Config()
        last = shape.vocab - 1  # GPT-2's <|endoftext|> is its last token id
        return transformers.GPT2Config(vocab_size=shape.vocab, n_positions=max(1024, shape.seq_len),
                                       n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                                       bos_token_id=last, eos_token_id=last)
    kinds = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
             "mistral": transformers.MistralConfig}
    return kinds[model](vocab_size=shape.vocab, hidden_size=shape.hidden,
                        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                        max_position_embeddings=max(2048, shape.seq_len))


def build_model(model: str, size: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A causal LM of ``--model`` at ``--size`` with random weights (never downloaded).

    Args:
        model: the family (one of :data:`MODELS`).
        size: the preset (one of :data:`SIZES`).
        attn_implementation: ``"eager"`` or ``"sdpa"`` (Hugging Face's attention kernels).
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(model, size), attn_implementation=attn_implementation)


class TokenStream(IterableDataset):
    """An endless stream of ``(tokens,)`` samples from :func:`gpt.random_batch` (a noisy repeating
    pattern), the same stream for the same ``seed``.

    Args:
        vocab_size: number of token ids.
        seq_len: tokens per sample.
        seed: seed of the stream's generator.
        rows: samples generated at a time.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, rows: int = 64) -> None:
        super().__init__()
        self.shape = GPTConfig(vocab_size=vocab_size, seq_len=seq_len)
        self.seed, self.rows = seed, rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            tokens, _ = random_batch(self.shape, self.rows, "cpu", generator)
            yield from ((row,) for row in tokens)


class CausalLMModule(L.LightningModule):
    """A Hugging Face causal LM trained on its own loss (``labels=input_ids``) with AdamW (fused on CUDA)
    and a linear learning-rate warm-up.

    The model is built in :meth:`configure_model`, so Lightning creates it directly on the training device.

    Args:
        model: the family (one of :data:`MODELS`).
        size: the preset (one of :data:`SIZES`).
        attn_implementation: ``"eager"`` or ``"sdpa"``.
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the matrices and embeddings (not of biases and norms).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
    """

    def __init__(self, model: str, size: str, attn_implementation: str = "sdpa", lr: float = 3e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.family, self.size, self.attn_implementation = model, size, attn_implementation
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:  # Lightning calls this hook at every fit
            self.model = build_model(self.family, self.size, self.attn_implementation)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "CausalLMModule.forward before configure_model"
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self(tokens)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", choices=MODELS, help="the Hugging Face model family")
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES),
                        help="tiny: seconds on a CPU; small: a quick GPU run; base: GPT-2 124M, or a ~1B "
                             "Llama shape for the other families")
    add_deltaswap_options(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the size's)")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--precision", default=None,
                        help="Lightning precision (default: bf16-mixed on CUDA, 32-true on a CPU)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 3e-3 for tiny, 3e-4 for the larger sizes)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10, help="print and log the loss every N steps")
    parser.add_argument("--log-dir", default="lightning_logs", help="root of the CSV logs")
    parser.add_argument("--timeline-step", type=int, default=3,
                        help="plot deltaswap's memory timeline of this step (CUDA only; 0: off)")
    parser.add_argument("--summary", default=None, help="also write the returned summary to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 2:
        parser.error(f"--seq-len {args.seq_len}: a causal LM's loss needs at least 2 tokens")
    positions = hf_config(args.model, args.size).max_position_embeddings  # GPT-2's n_positions too
    if args.seq_len is not None and args.seq_len > positions:
        parser.error(f"--seq-len {args.seq_len}: {args.model} --size {args.size} has {positions} positions")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print what happened and return it (see :func:`lightning_run.summarize`; with tokens/s)."""
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if on_cuda else "32-true")
    lr = args.lr if args.lr is not None else (3e-3 if args.size == "tiny" else 3e-4)
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
    L.seed_everything(args.seed, verbose=False)

    module = CausalLMModule(args.model, args.size, args.attn_implementation, lr=lr,
                            warmup_steps=args.warmup_steps)
    vocab = hf_config(args.model, args.size).vocab_size
    seq_len = args.seq_len or SIZES[args.size].seq_len
    loader = DataLoader(TokenStream(vocab, seq_len, seed=args.seed), batch_size=args.batch_size,
                        num_workers=0, pin_memory=on_cuda)
    print(f"{args.model} {args.size}: {args.strategy}, batch {args.batch_size} x {seq_len} tokens, "
          f"{precision}, {args.attn_implementation} attention, {'cuda' if on_cuda else 'cpu'}", flush=True)
    trainer, speedometer, logger = fit(args, module, loader, name="train_hf", precision=precision,
                                       on_cuda=on_cuda)
    summary = summarize(trainer, speedometer, model=args.model, size=args.size, strategy=args.strategy,
                        batch_size=args.batch_size)
    seconds = speedometer.timed_seconds
    summary["tokens_per_s"] = speedometer.timed_tokens / seconds if seconds > 0 else None
    throughput = ""
    if summary["tokens_per_s"] is not None:
        throughput = (f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['samples_per_s']:,.1f} samples/s "
                      f"(after the first 2 steps)")
    report(summary, trainer, logger, throughput, args.summary)
    return summary
if __name__ == "__main__":
    main()
