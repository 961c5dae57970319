"""``deltaswap_ddp`` and ``deltaswap_fsdp`` on GPUs (NCCL): weights after training equal plain DDP's
(plain FSDP's) bit for bit, with bytes actually swapped, and every rank runs the same plan. Run on the
device machine; the two-GPU cases need two CUDA devices (FSDP on one GPU runs unsharded, as FSDP does
at a world size of one)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_strategy_ddp import run_parallel

pytestmark = [pytest.mark.gpu]

Weights = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int, str], Weights]:
    """The plain strategy's weights after training on ``devices`` GPUs in ``precision``, trained once."""
    weights: dict[tuple[str, int, str], Weights] = {}

    def trained(strategy: str, devices: int, precision: str) -> Weights:
        key = (strategy, devices, precision)
        if key not in weights:
            out = tmp_path_factory.mktemp("plain") / f"{strategy}-{devices}-{precision}"
            weights[key] = run_parallel(strategy, out, "--cuda", "--devices", str(devices),
                                        "--precision", precision)
        return weights[key]

    return trained


@pytest.mark.parametrize(("strategy", "devices"), [
    pytest.param("ddp", 2, id="ddp-2gpus"),
    pytest.param("fsdp", 1, id="fsdp-1gpu"),
    pytest.param("fsdp", 2, id="fsdp-2gpus"),
])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize(("policy", "budget"), [("swap", "auto"), ("auto", "1")])
def test_deltaswap_on_gpus_gives_the_plain_strategys_weights(
    tmp_path: Path, plain: Callable[[str, int, str], Weights], strategy: str, devices: int, precision: str,
    policy: str, budget: str,
) -> None:
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA devices")
    expected = plain(strategy, devices, precision)
    ours = run_parallel(f"deltaswap_{strategy}", tmp_path / "ours", "--cuda", "--devices", str(devices),
                        "--precision", precision, "--policy", policy, "--budget", budget)
    assert expected.keys() == ours.keys() and len(expected) > 0
    for name in expected:
        assert torch.equal(expected[name], ours[name]), name
    plans = [(tmp_path / "ours" / f"plan_rank{r}.txt").read_text() for r in range(devices)]
    assert all(p == plans[0] for p in plans), "every rank runs the same plan"
    if policy == "auto":  # under 1 byte: the smallest plan, which recomputes (swapping is its choice)
        assert "checkpoint" in plans[0], plans[0]
        return
    for rank in range(devices):
        offloaded, prefetched = map(int, (tmp_path / "ours" / f"swapped_rank{rank}.txt").read_text().split())
        assert offloaded > 0 and prefetched > 0, f"rank {rank} swapped nothing"
