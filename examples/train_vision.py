"""Train a torchvision image classifier with Lightning, its activations kept, swapped or recomputed under a
deltaswap plan.

The model is a torchvision model with random weights (``--model resnet50``, ``resnet18``, ``vit_b_16`` or
``convnext_tiny``, through ``torchvision.models.get_model(name, weights=None, num_classes=...)``; nothing
is downloaded). Its blocks are found without being named: the 16 bottlenecks of a ResNet-50 (in its four
stages of different widths, the first of each with its downsample), the 12 encoder layers of a ViT-B/16,
the 18 blocks and 3 downsampling layers of a ConvNeXt-T. The data is generated: noise images whose class
brightens one cell of a grid in one channel, which the model learns within a few dozen steps.

With ``--strategy deltaswap`` (the default) the Trainer runs ``deltaswap.strategy.SwapStrategy``: the first
step profiles the blocks and later steps run the plan that fits ``--memory-budget``. With ``--strategy
plain`` it is Lightning's own single-device training, for comparison. On a machine without CUDA deltaswap
warns once and trains without swapping.

At the end it prints the final loss, samples/s (measured over the steps after the first two, which include
the profiling step), the peak GPU memory on CUDA and, with deltaswap, the plan and the engine's
measurements. Metrics go to ``<--log-dir>/train_vision/version_N/metrics.csv``.

Launch::

    python examples/train_vision.py                         # ResNet-50 at 64x64, 20 steps: a CPU minute
    python examples/train_vision.py --model vit_b_16 --max-steps 8                           # on a CPU
    python examples/train_vision.py --image-size 224 --batch-size 256 --max-steps 30         # on a GPU
    python examples/train_vision.py --image-size 224 --batch-size 256 --max-steps 30 --strategy plain
    python examples/train_vision.py --model vit_b_16 --image-size 224 --batch-size 256 --memory-budget 20GiB
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cli import add_deltaswap_options
from lightning_run import fit, report, summarize

MODELS = ("resnet50", "resnet18", "vit_b_16", "convnext_tiny")
"""The torchvision models ``--model`` builds."""


def build_model(name: str, num_classes: int = 10, image_size: int = 224) -> nn.Module:
    """A torchvision classifier with random weights (never downloaded).

    Args:
        name: one of :data:`MODELS`.
        num_classes: outputs of the classification head.
        image_size: side of the square images (a ViT's position embedding is made for it; a multiple of
            its patch size, 16).
    """
    import torchvision

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    extra: dict[str, Any] = {"image_size": image_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def class_images(labels: torch.Tensor, image_size: int, num_classes: int, signal: float = 3.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Images of Gaussian noise in which class ``c`` adds ``signal`` to one cell of a grid (cell ``c`` of
    ``ceil(sqrt(num_classes))`` x as many, row by row) in channel ``c % 3``: learnable, but only by looking
    at the right place.

    Args:
        labels: the class of each image, shape ``(N,)``.
        image_size: side of the square images.
        num_classes: number of classes (sets the grid).
        signal: brightness added to the class's cell.
        generator: the noise's generator.

    Returns:
        A float tensor of shape ``(N, 3, image_size, image_size)``.
    """
    images = torch.randn(len(labels), 3, image_size, image_size, generator=generator)
    grid = math.ceil(math.sqrt(num_classes))
    cell = image_size // grid
    if cell == 0:
        raise ValueError(f"images of {image_size} pixels are too small for a {grid} x {grid} grid of classes")
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, grid)
        images[i, c % 3, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] += signal
    return images


class ClassImages(IterableDataset):
    """An endless stream of ``(image, label)`` pairs from :func:`class_images`, the same stream for the
    same ``seed``.

    Args:
        image_size: side of the square images.
        num_classes: number of classes, drawn uniformly.
        seed: seed of the stream's generator.
        rows: images generated at a time.
    """

    def __init__(self, image_size: int, num_classes: int, seed: int = 0, rows: int = 64) -> None:
        super().__init__()
        self.image_size, self.num_classes, self.seed, self.rows = image_size, num_classes, seed, rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            labels = torch.randint(0, self.num_classes, (self.rows,), generator=generator)
            images = class_images(labels, self.image_size, self.num_classes, generator=generator)
            yield from zip(images, labels, strict=True)


class ClassifierModule(L.LightningModule):
    """A torchvision classifier trained on cross-entropy with AdamW (fused on CUDA) and a linear
    learning-rate warm-up.

    The model is built in :meth:`configure_model`, so Lightning creates it directly on the training device.

    Args:
        model: one of :data:`MODELS`.
        num_classes: number of classes.
        image_size: side of the square images.
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the matrices and convolutions (not of biases and norms).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
    """

    def __init__(self, model: str, num_classes: int, image_size: int, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.name, self.num_classes, self.image_size = model, num_classes, image_size
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:  # Lightning calls this hook at every fit
            self.model = build_model(self.name, self.num_classes, self.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "ClassifierModule.forward before configure_model"
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images).float(), labels)
        self.log("train_loss", loss, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=self.device.type == "cuda")
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=MODELS, help="the torchvision model")
    add_deltaswap_options(parser)
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the square images (224: ImageNet's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--precision", default=None,
                        help="Lightning precision (default: bf16-mixed on CUDA, 32-true on a CPU)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 1e-3 for the convolutional nets, 3e-4 for a ViT)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=5, help="print and log the loss every N steps")
    parser.add_argument("--log-dir", default="lightning_logs", help="root of the CSV logs")
    parser.add_argument("--timeline-step", type=int, default=3,
                        help="plot deltaswap's memory timeline of this step (CUDA only; 0: off)")
    parser.add_argument("--summary", default=None, help="also write the returned summary to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_classes < 2:
        parser.error(f"--num-classes {args.num_classes}: a classifier needs at least 2 classes")
    if args.model.startswith("vit_") and args.image_size % 16:
        parser.error(f"--image-size {args.image_size}: {args.model} needs a multiple of its patch size, 16")
    if args.image_size < math.ceil(math.sqrt(args.num_classes)):
        parser.error(f"--image-size {args.image_size}: too small for a grid of {args.num_classes} classes")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print what happened and return it (see :func:`lightning_run.summarize`)."""
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if on_cuda else "32-true")
    lr = args.lr if args.lr is not None else (3e-4 if args.model.startswith("vit_") else 1e-3)
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
        torch.backends.cudnn.benchmark = True  # one input shape throughout
    L.seed_everything(args.seed, verbose=False)

    module = ClassifierModule(args.model, args.num_classes, args.image_size, lr=lr,
                              warmup_steps=args.warmup_steps)
    loader = DataLoader(ClassImages(args.image_size, args.num_classes, seed=args.seed),
                        batch_size=args.batch_size, num_workers=0, pin_memory=on_cuda)
    print(f"{args.model}: {args.strategy}, batch {args.batch_size} x {args.image_size}x{args.image_size}, "
          f"{args.num_classes} classes, {precision}, {'cuda' if on_cuda else 'cpu'}", flush=True)
    trainer, speedometer, logger = fit(args, module, loader, name="train_vision", precision=precision,
                                       on_cuda=on_cuda)
    summary = summarize(trainer, speedometer, model=args.model, strategy=args.strategy,
                        batch_size=args.batch_size, image_size=args.image_size)
    rate = summary["samples_per_s"]
    report(summary, trainer, logger, f"{rate:,.1f} samples/s (after the first 2 steps)" if rate else "",
           args.summary)
    return summary


if __name__ == "__main__":
    main()
