"""The Lightning callbacks on a GPU: MemoryTimeline records a planned step (skipping the profiling step)
and plots it; SwapMonitor measures the activation peak and the copy rates while swapping. Run on the
device machine."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from test_callbacks import PNG_MAGIC, logged_rows

from deltaswap.callbacks import MemoryTimeline, SwapMonitor
from deltaswap.strategy import SwapStrategy

from gpt import GPTConfig
from lightning_helpers import LitGPT, loader

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

# the sizes of helpers.small_cuda_gpt: every saved activation is at least 256 KiB (fp32, batch 8)
CUDA_CFG = GPTConfig(vocab_size=1000, seq_len=256, n_layer=4, n_head=4, d_model=256)


def fit_cuda(strategy: SwapStrategy, root: Path, callbacks: list[Callback], max_steps: int = 4) -> L.Trainer:
    """Train the small GPT on the GPU for ``max_steps`` (one batch each), logging every step to CSV."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=strategy, max_steps=max_steps, callbacks=callbacks,
        logger=CSVLogger(root), log_every_n_steps=1, default_root_dir=root, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(LitGPT(CUDA_CFG), loader(CUDA_CFG, batches=max_steps, batch_size=8))
    return trainer


def test_memory_timeline_records_a_planned_step_against_the_prediction(tmp_path: Path) -> None:
    timeline = MemoryTimeline(step=2, dirpath=tmp_path / "plots")
    fit_cuda(SwapStrategy(policy="recompute"), tmp_path, [timeline])
    assert timeline.recorded_step == 2
    assert timeline.path == tmp_path / "plots" / "memory_timeline.png"
    assert timeline.path.read_bytes().startswith(PNG_MAGIC)
    n = CUDA_CFG.n_layer
    # each block's end in the forward pass, then each block's start in the backward pass
    assert len(timeline.measured) == 2 * n
    times = [ms for ms, _ in timeline.measured]
    assert times[0] > 0 and times == sorted(times)
    forward = [nbytes for _, nbytes in timeline.measured[:n]]
    assert forward[0] > 0
    assert all(b > a for a, b in pairwise(forward)), f"each block keeps its input: {forward}"
    assert timeline.predicted, "the plan's timeline"
    predicted_peak = max(nbytes for _, nbytes in timeline.predicted)
    assert timeline.measured_peak is not None
    assert max(nbytes for _, nbytes in timeline.measured) <= timeline.measured_peak
    # The plan may over-predict a model this small (one-time workspace allocations of the profiling step
    # land in its calibration), but the measured peak must not pass the prediction.
    assert 0 < timeline.measured_peak <= 1.1 * predicted_peak, (timeline.measured_peak, predicted_peak)


def test_memory_timeline_skips_the_profiling_step_and_writes_to_the_log_dir(tmp_path: Path) -> None:
    timeline = MemoryTimeline(step=0)  # step 0 profiles: no plan to compare with
    trainer = fit_cuda(SwapStrategy(policy="recompute"), tmp_path, [timeline], max_steps=2)
    assert timeline.recorded_step == 1
    assert trainer.log_dir is not None
    assert timeline.path == Path(trainer.log_dir) / "memory_timeline.png" and timeline.path.is_file()
    assert timeline.measured


def test_monitor_measures_the_peak_and_the_copies_when_swapping(tmp_path: Path) -> None:
    trainer = fit_cuda(SwapStrategy(policy="swap"), tmp_path, [SwapMonitor()])
    rows = logged_rows(trainer)
    assert sorted(rows) == [0, 1, 2, 3]
    assert "deltaswap/peak_activation_gib" not in rows[0], "the profiling step resets the peak itself"
    assert "deltaswap/predicted_peak_gib" not in rows[0]
    for step in (1, 2, 3):
        row = rows[step]
        assert row["deltaswap/peak_activation_gib"] > 0
        assert row["deltaswap/offloaded_gib"] > 0
        assert row["deltaswap/d2h_gbps"] > 0 and row["deltaswap/h2d_gbps"] > 0
        assert row["deltaswap/step_ms"] > 0 and row["deltaswap/predicted_step_ms"] > 0
        ratio = row["deltaswap/peak_activation_gib"] / row["deltaswap/predicted_peak_gib"]
        assert 0.25 < ratio < 4, ratio
