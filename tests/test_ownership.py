"""Who owns the engine's memory on CPU: an offloader, a manager or a model dropped without ``close()`` is
freed at once, by reference counting alone (the garbage collector switched off), together with its pinned
pool; a context created anew every step leaves one pool alive, not one per step; a model whose manager is
gone trains plainly."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationManager, ActivationOffloader, OffloadConfig, SwapConfig, SyncCopyBackend
from deltaswap.swap.pool import PinnedPool

from gpt import GPT, GPTConfig, random_batch
from helpers import assert_bitwise_equal

CFG = GPTConfig(vocab_size=61, seq_len=16, n_layer=3, n_head=2, d_model=32)
# a CPU run: deltaswap warns that it will not swap (its one warning here)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def no_garbage_collector() -> Iterator[None]:
    """What is freed here is freed by reference counting: a reference cycle would keep it alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def swapped_step(off: ActivationOffloader, lin: nn.Module) -> None:
    x = torch.randn(8, 32, requires_grad=True)
    with off:
        loss = lin(x).relu().sum()
    loss.backward()
    assert off.stats.tensors_offloaded > 0


def test_a_dropped_offloader_and_its_pool_are_freed_at_once() -> None:
    lin = nn.Linear(32, 32)
    off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=SyncCopyBackend())
    swapped_step(off, lin)
    refs = [weakref.ref(off), weakref.ref(off._pool)]  # never closed
    del off
    assert [r() for r in refs] == [None, None]


def test_a_context_per_step_leaves_one_pool_alive() -> None:
    lin = nn.Linear(32, 32)
    pools: list[weakref.ref[PinnedPool]] = []
    for _ in range(20):  # torch's save_on_cpu idiom: the context written inside the loop
        off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=SyncCopyBackend())
        swapped_step(off, lin)
        pools.append(weakref.ref(off._pool))
    assert sum(r() is not None for r in pools) == 1  # the last step's, still named by ``off``


def one_step(model: GPT, mgr: ActivationManager | None, i: int) -> list[torch.Tensor]:
    """Step ``i`` (batch ``i``) from the model's current weights: its gradients."""
    model.zero_grad(set_to_none=True)
    x, y = random_batch(CFG, 2, "cpu", torch.Generator().manual_seed(i))
    with mgr.step() if mgr is not None else contextlib.nullcontext():
        loss = model(x, y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def train(model: GPT, mgr: ActivationManager | None, steps: int = 3) -> list[list[torch.Tensor]]:
    return [one_step(model, mgr, i) for i in range(steps)]


def manager(policy: str) -> ActivationManager:
    return ActivationManager(SwapConfig(policy=policy, min_bytes=0, bandwidth_gbps=50.0),
                             backend=SyncCopyBackend())


@pytest.mark.parametrize("policy", ["swap", "recompute", "keep", "auto"])
def test_a_dropped_manager_and_its_model_are_freed_at_once(policy: str) -> None:
    model = GPT(CFG)
    mgr = manager(policy)
    mgr.wrap(model)
    train(model, mgr)
    refs = [weakref.ref(model), weakref.ref(mgr), weakref.ref(mgr._offloader)]
    if policy == "swap":
        assert mgr._offloader._pool is not None
        refs.append(weakref.ref(mgr._offloader._pool))
    del model, mgr  # never closed
    assert [r() for r in refs] == [None] * len(refs)


@pytest.mark.parametrize("policy", ["swap", "recompute", "delta", "auto"])
def test_a_manager_is_freed_while_its_last_loss_is_held(policy: str) -> None:
    """The loss a loop keeps until its next step holds the autograd graph, and the hooks the manager
    put in it reach the manager weakly: closed and dropped, the manager goes, and a new manager wraps
    the model at once (found by the GPU soak: two managers replaced while the last loss was alive)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    plain = train(model, None)
    mgr = manager(policy)
    mgr.wrap(model)
    train(model, mgr)
    x, y = random_batch(CFG, 2, "cpu", torch.Generator().manual_seed(0))
    with mgr.step():
        loss = model(x, y)
    loss.backward()
    mgr.close()
    ref = weakref.ref(mgr)
    del mgr  # ``loss`` and its graph are still alive
    assert ref() is None
    second = manager(policy)
    second.wrap(model)
    for expected, actual in zip(plain, train(model, second), strict=True):
        assert_bitwise_equal(expected, actual)
    assert loss.grad_fn is not None


def test_a_model_whose_manager_is_gone_trains_plainly() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    plain = train(model, None)
    mgr = manager("swap")
    mgr.wrap(model)
    train(model, mgr)
    ref = weakref.ref(mgr)
    del mgr  # the model keeps its wrappers, not the manager
    assert ref() is None
    for expected, actual in zip(plain, train(model, None), strict=True):
        assert_bitwise_equal(expected, actual)


def test_the_context_per_step_script_runs_exactly_on_a_cpu(tmp_path: Path) -> None:
    import context_per_step

    out = tmp_path / "c.json"
    gc.enable()  # the script's own run: not a reference-counting check
    assert context_per_step.main(["--preset", "tiny", "--batch-size", "2", "--steps", "3", "--device", "cpu",
                                  "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["exact"] and data["flat"] and len(data["rows"]) == 3


def test_a_context_per_step_for_200_steps_holds_one_steps_pool() -> None:
    lin = nn.Linear(32, 32)
    pools: list[weakref.ref[PinnedPool]] = []
    held: list[int] = []
    for _ in range(200):
        off = ActivationOffloader(OffloadConfig(min_bytes=0), backend=SyncCopyBackend())
        swapped_step(off, lin)
        pools.append(weakref.ref(off._pool))
        held.append(sum(p.capacity for p in (r() for r in pools) if p is not None))
    assert set(held) == {held[0]}  # the host bytes of the live pools: one step's, flat
    assert sum(r() is not None for r in pools) == 1


def test_two_managers_in_one_process_train_exactly_and_go_when_dropped() -> None:
    torch.manual_seed(1)
    models = [GPT(CFG), GPT(CFG)]
    plain = [train(m, None) for m in models]
    managers = [manager("swap"), manager("recompute")]
    for model, mgr in zip(models, managers, strict=True):
        mgr.wrap(model)
    ours: list[list[list[torch.Tensor]]] = [[], []]
    for i in range(3):  # their steps interleaved: step i of one model, then of the other
        for k in (0, 1):
            ours[k].append(one_step(models[k], managers[k], i))
    for k in (0, 1):
        for expected, actual in zip(plain[k], ours[k], strict=True):
            assert_bitwise_equal(expected, actual)
    refs = [weakref.ref(x) for x in (*models, *managers)]
    del models, managers, model, mgr
    assert [r() for r in refs] == [None] * 4


def test_a_model_prepared_by_the_accelerate_plugin_and_dropped_is_freed_at_once() -> None:
    from deltaswap.strategy import DeltaSwapPlugin

    plugin = DeltaSwapPlugin(policy="recompute", min_bytes=0)
    model = plugin.prepare(GPT(CFG))
    for i in range(2):
        x, y = random_batch(CFG, 2, "cpu", torch.Generator().manual_seed(i))
        model(x, y).backward()
    refs = [weakref.ref(model), weakref.ref(plugin), weakref.ref(plugin._manager)]
    del model, plugin  # never closed
    assert [r() for r in refs] == [None] * 3


def test_a_new_manager_wraps_a_model_whose_manager_is_gone() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    plain = train(model, None)
    first = manager("recompute")
    first.wrap(model)
    del first  # never unwrapped: its wrappers stay in the model
    second = manager("recompute")
    second.wrap(model)  # takes them out and wraps again
    live = manager("keep")
    with pytest.raises(ValueError, match="already wrapped"):
        live.wrap(model)  # a live manager's wrappers are refused, as before
    ours = train(model, second)
    assert len(second.blocks) == CFG.n_layer
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)
