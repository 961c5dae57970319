"""A small GPT LightningModule and a ``fit`` helper shared by the Lightning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpt import GPT, GPTConfig, random_batch

CFG = GPTConfig(vocab_size=97, seq_len=32, n_layer=4, n_head=4, d_model=64, dropout=0.1)


class LitGPT(L.LightningModule):
    """``gpt.GPT`` trained with SGD; ``manual=True`` steps the optimizer itself."""

    def __init__(self, cfg: GPTConfig = CFG, lr: float = 0.1, manual: bool = False) -> None:
        super().__init__()
        self.model = GPT(cfg)
        self.lr = lr
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(*batch)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]
        self.log("train_loss", loss, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(*batch), batch_size=batch[0].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(cfg: GPTConfig = CFG, batches: int = 4, batch_size: int = 4) -> DataLoader:
    """The same ``batches`` batches every epoch, in order."""
    gen = torch.Generator().manual_seed(1)
    xs, ys = zip(*(random_batch(cfg, batch_size, "cpu", gen) for _ in range(batches)), strict=True)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=batch_size, shuffle=False)


def fit(
    strategy: Any,
    root: Path,
    *,
    max_steps: int = 4,
    module: LitGPT | None = None,
    manual: bool = False,
    validate: bool = False,
    ckpt_path: Path | None = None,
    **trainer_args: Any,
) -> tuple[L.Trainer, LitGPT]:
    """Train a LitGPT made after seeding (or ``module``) for ``max_steps`` on CPU; returns the trainer and
    the module."""
    L.seed_everything(0, verbose=False)
    module = module if module is not None else LitGPT(manual=manual)
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        limit_val_batches=2 if validate else 0, num_sanity_val_steps=0,
    )
    args.update(trainer_args)
    trainer = L.Trainer(strategy=strategy, **args)
    trainer.fit(module, loader(), loader() if validate else None, ckpt_path=ckpt_path)
    return trainer, module


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class LitHF(L.LightningModule):
    """A Hugging Face causal LM built from its config (:func:`brought.build`, the KV cache on, its
    default) trained with SGD; ``caches`` records the cache length each training step's output held."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from brought import build  # transformers only where an HF model is asked for

        self.model, _ = build(name)
        self.caches: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        from brought import kv_cache_length

        (ids,) = batch
        out = self.model(input_ids=ids, labels=ids)
        self.caches.append(kv_cache_length(out))
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def hf_batches(batches: int = 4) -> DataLoader:
    """``batches`` batches of 2 sequences of 16 token ids (below the tiny configs' vocabulary)."""
    ids = torch.randint(2, 64, (2 * batches, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=2, shuffle=False)
