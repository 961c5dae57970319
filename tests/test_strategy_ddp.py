"""The DDP strategy on two CPU processes (gloo): it trains, gives plain DDP's weights, and every rank
runs the same plan; the rank agreement and the host-RAM share on their own."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import StrategyRegistry

import deltaswap.strategy
from deltaswap.swap import ActivationManager, HostCost, HostRamShare, RankAgreement, SwapConfig
from deltaswap.swap.planner import BlockCost, Workload
from deltaswap.swap.profile import Bandwidth, OpRecord
from deltaswap.swap.ranks import _flatten, _unflatten

from gpt import GPT, random_batch
from helpers import MB
from lightning_helpers import CFG

SCRIPT = Path(__file__).parent / "parallel_fit.py"


def run_parallel(strategy: str, out: Path, *options: str) -> dict[str, torch.Tensor]:
    """Run ``parallel_fit.py`` (two ranks unless ``--devices`` says otherwise); rank 0's trained weights."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    result = subprocess.run([sys.executable, str(SCRIPT), strategy, str(out), *options], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt")


def test_deltaswap_ddp_trains_on_two_cpu_processes_like_plain_ddp(tmp_path: Path) -> None:
    plain = run_parallel("ddp", tmp_path / "plain")
    # a budget that makes auto recompute
    ours = run_parallel("deltaswap_ddp", tmp_path / "ours", "--budget", "64KiB")
    assert plain.keys() == ours.keys()
    for name in plain:
        assert torch.equal(plain[name], ours[name]), name
    plans = [(tmp_path / "ours" / f"plan_rank{r}.txt").read_text() for r in (0, 1)]
    assert plans[0] == plans[1], "every rank runs the same plan"
    assert "checkpoint" in plans[0], "the budget made the plan recompute"


def test_deltaswap_ddp_is_registered_and_splits_its_options() -> None:
    assert "deltaswap_ddp" in StrategyRegistry
    strategy = deltaswap.strategy.SwapDDPStrategy(memory_budget="8GiB", min_bytes=0,
                                                   find_unused_parameters=True)
    assert strategy.swap_config == SwapConfig(memory_budget="8GiB", min_bytes=0)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}
    with pytest.raises(ValueError, match="memory_budget"):
        deltaswap.strategy.SwapDDPStrategy(memory_budget="eight gigs")
    with pytest.raises(TypeError, match=r"unknown option.*min_byte"):
        deltaswap.strategy.SwapDDPStrategy(min_byte=0)


def test_host_ram_share_divides_the_available_ram_between_the_ranks_of_a_host() -> None:
    assert HostRamShare(4, available=lambda: 64 << 30)() == 16 << 30
    with pytest.raises(ValueError, match="ranks=0"):
        HostRamShare(0)


def work(ms: float, out_mb: int, gbps: float, first_op: str = "aten.mm.default",
         host_ms: float = 0.01) -> Workload:
    ops = (OpRecord(0, first_op, out_mb * MB, ms, True), OpRecord(1, "aten.gelu.default", MB, 0.1, True))
    block = BlockCost(ops, input_bytes=4 * MB, saved_bytes=(out_mb + 1) * MB)
    return Workload(blocks=(block, block), other_bytes=MB, other_ms=1.0,
                    bandwidth=Bandwidth(gbps, gbps, 2 * gbps),
                    host=HostCost(launch_ms=0.01, record_ms=host_ms, replay_ms=0.02))


def _agree(rank: int, works: list[Workload], init: str, out: str) -> None:
    """One rank of a two-process gloo group: agree on its workload, save the result (or the error)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(works))
    try:
        agreement = RankAgreement()
        result: object = (agreement.workload(works[rank]), agreement.budget(1000 + rank),
                          agreement.all(rank == 0), agreement.all(True))
    except RuntimeError as err:
        result = str(err)
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{out}/rank{rank}.pt")


def agree(works: list[Workload], tmp_path: Path) -> list[object]:
    mp.spawn(_agree, args=(works, f"file://{tmp_path}/init", str(tmp_path)), nprocs=len(works))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(len(works))]


def test_ranks_agree_on_the_slowest_ops_largest_tensors_slowest_link_and_host(tmp_path: Path) -> None:
    ranks = agree([work(1.0, 8, 50.0, host_ms=0.03), work(2.0, 4, 20.0)], tmp_path)
    (a, budget_a, some, every), (b, budget_b, _, _) = ranks
    assert a == b
    assert [op.ms for op in a.blocks[0].ops] == [2.0, 0.1]
    assert a.blocks[0].ops[0].out_bytes == 8 * MB
    assert a.blocks[0].saved_bytes == 9 * MB
    assert a.bandwidth == Bandwidth(20.0, 20.0, 40.0)
    assert a.host == HostCost(launch_ms=0.01, record_ms=0.03, replay_ms=0.02), "the slowest host"
    assert budget_a == budget_b == 1000, "the smallest budget"
    assert (some, every) == (False, True)


def test_ranks_that_profiled_different_ops_are_refused(tmp_path: Path) -> None:
    results = agree([work(1.0, 8, 50.0), work(1.0, 8, 50.0, first_op="aten.bmm.default")], tmp_path)
    assert all(isinstance(r, str) and "same shape" in r for r in results), results


def test_flatten_and_unflatten_round_trip_every_field() -> None:
    ops = (OpRecord(0, "aten.mm.default", 3 * MB, 1.5, True), OpRecord(1, "aten.view.default", 0, 0.0, False))
    w = Workload(blocks=(BlockCost(ops, 5 * MB, 7 * MB, 11 * MB, 0, 0, ((0, 5 * MB),)),
                         BlockCost(ops, 13 * MB, 17 * MB, 19 * MB, 59 * MB, 61 * MB, ((1, 13 * MB),))),
                 other_bytes=23 * MB, other_ms=4.5, bandwidth=Bandwidth(29.0, 31.0, 37.0, 0.041),
                 lookahead=41 * MB, backward_ratio=2.3, peak_offset=-43 * MB, other_grad_bytes=47 * MB,
                 head_transient=53 * MB, other_backward_ms=5.9,
                 host=HostCost(0.011, 0.043, 0.029))
    assert _unflatten(w, _flatten(w)) == w
    unmeasured = dataclasses.replace(w, other_backward_ms=None)
    assert _unflatten(unmeasured, _flatten(unmeasured)) == unmeasured


def _shapes(rank: int, init: str, out: str) -> None:
    """One rank of two: train a small GPT under a manager with ranks; rank 1 halves its batch at step 2."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT(CFG)
    mgr = ActivationManager(SwapConfig(memory_budget="64KiB"), ranks=RankAgreement())
    mgr.wrap(model)
    outcome = "trained"
    try:
        for i in range(4):
            batch = 8 if rank == 0 or i == 0 else 4
            with mgr.step():
                loss = model(*random_batch(CFG, batch, "cpu", torch.Generator().manual_seed(i)))
            loss.backward()
    except RuntimeError as err:
        outcome = f"step {i}: {err}"
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(outcome)


def test_ranks_that_run_different_shapes_stop_with_an_error_instead_of_hanging(tmp_path: Path) -> None:
    context = mp.spawn(_shapes, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=False)
    for _ in range(60):
        if context.join(timeout=2):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the ranks hung")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert all(o.startswith("step 2: ") and "different shapes" in o for o in outcomes), outcomes


def _same_step(rank: int, keys: list[list[tuple[object, ...]]], init: str, out: str) -> None:
    """One rank of two: check each of its step keys against the other rank's; record what happened."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    outcomes = []
    try:
        agreement = RankAgreement()
        for key in keys[rank]:
            try:
                agreement.same_step(key, planning=False)  # does not wait ...
                agreement.settle()                        # ... until here
                outcomes.append("same")
            except RuntimeError:
                outcomes.append("refused")
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(" ".join(outcomes))


def test_the_step_check_ignores_which_device_each_rank_runs_on(tmp_path: Path) -> None:
    """Each rank of a GPU run has its own ``cuda:R``: the same shapes on other devices are the same step."""
    def key(rows: int, device: str) -> tuple[object, ...]:
        return ((rows, 32), torch.int64, torch.device(device)), type(None)

    keys = [[key(8, "cuda:0"), key(8, "cuda:0")], [key(8, "cuda:1"), key(4, "cuda:1")]]
    mp.spawn(_same_step, args=(keys, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "same refused", rank
