"""SwapStrategy on a GPU: weights after training equal Lightning's plain single-device strategy, bit for
bit, in bf16 and in fp16 with its GradScaler, with swapping and a tight budget. Run on the device machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaswap.strategy import SwapStrategy

from helpers import assert_bitwise_equal
from lightning_helpers import fit, params

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:deltaswap. the smallest plan:RuntimeWarning")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("policy", ["swap", "auto"])
def test_weights_after_training_equal_the_plain_strategy_on_gpu(tmp_path: Path, precision: str,
                                                                policy: str) -> None:
    gpu = dict(accelerator="gpu", precision=precision, max_steps=4)
    _, plain = fit("auto", tmp_path, **gpu)  # type: ignore[arg-type]
    budget = 1 if policy == "auto" else "auto"  # under 1 byte: the smallest plan (recompute, swap inputs)
    trainer, ours = fit(SwapStrategy(memory_budget=budget, policy=policy, min_bytes=0), tmp_path,
                        **gpu)  # type: ignore[arg-type]
    assert_bitwise_equal([p.cpu() for p in params(plain)], [p.cpu() for p in params(ours)])
    stats = trainer.strategy.stats
    assert stats is not None and not stats.profiling
    if policy == "swap":
        assert stats.engine.bytes_offloaded > 0 and stats.engine.bytes_prefetched > 0
    assert stats.measured_ms > 0
