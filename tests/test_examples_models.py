"""The examples that train models users bring: train_hf.py (Hugging Face causal LMs built from configs) and
train_vision.py (torchvision classifiers), each run in-process with its smallest settings on the CPU."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deltaswap.swap.discovery import find_blocks

import train_hf  # both import their model library lazily: the skips below decide
import train_vision

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

# deltaswap says once per run that on a CPU it swaps nothing
pytestmark = pytest.mark.filterwarnings("ignore:.*the model runs on the CPU:RuntimeWarning")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Train on one CPU thread: these models' ops are small, and on a CPU shared with other work two
    threads contending for the cores made the runs tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged_losses(log_dir: Path) -> list[float]:
    """The ``train_loss`` values of a run's metrics.csv, in step order."""
    (path,) = log_dir.rglob("metrics.csv")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return [float(r["train_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def block_names(model: torch.nn.Module) -> list[str]:
    """The qualified names, inside the LightningModule (whose ``model`` it is), of the blocks deltaswap
    finds in ``model``."""
    names = {id(m): name for name, m in model.named_modules()}
    return [f"model.{names[id(block)]}" for block in find_blocks(model)]


# -- train_hf.py -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_hf_deltaswap_plans_every_decoder_layer_and_the_loss_falls(family: str, tmp_path: Path) -> None:
    assert train_hf.hf_config(family, "tiny").use_cache  # HF's default: the training forward builds a cache
    with pytest.warns(UserWarning, match="KV cache"):     # ... which deltaswap turns off, and says so
        summary = train_hf.main(["--model", family, "--max-steps", "20", "--log-every", "5",
                                 "--log-dir", str(tmp_path)])
    expected = block_names(train_hf.build_model(family, "tiny"))
    assert len(expected) == train_hf.SIZES["tiny"].layers
    assert summary["strategy"] == "deltaswap" and summary["steps"] == 20
    assert summary["plan_blocks"] == len(expected) and summary["block_names"] == expected
    assert summary["predicted_peak"] > 0 and summary["samples_per_s"] > 0
    losses = logged_losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert summary["first_loss"] > math.log(512) - 0.5  # starts near chance: ln(vocabulary)
    assert summary["final_loss"] < summary["first_loss"] - 0.5, summary


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_hf_recomputing_every_layer_logs_the_plain_losses(family: str, tmp_path: Path) -> None:
    # every layer runs twice with the cache HF passes it (GPT-2: positionally; Llama: by keyword), and
    # GPT-2's dropout draws the same masks in the recompute
    common = ["--model", family, "--max-steps", "6", "--log-every", "2", "--attn-implementation", "eager"]
    plain = train_hf.main([*common, "--strategy", "plain", "--log-dir", str(tmp_path / "plain")])
    recomputed = train_hf.main([*common, "--policy", "recompute", "--log-dir", str(tmp_path / "recompute")])
    assert plain["plan_blocks"] is None and recomputed["plan_blocks"] == train_hf.SIZES["tiny"].layers
    assert recomputed["policy"] == "recompute"
    plain_losses = logged_losses(tmp_path / "plain")
    assert len(plain_losses) == 3 and all(math.isfinite(x) for x in plain_losses)
    torch.testing.assert_close(logged_losses(tmp_path / "recompute"), plain_losses, rtol=1e-6, atol=0.0)


def test_train_hf_builds_every_family_from_its_config() -> None:
    for family in train_hf.MODELS:
        model = train_hf.build_model(family, "tiny")
        cfg = model.config
        assert cfg.vocab_size == 512 and cfg.use_cache
        assert len(find_blocks(model)) == train_hf.SIZES["tiny"].layers, family
    base = train_hf.hf_config("gpt2", "base")
    assert (base.n_layer, base.n_embd, base.vocab_size, base.n_positions) == (12, 768, 50257, 1024)


# -- train_vision.py ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "blocks", "image_size"), [("resnet50", 16, 32), ("vit_b_16", 12, 32)])
def test_train_vision_deltaswap_plans_every_block(
    name: str, blocks: int, image_size: int, tmp_path: Path
) -> None:
    summary = train_vision.main(["--model", name, "--image-size", str(image_size), "--batch-size", "2",
                                 "--max-steps", "3", "--log-every", "1", "--log-dir", str(tmp_path)])
    expected = block_names(train_vision.build_model(name, 10, image_size))
    assert len(expected) == blocks                        # ResNet-50's bottlenecks, ViT-B's encoder layers
    assert summary["plan_blocks"] == blocks and summary["block_names"] == expected
    assert summary["predicted_peak"] > 0
    losses = logged_losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_train_vision_recompute_logs_the_plain_losses_and_the_loss_falls(tmp_path: Path) -> None:
    common = ["--model", "resnet18", "--image-size", "32", "--max-steps", "15", "--log-every", "3"]
    plain = train_vision.main([*common, "--strategy", "plain", "--log-dir", str(tmp_path / "plain")])
    recomputed = train_vision.main([*common, "--policy", "recompute",
                                    "--log-dir", str(tmp_path / "recompute")])
    assert plain["plan_blocks"] is None and recomputed["plan_blocks"] == 8
    losses = logged_losses(tmp_path / "plain")
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[0] > 1.5 and losses[-1] < 0.5 * losses[0], losses  # from about ln(10)
    # batch norm normalises with the batch's statistics in training: the recompute gives the same values
    torch.testing.assert_close(logged_losses(tmp_path / "recompute"), losses, rtol=1e-6, atol=0.0)


def test_class_images_brighten_the_cell_of_their_class() -> None:
    labels = torch.tensor([0, 5, 9])
    generator = torch.Generator().manual_seed(0)
    images = train_vision.class_images(labels, 32, 10, signal=100.0, generator=generator)
    assert images.shape == (3, 3, 32, 32)
    cell = 32 // 4  # 10 classes: a 4 x 4 grid of 8-pixel cells
    for image, c in zip(images, labels.tolist(), strict=True):
        row, col = divmod(c, 4)
        bright = image > 50
        assert bright[c % 3, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].all()
        assert bright.sum() == cell * cell


def test_the_examples_refuse_shapes_their_models_cannot_take(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_hf.main(["--size", "base", "--seq-len", "2048"])
    with pytest.raises(SystemExit):
        train_vision.main(["--model", "vit_b_16", "--image-size", "40"])
    err = capsys.readouterr().err
    assert "gpt2 --size base has 1024 positions" in err and "a multiple of its patch size, 16" in err
