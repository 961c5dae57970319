"""DeltaSwapPlugin on a GPU: Accelerate's loop trains weight for weight like the loop without it, in
bf16 and in fp16 with Accelerate's GradScaler, with swapping. Run on the device machine."""

from __future__ import annotations

import pytest

from deltaswap.strategy import DeltaSwapPlugin

from accelerate_helpers import train
from helpers import assert_bitwise_equal

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda", "fresh_accelerate_state")]


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16", "no"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_weights_equal_the_loop_without_it_on_gpu(mixed_precision: str, accumulation: int) -> None:
    plain, _ = train(None, mixed_precision=mixed_precision, accumulation=accumulation, cpu=False)
    plugin = DeltaSwapPlugin(policy="swap", min_bytes=0)
    ours, model = train(plugin, mixed_precision=mixed_precision, accumulation=accumulation, cpu=False)
    assert next(model.parameters()).is_cuda
    assert_bitwise_equal([p.cpu() for p in plain], [p.cpu() for p in ours])
    stats = plugin.stats
    assert stats is not None and stats.engine.bytes_offloaded > 0 and stats.engine.bytes_prefetched > 0
