"""deltaswap under FSDP on two CPU processes (gloo, parameters fully sharded): the Lightning strategy
trains and gives plain FSDP's weights with one plan on every rank; the manager plans the blocks inside
FSDP's units and swaps their activations, never the parameters FSDP gathers, with FSDP's gradients."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import StrategyRegistry
from test_strategy_ddp import run_parallel
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import deltaswap.strategy
from deltaswap.swap import ActivationManager, RankAgreement, SwapConfig, SyncCopyBackend

from gpt import GPT, Block, random_batch
from lightning_helpers import CFG


def test_deltaswap_fsdp_trains_on_two_cpu_processes_like_plain_fsdp(tmp_path: Path) -> None:
    plain = run_parallel("fsdp", tmp_path / "plain")
    ours = run_parallel("deltaswap_fsdp", tmp_path / "ours", "--budget", "64KiB")  # auto recomputes
    assert plain.keys() == ours.keys() and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], ours[name]), name
    plans = [(tmp_path / "ours" / f"plan_rank{r}.txt").read_text() for r in (0, 1)]
    assert plans[0] == plans[1], "every rank runs the same plan"
    assert "checkpoint" in plans[0], "the budget made the plan recompute"
    for run in ("plain", "ours"):  # the CPU wrapping leaves the strategy's options for the next fit
        assert all((tmp_path / run / f"policy_rank{r}.txt").read_text() == "True" for r in (0, 1)), run


def test_deltaswap_fsdp_is_registered_and_splits_its_options() -> None:
    assert "deltaswap_fsdp" in StrategyRegistry
    strategy = deltaswap.strategy.SwapFSDPStrategy(memory_budget="8GiB", min_bytes=0,
                                                    auto_wrap_policy={Block}, limit_all_gathers=True)
    assert strategy.swap_config == SwapConfig(memory_budget="8GiB", min_bytes=0)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert strategy.kwargs["limit_all_gathers"] is True  # a FullyShardedDataParallel keyword
    with pytest.raises(ValueError, match="memory_budget"):
        deltaswap.strategy.SwapFSDPStrategy(memory_budget="eight gigs")
    with pytest.raises(TypeError, match=r"unknown option.*min_byte"):
        deltaswap.strategy.SwapFSDPStrategy(min_byte=0)


@pytest.mark.parametrize("name", ["activation_checkpointing_policy", "activation_checkpointing"])
def test_deltaswap_fsdp_refuses_fsdp_activation_checkpointing(name: str) -> None:
    with pytest.raises(ValueError, match=rf"plans which activations to recompute itself: remove {name}="):
        deltaswap.strategy.SwapFSDPStrategy(**{name: {Block}})


def _train(model: torch.nn.Module, mgr: ActivationManager | None) -> None:
    """Three SGD steps on fixed batches, under ``mgr``'s plan if given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = random_batch(CFG, 4, "cpu", gen)
        with mgr.step() if mgr is not None else contextlib.nullcontext():
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _full_weights(model: FullyShardedDataParallel) -> list[torch.Tensor]:
    """The unsharded weights (every rank calls)."""
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        return [p.detach().clone() for p in model.parameters()]


def _sharded(use_orig_params: bool) -> FullyShardedDataParallel:
    torch.manual_seed(0)
    return FullyShardedDataParallel(
        GPT(CFG), auto_wrap_policy=ModuleWrapPolicy({Block}), sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=use_orig_params, device_id=torch.device("cpu"),
    )


def _swap_inside_fsdp(rank: int, policy: str, use_orig_params: bool, init: str, out: str) -> None:
    """One rank of two: plain FSDP, then FSDP with a manager that swaps (a synchronous CPU backend) or
    recomputes; the weights, the blocks planned and the bytes swapped go to ``out``."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        plain = _sharded(use_orig_params)
        _train(plain, None)
        model = _sharded(use_orig_params)
        mgr = ActivationManager(SwapConfig(policy=policy, min_bytes=0), backend=SyncCopyBackend(),
                                ranks=RankAgreement())
        mgr.wrap(model)
        _train(model, mgr)
        torch.manual_seed(0)
        unsharded = ActivationManager(SwapConfig(policy=policy, min_bytes=0), backend=SyncCopyBackend())
        _train(unsharded.wrap(GPT(CFG)), unsharded)
        assert mgr.plan is not None
        result = (_full_weights(plain), _full_weights(model), mgr.block_names,
                  mgr.stats.engine.bytes_offloaded, unsharded.stats.engine.bytes_offloaded,
                  [b.mode.value for b in mgr.plan.blocks])
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize(
    ("policy", "use_orig_params"), [("swap", True), ("swap", False), ("recompute", True)]
)
def test_blocks_inside_fully_sharded_units_swap_activations_only_with_fsdp_gradients(
    tmp_path: Path, policy: str, use_orig_params: bool
) -> None:
    mp.spawn(_swap_inside_fsdp, args=(policy, use_orig_params, f"file://{tmp_path}/init", str(tmp_path)),
             nprocs=2)
    for rank in (0, 1):
        plain, ours, names, swapped, swapped_unsharded, modes = torch.load(tmp_path / f"rank{rank}.pt")
        assert modes == [{"swap": "swap", "recompute": "checkpoint"}[policy]] * CFG.n_layer
        assert len(plain) == len(ours) > 0
        for expected, actual in zip(plain, ours, strict=True):
            assert torch.equal(expected, actual)
        assert len(names) == CFG.n_layer
        assert all(name.endswith("._fsdp_wrapped_module") for name in names), (
            f"blocks planned inside FSDP's units: {names}")
        if policy == "swap":
            # the same activations as the unsharded model: FSDP's gathered parameters are never swapped
            assert swapped == swapped_unsharded > 0, (swapped, swapped_unsharded)
