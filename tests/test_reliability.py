"""Reliability on CPU: composition with the user's own checkpointing and with retain_graph, two models
and two optimizers in one step, torch.compile refused with what to do, KeyboardInterrupt mid-step leaves
nothing behind, and a soak of variable sequence lengths with flat pinned memory and a bounded plan cache."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.checkpoint import checkpoint

from deltaswap.swap import ActivationManager, SwapConfig, SyncCopyBackend
from deltaswap.swap.manager import PLAN_CACHE_SIZE

from gpt import GPT, GPTConfig, random_batch
from helpers import assert_bitwise_equal

CFG = GPTConfig(vocab_size=97, seq_len=32, n_layer=3, n_head=4, d_model=64, dropout=0.1)


def manager(**options: object) -> ActivationManager:
    options.setdefault("bandwidth_gbps", 50.0)
    return ActivationManager(SwapConfig(min_bytes=0, **options), backend=SyncCopyBackend())  # type: ignore[arg-type]


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


class SelfCheckpointed(nn.Module):
    """A block that checkpoints its own MLP with torch's checkpoint, as user code does."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + checkpoint(self.mlp, self.norm(x), use_reentrant=False)


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "auto"])
def test_a_block_that_checkpoints_itself_trains_exactly(policy: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(SelfCheckpointed() for _ in range(3)))
    x = torch.randn(8, 16, 64)
    plain = []
    for seed in range(3):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        model(x).pow(2).mean().backward()
        plain.append(grads(model))
    mgr = manager(policy=policy, memory_budget=1 if policy == "auto" else "auto")
    mgr.wrap(model)
    for seed in range(3):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with mgr.step():
            loss = model(x).pow(2).mean()
        loss.backward()
        assert_bitwise_equal(plain[seed], grads(model))


def test_retain_graph_and_a_second_backward_under_the_plan() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    x, y = random_batch(CFG, 4, "cpu", torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    loss = model(x, y)
    loss.backward(retain_graph=True)
    loss.backward()
    plain = grads(model)
    mgr = manager(policy="auto", memory_budget=1)
    mgr.wrap(model)
    for seed in (4, 5):  # a profiling step, then a planned one
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with mgr.step():
            loss = model(x, y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_bitwise_equal(plain, grads(model))
    assert mgr.plan is not None and not mgr.stats.profiling


def test_two_models_and_two_optimizers_in_one_step() -> None:
    """GAN-style: a generator and a discriminator, each with its own manager, trained in one step."""

    def make() -> tuple[GPT, GPT]:
        torch.manual_seed(0)
        return GPT(CFG), GPT(CFG)

    x, y = random_batch(CFG, 4, "cpu", torch.Generator().manual_seed(1))

    def train(gen: GPT, disc: GPT, managers: tuple[ActivationManager, ActivationManager] | None) -> list:
        opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (gen, disc))
        for seed in range(3):
            torch.manual_seed(seed)
            pairs = ((disc, opt_d, managers and managers[1]), (gen, opt_g, managers and managers[0]))
            for model, opt, mgr in pairs:
                opt.zero_grad(set_to_none=True)
                if mgr is None:
                    loss = model(x, y)
                else:
                    with mgr.step():
                        loss = model(x, y)
                loss.backward()
                opt.step()
        return [p.detach().clone() for m in (gen, disc) for p in m.parameters()]

    plain = train(*make(), None)
    gen, disc = make()
    managers = (manager(policy="recompute"), manager(policy="swap"))
    managers[0].wrap(gen)
    managers[1].wrap(disc)
    assert_bitwise_equal(plain, train(gen, disc, managers))
    assert managers[1].stats.engine.bytes_offloaded > 0 and managers[0].stats.recompute_ops > 0


def test_a_compiled_model_is_refused_with_what_to_do() -> None:
    compiled = torch.compile(GPT(CFG))
    with pytest.raises(ValueError, match=r"torch\.compile"):
        manager().wrap(compiled)
    model = GPT(CFG)
    model.blocks[1] = torch.compile(model.blocks[1])
    with pytest.raises(ValueError, match="uncompiled model"):
        manager().wrap(model)


def test_blocks_compiled_in_place_are_wrapped_with_one_warning_that_they_run_eagerly_in_profiling() -> None:
    model = GPT(CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # uncompiled blocks: no warning
        manager().wrap(model)
    model = GPT(CFG)
    model.blocks[1].attn.compile()  # a module inside a block, compiled in place
    with pytest.warns(UserWarning, match=r"1 block\(s\) of GPT \(blocks\.1 first\) are compiled in place"):
        mgr = manager()
        mgr.wrap(model)
    assert mgr.block_names == ["blocks.0", "blocks.1", "blocks.2"]


def test_keyboard_interrupt_mid_step_leaves_no_hooks_and_no_pinned_memory() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    x, y = random_batch(CFG, 4, "cpu", torch.Generator().manual_seed(1))
    mgr = manager(policy="swap")
    mgr.wrap(model)
    with mgr.step():  # profiling
        loss = model(x, y)
    loss.backward()
    global_hooks = len(torch_module._global_forward_pre_hooks)

    class Interrupt(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    original = model.ln_f
    model.ln_f = Interrupt()  # after the blocks: their saved tensors are already swapped
    with pytest.raises(KeyboardInterrupt), mgr.step():
        model(x, y)
    model.ln_f = original
    gc.collect()
    assert len(torch_module._global_forward_pre_hooks) == global_hooks
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None, "no saved-tensor hooks left"
    assert mgr.stats.engine.pinned_bytes_in_use == 0, "the interrupted step's copies went back to the pool"
    with mgr.step():  # and training goes on
        loss = model(x, y)
    loss.backward()
    assert mgr.stats.engine.bytes_offloaded > 0


def test_soak_variable_lengths_keeps_pinned_memory_flat_and_the_plan_cache_bounded() -> None:
    """150 steps cycling over 6 sequence lengths, then 30 over 10 (more than the cache holds): the pool
    stops growing after warm-up, nothing stays pinned between steps, no saved tensor outlives its step,
    and the cache keeps its PLAN_CACHE_SIZE most recent plans."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, seq_len=40, n_layer=2, n_head=4, d_model=32)
    model = GPT(cfg)
    mgr = manager(policy="swap")
    mgr.wrap(model)
    lengths = [8 + 5 * (i % 6) for i in range(150)] + [8 + 3 * (i % 10) for i in range(30)]
    reserved, live = [], []
    x, y = random_batch(cfg, 4, "cpu", torch.Generator().manual_seed(1))
    for i, length in enumerate(lengths):
        model.zero_grad(set_to_none=True)
        with mgr.step():
            loss = model(x[:, :length], y[:, :length])
        ref = weakref.ref(loss)
        loss.backward()
        del loss
        stats = mgr.stats.engine
        live.append(stats.pinned_bytes_in_use)
        if i in (30, 90, 149):
            reserved.append(stats.pinned_bytes_reserved)
        assert ref() is None
    assert len(mgr._plans) == PLAN_CACHE_SIZE
    assert reserved[0] == reserved[1] == reserved[2] > 0
    assert max(live) == 0


def llama_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (4, 33), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def resnet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "delta", "auto"])
@pytest.mark.parametrize("shape", ["llama", "resnet"])
def test_llama_and_resnet_blocks_train_exactly_under_every_policy(shape: str, policy: str) -> None:
    from models import Llama, ResNet

    def make() -> nn.Module:
        torch.manual_seed(0)
        return Llama() if shape == "llama" else ResNet()

    batch = llama_batch() if shape == "llama" else resnet_batch()

    def train(model: nn.Module, mgr: ActivationManager | None) -> list[list[torch.Tensor]]:
        out = []
        for seed in range(3):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            if mgr is None:
                loss = model(*batch)
            else:
                with mgr.step():
                    loss = model(*batch)
            loss.backward()
            out.append(grads(model))
        return out

    plain = train(make(), None)
    model = make()
    mgr = manager(policy=policy, memory_budget=1 if policy == "auto" else "auto")
    mgr.wrap(model)
    for expected, actual in zip(plain, train(model, mgr), strict=True):
        assert_bitwise_equal(expected, actual)
    assert mgr.plan is not None and len(mgr.plan.blocks) == (3 if shape == "llama" else 4)
