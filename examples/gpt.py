"""A small, readable GPT (nanoGPT-style decoder) shared by the examples, the benchmark and the tests.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a GELU MLP, learned
position embeddings, a tied language-model head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    """Shape of the model."""

    vocab_size: int = 512
    """Number of token ids."""
    seq_len: int = 128
    """Longest sequence (size of the position embedding)."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    d_model: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches."""
    loss_chunk: int = 0
    """Positions (of the flattened batch x sequence) per chunk of the loss; 0: one unchunked loss. When
    > 0, ``forward(idx, targets)`` runs ``ln_f`` -> ``lm_head`` -> fp32 logits -> cross-entropy one chunk
    at a time under torch's checkpoint, so only one chunk's logits (``loss_chunk x vocab_size``) are ever
    held, in the forward and in the backward pass, whatever the batch size. The loss is the same mean."""


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(),
    "gpt2-medium": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": GPTConfig(vocab_size=50257, seq_len=1024, n_layer=48, n_head=25, d_model=1600),
    # The benchmark's model: ~0.8B parameters, ~27 GiB of activations at batch 8 in bf16.
    "bench": GPTConfig(vocab_size=32000, seq_len=2048, n_layer=16, n_head=16, d_model=2048),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer. ``forward(idx, targets)`` returns the mean cross-entropy loss, or the
    logits when ``targets`` is ``None``. ``block_runner(block, x)``, if set, runs each block instead of
    ``block(x)``: e.g. torch's ``checkpoint(block, x, use_reentrant=False)`` for per-block
    checkpointing. With ``cfg.loss_chunk > 0`` the loss is computed in checkpointed chunks (see
    :attr:`GPTConfig.loss_chunk`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.block_runner: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x) if self.block_runner is None else self.block_runner(block, x)
        if targets is not None and self.cfg.loss_chunk > 0:
            return self.chunked_loss(x, targets)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def chunked_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the head on ``x`` (the last block's output, ``B x T x C``), computed
        over chunks of ``cfg.loss_chunk`` positions of the flattened batch.

        Each chunk's ``ln_f`` -> ``lm_head`` -> fp32 logits -> summed cross-entropy runs under
        ``checkpoint(..., use_reentrant=False)``: the forward pass keeps only the chunk's input, and the
        backward pass recomputes one chunk's logits at a time. The sum of the chunks' summed losses
        divided by the number of targets is the unchunked mean, up to the order of the additions.
        """
        # split (not slicing in a loop): its backward concatenates the chunks' gradients once, where
        # each slice's backward would write a zero-filled gradient of the whole of x
        rows = x.reshape(-1, x.shape[-1]).split(self.cfg.loss_chunk)
        labels = targets.reshape(-1).split(self.cfg.loss_chunk)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for chunk, chunk_targets in zip(rows, labels, strict=True):
            total = total + checkpoint(self._head_loss_sum, chunk, chunk_targets, use_reentrant=False)
        return total / targets.numel()

    def _head_loss_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def random_batch(
    cfg: GPTConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of token ids and next-token targets: a noisy repeating pattern a model can learn."""
    base = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=generator)
    steps = torch.arange(cfg.seq_len + 1).unsqueeze(0)
    seq = (base + 7 * steps) % cfg.vocab_size
    noise = torch.rand(seq.shape, generator=generator) < 0.1
    seq = torch.where(noise, torch.randint(0, cfg.vocab_size, seq.shape, generator=generator), seq)
    seq = seq.to(device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
