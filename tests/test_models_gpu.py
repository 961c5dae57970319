"""The models users bring, on the GPU: Hugging Face GPT-2, Llama, T5, BERT and ViT, and torchvision's
ResNet-50, with gradients bitwise equal to the plain run under every policy, in fp32 and in bf16
autocast (deterministic kernels, math attention: see ``deterministic_cuda``)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

from deltaswap.swap import ActivationManager, SwapConfig
from deltaswap.swap.planner import BlockMode

from brought import MODELS, Loss, build, kv_cache_length
from helpers import assert_bitwise_equal

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

pytestmark = pytest.mark.gpu

POLICIES = ("keep", "swap", "recompute", "delta", "auto")


def grads_of_steps(model: nn.Module, loss_fn: Loss, mgr: ActivationManager | None, dtype: torch.dtype,
                   steps: int = 3) -> list[list[torch.Tensor]]:
    """Gradients of ``steps`` steps on the same weights; the plain run has the KV cache off, as
    deltaswap trains (see :mod:`brought`)."""
    out = []
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)
        gen = torch.Generator().manual_seed(i)
        with mgr.step() if mgr is not None else contextlib.nullcontext(), autocast:
            loss = loss_fn(model, gen, cache=mgr is not None)
        loss.backward()
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_bitwise_exact_on_the_gpu(name: str, policy: str, dtype: torch.dtype,
                                                 deterministic_cuda: None) -> None:
    model, loss_fn = build(name, size="gpu", device="cuda", dropout=0.0 if name == "resnet50" else 0.1)
    plain = grads_of_steps(model, loss_fn, None, dtype, steps=4)
    assert_bitwise_equal(plain[0], grads_of_steps(model, loss_fn, None, dtype, steps=1)[0])  # reference
    # auto: half the plain run's activations (swaps and recomputes, from measurements)
    budget: int | str = "auto"
    if policy == "auto":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads_of_steps(model, loss_fn, None, dtype, steps=1)
        budget = max(1, (torch.cuda.max_memory_allocated() - base) // 2)
    mgr = ActivationManager(SwapConfig(policy=policy, memory_budget=budget, min_bytes="64KiB"))
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="deltaswap: the smallest plan")
        warnings.filterwarnings("ignore", message="deltaswap: .* keeps a KV cache")
        ours = grads_of_steps(model, loss_fn, mgr, dtype, steps=4)  # profiling, first plan, re-plan, plan
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)
    modes = {b.mode for b in mgr.plan.blocks}
    if policy == "swap":
        assert modes == {BlockMode.SWAP} and mgr.stats.engine.bytes_offloaded > 0
    elif policy == "keep":
        assert modes == {BlockMode.KEEP}
    elif policy in ("recompute", "delta"):
        assert modes == {BlockMode.CHECKPOINT}
    mgr.close()


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_the_kv_cache_stays_empty_on_the_gpu(name: str) -> None:
    model, _ = build(name, size="gpu", device="cuda", attn="eager")
    mgr = ActivationManager(SwapConfig(policy="auto", memory_budget="64MiB", min_bytes="64KiB"))
    mgr.wrap(model)
    ids = torch.randint(2, 1024, (8, 256), device="cuda")
    labels = ids[:, :128].clone() if name == "t5" else ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            with mgr.step():
                out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            assert kv_cache_length(out) == 0
    mgr.close()


def activation_peak(model: nn.Module, loss_fn: Loss, mgr: ActivationManager | None) -> int:
    """One bf16 step of ``loss_fn`` (under ``mgr``'s step if given, which turns the KV cache off; the
    plain step passes ``use_cache=False``): the allocator's peak over the forward and the whole backward,
    above what was allocated before it."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = mgr.step() if mgr is not None else contextlib.nullcontext()
    with step, torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, torch.Generator().manual_seed(0), cache=mgr is not None)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("policy", ["recompute", "swap", "auto"])
@pytest.mark.parametrize("name", MODELS)
def test_the_measured_peak_is_within_the_budget_and_the_prediction(name: str, policy: str) -> None:
    """A budget is a promise: after the steps that measure their peak against the plan's prediction,
    the activation peak a step measures (the allocator's, over the forward and the whole backward) is at
    most the budget and within 5% of the predicted peak (or 16 MiB: a one-off allocation in a step
    that measures, a library's workspace, stays in the margin, and these models' peaks are 100-300
    MiB). ``auto`` gets half the plain run's peak. (A fixed policy's prediction becomes what its first
    planned step measured, so for it this checks that the steps repeat; for ``auto`` the budget is what
    matters.)"""
    model, loss_fn = build(name, size="gpu", device="cuda", dropout=0.0)

    activation_peak(model, loss_fn, None)
    budget: int | str = max(1, activation_peak(model, loss_fn, None) // 2) if policy == "auto" else "auto"
    mgr = ActivationManager(SwapConfig(policy=policy, memory_budget=budget, min_bytes="64KiB"))
    mgr.wrap(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # profiling, then plans (the first ones measure)
        peaks = [activation_peak(model, loss_fn, mgr) for _ in range(7)]
    over = [w for w in caught if "the smallest plan found needs" in str(w.message)]
    plan = mgr.plan
    assert plan is not None
    for peak in peaks[-2:]:
        if isinstance(budget, int) and not over:
            assert peak <= budget, f"measured {peak} over {budget}, {plan.predicted_peak} predicted"
        assert abs(peak - plan.predicted_peak) <= max(0.05 * plan.predicted_peak, 16 << 20), (
            f"measured {peak}, predicted {plan.predicted_peak} (margin {plan.calibration['peak_margin']})")
    mgr.close()


@pytest.mark.parametrize("name", ["resnet50", "t5"])
def test_a_budget_under_recompute_all_is_predicted_where_the_peak_happens(name: str) -> None:
    """A budget a little under what recomputing every block measured: no plan of whole blocks fits, so
    ``auto`` weighs swapped inputs and stored outputs, whose worth depends on where in the backward the
    peak happens (ResNet-50's is in its first stage, T5's later). The first planned step, predicted from
    the profiling step alone (no margin measured yet), measures within 2% of its prediction, and at
    most the budget when the prediction fits it. With one offset for the whole backward, ResNet-50's
    plan here was predicted 8% under what it measured (one H200, batch 64 at 224x224)."""
    model, loss_fn = build(name, size="gpu", device="cuda", dropout=0.0)

    recompute = ActivationManager(SwapConfig(policy="recompute", min_bytes="64KiB"))
    recompute.wrap(model)
    everything = [activation_peak(model, loss_fn, recompute) for _ in range(3)][-1]
    recompute.unwrap()
    recompute.close()
    budget = int(0.97 * everything)
    mgr = ActivationManager(SwapConfig(policy="auto", memory_budget=budget, min_bytes="64KiB"))
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the smallest plan may not fit: that is the point
        activation_peak(model, loss_fn, mgr)  # profiling
        peak = activation_peak(model, loss_fn, mgr)
    predicted = mgr.stats.predicted_peak
    assert not mgr.stats.profiling and predicted > 0
    assert abs(peak - predicted) <= 0.02 * predicted, (
        f"measured {peak}, predicted {predicted}; {[b.mode.value for b in mgr.plan.blocks]}")
    if predicted <= budget:
        assert peak <= budget + (1 << 20), f"measured {peak} over the budget {budget}"
    mgr.close()
