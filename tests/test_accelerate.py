"""DeltaSwapPlugin beside an Accelerator on CPU: the loop trains weight for weight like the loop without
it (accumulation, bf16 autocast, clipping, prepared before or after Accelerate), evaluation forwards are
untouched, a failed forward leaves it usable, one CPU warning, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltaswap.strategy import DeltaSwapPlugin

from accelerate_helpers import train
from gpt import GPT
from helpers import assert_bitwise_equal
from lightning_helpers import CFG, loader

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def quiet_plugin(**options: object) -> DeltaSwapPlugin:
    warnings.filterwarnings("ignore", message="deltaswap: the model runs on the CPU")
    return DeltaSwapPlugin(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["recompute", "keep"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_weights_equal_the_loop_without_it(policy: str, accumulation: int) -> None:
    plain, _ = train(None, accumulation=accumulation)
    plugin = quiet_plugin(policy=policy)
    ours, _ = train(plugin, accumulation=accumulation)
    assert_bitwise_equal(plain, ours)
    assert plugin.plan is not None and plugin.stats is not None and not plugin.stats.profiling
    assert (plugin.stats.recompute_ops > 0) == (policy == "recompute")


@pytest.mark.parametrize("plugin_first", [False, True], ids=["after-accelerate", "before-accelerate"])
def test_bf16_autocast_and_either_order_of_prepare(plugin_first: bool) -> None:
    plain, _ = train(None, mixed_precision="bf16")
    plugin = quiet_plugin(policy="recompute")
    ours, _ = train(plugin, mixed_precision="bf16", plugin_first=plugin_first)
    assert_bitwise_equal(plain, ours)
    assert plugin.stats is not None and plugin.stats.recompute_ops > 0


def test_evaluation_forwards_are_not_planned() -> None:
    plugin = quiet_plugin(policy="recompute")
    torch.manual_seed(0)
    model = plugin.prepare(GPT(CFG))
    x, y = next(iter(loader()))
    model.eval()
    model(x, y)  # eval mode, gradients on
    model.train()
    with torch.no_grad():
        model(x, y)
    assert plugin.plan is None, "no training forward ran, so nothing was profiled"
    model(x, y).backward()
    assert plugin.plan is not None


def test_a_failed_forward_leaves_the_plugin_usable() -> None:
    plugin = quiet_plugin(policy="recompute")
    torch.manual_seed(0)
    model = plugin.prepare(GPT(CFG))
    x, y = next(iter(loader()))
    with pytest.raises(IndexError):
        model(x + CFG.vocab_size, y)  # token ids out of the embedding's range
    model(x, y).backward()
    model(x, y).backward()
    assert plugin.stats is not None and not plugin.stats.profiling


def test_on_a_cpu_it_warns_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(DeltaSwapPlugin())
    ours = [w for w in caught if "deltaswap" in str(w.message)]
    assert len(ours) == 1 and "runs on the CPU" in str(ours[0].message)


def test_bad_options_and_a_second_model_are_refused() -> None:
    with pytest.raises(ValueError, match="8GiB"):
        DeltaSwapPlugin(memory_budget="lots")
    with pytest.raises(ValueError, match="policy"):
        DeltaSwapPlugin(policy="fastest")
    plugin = quiet_plugin()
    model = GPT(CFG)
    assert plugin.prepare(model) is model and plugin.prepare(model) is model
    with pytest.raises(ValueError, match="one plugin per model"):
        plugin.prepare(GPT(CFG))
    with pytest.raises(ValueError, match="block_types"):
        quiet_plugin().prepare(torch.nn.Linear(4, 4))


class Flaky(torch.nn.Module):
    """Wraps a block; raises ``error`` on the next call when armed."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block
        self.error: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.block(x)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_a_forward_failing_inside_a_block_closes_the_step_and_profiles_again(error: BaseException) -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    model.blocks = torch.nn.ModuleList(Flaky(b) for b in model.blocks)
    flaky = list(model.blocks)
    plugin = quiet_plugin(policy="recompute", block_types=(Flaky,))
    plugin.prepare(model)
    x, y = next(iter(loader()))
    flaky[2].error = error
    with pytest.raises(type(error)):
        model(x, y)  # fails in the profiling step, after two blocks ran
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None, "no hooks left behind"
    model.eval()
    model(x, y).backward()  # an evaluation forward is not under a plan
    assert plugin.plan is None
    model.train()
    for _ in range(2):
        model(x, y).backward()
    assert plugin.plan is not None and len(plugin.plan.blocks) == CFG.n_layer, "profiled again, whole"
    assert plugin.stats is not None and not plugin.stats.profiling
