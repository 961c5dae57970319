"""Reliability on the GPU: Llama-style and ResNet-style models train exactly under every policy in
bf16 and in fp16 with a GradScaler, and a 1000-step soak over variable sequence lengths keeps pinned and
GPU memory flat (run with ``-s`` to see the figures). The host-never-waits test is in test_sync_gpu.py.
Run on the device machine."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationManager, SwapConfig, offload_activations

from gpt import GPT, GPTConfig, random_batch
from helpers import assert_bitwise_equal
from models import Llama, ResNet

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("deterministic_cuda"),
              pytest.mark.filterwarnings("ignore:deltaswap. the smallest plan:RuntimeWarning")]


def batch_for(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if shape == "llama":
        tokens = torch.randint(0, 97, (8, 33), generator=gen)
        return tokens[:, :-1].cuda(), tokens[:, 1:].cuda()
    return torch.randn(8, 3, 32, 32, generator=gen).cuda(), torch.randint(0, 10, (8,), generator=gen).cuda()


def train(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], mgr: ActivationManager | None,
          dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Three steps of gradients, with a GradScaler in fp16 (its scale is part of the gradients)."""
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    out = []
    for seed in range(3):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with (mgr.step() if mgr is not None else torch.enable_grad()), torch.autocast("cuda", dtype=dtype):
            loss = model(*batch)
        scaler.scale(loss).backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "delta", "auto"])
@pytest.mark.parametrize("shape", ["llama", "resnet"])
def test_llama_and_resnet_train_exactly_on_gpu(shape: str, policy: str, dtype: torch.dtype) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return (Llama() if shape == "llama" else ResNet()).cuda()

    batch = batch_for(shape)
    plain = train(make(), batch, None, dtype)
    model = make()
    budget = 1 if policy == "auto" else "auto"  # auto under 1 byte: its smallest plan
    mgr = ActivationManager(SwapConfig(policy=policy, min_bytes=0, memory_budget=budget))
    mgr.wrap(model)
    for expected, actual in zip(plain, train(model, batch, mgr, dtype), strict=True):
        assert_bitwise_equal(expected, actual)
    if policy == "swap":
        assert mgr.stats.engine.bytes_offloaded > 0


def test_soak_1000_steps_keeps_pinned_and_gpu_memory_flat() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, seq_len=256, n_layer=4, n_head=4, d_model=256)
    model = GPT(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mgr = ActivationManager(SwapConfig(policy="swap", min_bytes=0))
    mgr.wrap(model)
    x, y = random_batch(cfg, 8, "cuda", torch.Generator().manual_seed(1))
    lengths = [64 + 32 * (i % 6) for i in range(1000)]  # six shapes: each profiled once, then cached
    figures = {}
    for i, length in enumerate(lengths, start=1):
        with mgr.step(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :length], y[:, :length])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i in (10, 500, 1000):
            torch.cuda.synchronize()
            engine = mgr.stats.engine
            figures[i] = (engine.pinned_bytes_reserved, engine.pinned_bytes_in_use,
                          torch.cuda.memory_allocated())
    print("soak (pinned reserved, pinned in use, GPU allocated) at steps 10, 500, 1000:", figures)
    assert figures[500][0] == figures[1000][0] > 0, "the pinned pool stops growing after warm-up"
    assert figures[10][1] == figures[500][1] == figures[1000][1] == 0, "nothing pinned between steps"
    assert figures[500][2] == figures[1000][2], "GPU memory flat after warm-up"


def _held() -> tuple[int, int, int]:
    """(pinned bytes torch's caching host allocator holds, process RSS, GPU bytes allocated)."""
    torch.cuda.synchronize()
    pinned = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    return pinned, psutil.Process().memory_info().rss, torch.cuda.memory_allocated()


def test_soak_per_step_contexts_and_managers_one_after_another_hold_flat_memory() -> None:
    """The idioms that grew host memory before (issue: host memory that stays flat): a new
    ``offload_activations()`` every step for 200 steps, two managers training in turn, and a manager
    after a closed one. Pinned memory and RSS stay within 5% (RSS: or 64 MiB) of what the first steps
    held, GPU memory allocated is flat, and every context swapped."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, seq_len=256, n_layer=4, n_head=4, d_model=256)
    model = GPT(cfg).cuda()
    x, y = random_batch(cfg, 8, "cuda", torch.Generator().manual_seed(1))
    figures = {}
    for i in range(1, 201):
        model.zero_grad(set_to_none=True)
        with offload_activations(min_bytes=0) as off, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        assert off.stats.bytes_offloaded > 0
        if i in (10, 100, 200):
            figures[i] = _held()
    print("per-step contexts (pinned, RSS, GPU allocated) at steps 10, 100, 200:", figures)
    pinned, rss, _ = figures[10]
    assert pinned > 0
    for step in (100, 200):
        assert figures[step][0] <= 1.05 * pinned, f"pinned grew: {figures}"
        assert figures[step][1] <= max(1.05 * rss, rss + (64 << 20)), f"RSS grew: {figures}"
    assert figures[100][2] == figures[200][2], "GPU memory flat"

    other = GPT(cfg).cuda()  # two managers, training in turn, then each replaced by a new one
    for round_ in range(3):
        managers = [ActivationManager(SwapConfig(policy="swap", min_bytes=0)) for _ in range(2)]
        for mgr, m in zip(managers, (model, other), strict=True):
            mgr.wrap(m)
        for step in range(5):
            for mgr, m in zip(managers, (model, other), strict=True):
                m.zero_grad(set_to_none=True)
                with mgr.step(), torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(x, y)
                loss.backward()
                assert step == 0 or mgr.stats.engine.bytes_offloaded > 0  # after the profiling step
        for mgr in managers:
            mgr.close()
        figures[f"managers {round_}"] = _held()
    print("two managers per round (pinned, RSS, GPU allocated):", figures)
    first = figures["managers 0"]
    for round_ in (1, 2):
        now = figures[f"managers {round_}"]
        assert now[0] <= 1.05 * first[0], f"pinned grew: {figures}"
        assert now[1] <= max(1.05 * first[1], first[1] + (64 << 20)), f"RSS grew: {figures}"
        assert now[2] == first[2], "GPU memory flat"
