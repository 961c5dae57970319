"""``deltaswap_ddp`` on two GPUs (NCCL): weights after training equal plain DDP's bit for bit, with bytes
actually swapped, and every rank runs the same plan. Needs two CUDA devices; run on the device machine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_strategy_ddp import run_ddp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, torch.Tensor]]:
    """Plain DDP's weights after training in ``precision``, trained once per precision."""
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def trained(precision: str) -> dict[str, torch.Tensor]:
        if precision not in weights:
            out = tmp_path_factory.mktemp("plain") / precision
            weights[precision] = run_ddp("ddp", out, "--cuda", "--precision", precision)
        return weights[precision]

    return trained


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize(("policy", "budget"), [("swap", "auto"), ("auto", "1")])
def test_deltaswap_ddp_on_two_gpus_gives_plain_ddps_weights(
    tmp_path: Path, plain_ddp: Callable[[str], dict[str, torch.Tensor]], precision: str, policy: str,
    budget: str,
) -> None:
    gpu = ("--cuda", "--precision", precision)
    plain = plain_ddp(precision)
    ours = run_ddp("deltaswap_ddp", tmp_path / "ours", *gpu, "--policy", policy, "--budget", budget)
    assert plain.keys() == ours.keys()
    for name in plain:
        assert torch.equal(plain[name], ours[name]), name
    plans = [(tmp_path / "ours" / f"plan_rank{r}.txt").read_text() for r in (0, 1)]
    assert plans[0] == plans[1], "every rank runs the same plan"
    if policy == "auto":  # under 1 byte: the smallest plan, which recomputes (swapping is its choice)
        assert "checkpoint" in plans[0], plans[0]
        return
    for rank in (0, 1):
        offloaded, prefetched = map(int, (tmp_path / "ours" / f"swapped_rank{rank}.txt").read_text().split())
        assert offloaded > 0 and prefetched > 0, f"rank {rank} swapped nothing"
