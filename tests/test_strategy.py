"""SwapStrategy on CPU: trains like Lightning's single-device strategy, weight for weight, with the
plan's recompute; by object and by registered name; with mixed precision, accumulation, clipping,
manual optimization, checkpoints and a second fit; clear errors and a single CPU warning."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from deltaswap.strategy import SwapStrategy
from deltaswap.swap.planner import BlockMode

from gpt import Block
from helpers import assert_bitwise_equal
from lightning_helpers import CFG, LitGPT, fit, loader, params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's CPU/num_workers hints


def quiet(strategy: object, root: Path, **kwargs: object) -> tuple[L.Trainer, LitGPT]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="deltaswap: the model runs on the CPU")
        return fit(strategy, root, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["recompute", "keep", "auto"])
def test_weights_after_training_equal_the_plain_strategy(tmp_path: Path, policy: str) -> None:
    _, plain = fit("auto", tmp_path)
    budget = 1 if policy == "auto" else "auto"  # on a CPU, auto fits a given budget by recomputing
    trainer, ours = quiet(SwapStrategy(memory_budget=budget, policy=policy), tmp_path)
    assert_bitwise_equal(params(plain), params(ours))
    plan = trainer.strategy.plan  # type: ignore[attr-defined]
    assert plan is not None and len(plan.blocks) == 4
    if policy != "keep":
        assert {b.mode for b in plan.blocks} == {BlockMode.CHECKPOINT}
    assert all(isinstance(b, Block) for b in ours.model.blocks), "the blocks are unwrapped after fit"


def test_the_registered_name_gives_the_strategy(tmp_path: Path) -> None:
    assert "deltaswap" in StrategyRegistry
    _, plain = fit("auto", tmp_path)
    trainer, ours = quiet("deltaswap", tmp_path)
    assert isinstance(trainer.strategy, SwapStrategy)
    assert_bitwise_equal(params(plain), params(ours))


@pytest.mark.parametrize(
    "options",
    [dict(precision="bf16-mixed"), dict(accumulate_grad_batches=2), dict(gradient_clip_val=0.05)],
    ids=["bf16-mixed", "accumulate", "clip"],
)
def test_precision_accumulation_and_clipping_train_like_plain(tmp_path: Path, options: dict) -> None:
    _, plain = fit("auto", tmp_path, **options)
    trainer, ours = quiet(SwapStrategy(policy="recompute"), tmp_path, **options)
    assert_bitwise_equal(params(plain), params(ours))
    assert trainer.strategy.plan is not None  # type: ignore[attr-defined]


def test_manual_optimization_trains_like_plain(tmp_path: Path) -> None:
    _, plain = fit("auto", tmp_path, manual=True)
    trainer, ours = quiet(SwapStrategy(policy="recompute"), tmp_path, manual=True)
    assert_bitwise_equal(params(plain), params(ours))
    stats = trainer.strategy.stats  # type: ignore[attr-defined]
    assert stats is not None and not stats.profiling and stats.recompute_ops > 0


def test_validation_runs_plainly_between_planned_training_steps(tmp_path: Path) -> None:
    _, plain = fit("auto", tmp_path, validate=True, val_check_interval=2)
    trainer, ours = quiet(SwapStrategy(policy="recompute"), tmp_path, validate=True, val_check_interval=2)
    assert_bitwise_equal(params(plain), params(ours))
    expected = float(plain.trainer.callback_metrics["val_loss"])
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(expected)


def test_checkpoints_keep_the_plain_keys_and_resume(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet(SwapStrategy(policy="recompute"), tmp_path, max_steps=2, enable_checkpointing=True,
          callbacks=[checkpoint])
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert list(state) == list(LitGPT().state_dict()), "no wrapper prefixes in the checkpoint"
    trainer, loaded = quiet(SwapStrategy(policy="recompute"), tmp_path, max_steps=2,
                            ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 2
    assert_bitwise_equal(list(state.values()), list(loaded.state_dict().values()))
    trainer, resumed = quiet(SwapStrategy(policy="recompute"), tmp_path, max_steps=4,
                             ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 4
    assert not torch.equal(resumed.model.lm_head.weight, state["model.lm_head.weight"]), "it trained on"


def test_one_trainer_fits_twice_and_then_another_model(tmp_path: Path) -> None:
    trainer, module = quiet(SwapStrategy(policy="recompute"), tmp_path, max_steps=-1, max_epochs=1)
    strategy = trainer.strategy
    assert isinstance(strategy, SwapStrategy) and strategy.plan is not None and trainer.global_step == 4
    for epochs, model in ((2, module), (3, LitGPT(dataclasses.replace(CFG, n_layer=6)))):
        trainer.fit_loop.max_epochs = epochs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="deltaswap: the model runs on the CPU")
            trainer.fit(model, loader())
        assert trainer.global_step == 4 * epochs, "each fit trains on"
        assert all(isinstance(b, Block) for b in model.model.blocks), "unwrapped after each fit"
        assert strategy.plan is not None and len(strategy.plan.blocks) == model.model.cfg.n_layer
        assert strategy.stats is not None and not strategy.stats.profiling


def test_fast_dev_run(tmp_path: Path) -> None:
    trainer, _ = quiet(SwapStrategy(policy="recompute"), tmp_path, max_steps=-1, fast_dev_run=True)
    assert trainer.global_step == 1


def test_on_a_cpu_it_warns_once_and_trains(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(SwapStrategy(), tmp_path, max_steps=4)
    ours = [w for w in caught if "deltaswap" in str(w.message)]
    assert len(ours) == 1 and "runs on the CPU" in str(ours[0].message)
    assert trainer.global_step == 4
    assert trainer.strategy.stats.engine.bytes_offloaded == 0  # type: ignore[attr-defined]


def test_bad_options_fail_at_construction_with_what_to_write() -> None:
    with pytest.raises(TypeError, match="block_types"):
        SwapStrategy(budget="12GiB")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="8GiB"):
        SwapStrategy(memory_budget="12 gigs")
    with pytest.raises(ValueError, match="policy"):
        SwapStrategy(policy="fastest")


def test_several_devices_are_refused_with_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="devices=1"):
        fit(SwapStrategy(), tmp_path, devices=2)


def test_a_model_without_repeated_blocks_is_refused_with_how_to_name_them(tmp_path: Path) -> None:
    class Flat(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(strategy=SwapStrategy(), accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="block_types"):
        trainer.fit(Flat(), data)
