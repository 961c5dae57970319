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
