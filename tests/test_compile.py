"""Compiled blocks on CPU (torch.compile, regional): deltaswap compiles the blocks it wraps
(``SwapConfig(compile=...)``) or takes blocks already compiled; every step, the first (compiling) and
the profiling step included, has gradients bitwise equal to the same compiled model without deltaswap
under keep, swap, recompute, delta and auto; the blocks really run compiled, are profiled whole and
planned whole; a model compiled as a whole is refused with what to do instead."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deltaswap.strategy import DeltaSwapPlugin, SwapStrategy
from deltaswap.swap import ActivationManager, SwapConfig, SyncCopyBackend
from deltaswap.swap.planner import BlockMode, checkpoint_block, keep_block
from deltaswap.swap.recompute import OpDecision

from accelerate_helpers import train as accelerate_train
from gpt import GPT, Block, GPTConfig, random_batch
from helpers import assert_bitwise_equal
from lightning_helpers import fit, params

CFG = GPTConfig(vocab_size=97, seq_len=32, n_layer=4, n_head=4, d_model=64, dropout=0.1)


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> Iterator[None]:
    """Each test compiles anew: dynamo's caches are keyed by the blocks' code, not by the backend."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """torch.compile's ``aot_eager`` backend (AOTAutograd's forward/backward graphs, eager kernels: the
    same values as eager PyTorch), counting the graphs it compiles and how often they run."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        self.compiles += 1
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [random_batch(CFG, 4, "cpu", gen) for _ in range(n)]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]],
          mgr: ActivationManager | None = None, first: int = 0) -> list[list[torch.Tensor]]:
    """Gradients of each step from the same weights; step ``i`` draws its dropout masks from seed
    ``100 + first + i``."""
    out = []
    for i, (x, y) in enumerate(data):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + first + i)
        with mgr.step() if mgr is not None else contextlib.nullcontext():
            loss = model(x, y)
        loss.backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def compiled_plain(backend: object,
                   data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The reference: the same model with each block compiled, without deltaswap."""
    torch.manual_seed(0)
    model = GPT(CFG)
    runs = {id(b): torch.compile(b, backend=backend) for b in model.blocks}
    model.block_runner = lambda block, h: runs[id(block)](h)
    return train(model, data)


def manager(**options: object) -> ActivationManager:
    options.setdefault("bandwidth_gbps", 50.0)
    return ActivationManager(SwapConfig(min_bytes=0, **options), backend=SyncCopyBackend())  # type: ignore[arg-type]


def keep_peak() -> int:
    """What keeping everything is predicted to hold, for a budget between that and recompute's."""
    torch.manual_seed(0)
    model, mgr = GPT(CFG), manager(policy="keep")
    mgr.wrap(model)
    train(model, batches(2), mgr)
    assert mgr.plan is not None
    return mgr.plan.predicted_peak


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "delta", "auto"])
def test_compiled_blocks_train_with_the_compiled_models_gradients_under_every_policy(policy: str) -> None:
    data = batches()
    expected = compiled_plain("aot_eager", data)
    budget: int | str = keep_peak() * 8 // 10 if policy == "auto" else "auto"
    backend = CountingBackend()
    torch.manual_seed(0)
    model = GPT(CFG)
    mgr = manager(policy=policy, memory_budget=budget, compile={"backend": backend})
    mgr.wrap(model)
    got, runs = [], []  # each step's gradients, and how often the compiled graphs ran in it
    for i in range(len(data)):
        before = backend.runs
        got += train(model, data[i : i + 1], mgr, first=i)
        runs.append((backend.runs - before, mgr.plan))
        if i == 0:
            assert mgr.workload is None, "the first step of a shape compiles; it is not timed"
    for want, have in zip(expected, got, strict=True):
        assert_bitwise_equal(want, have)
    assert backend.compiles == 1, "one graph for the four blocks"
    # every block call ran compiled, once in the forward and again in each recompute: all checkpointed
    # while compiling; the first call of its kind plain and the others checkpointed while profiling
    assert runs[0][0] == 2 * CFG.n_layer and runs[1][0] == 2 * CFG.n_layer - 1
    for count, plan in runs[2:]:
        assert plan is not None
        assert count == CFG.n_layer + sum(b.mode is BlockMode.CHECKPOINT for b in plan.blocks)
    work, plan = mgr.workload, mgr.plan
    assert work is not None and plan is not None
    assert all(b.compiled and b.forward_ms > 0 for b in work.blocks), "each call profiled whole"
    assert all(not b.per_op for b in plan.blocks), "a compiled block is planned whole"
    modes = {b.mode for b in plan.blocks}
    wanted = {"keep": {BlockMode.KEEP}, "swap": {BlockMode.SWAP}, "recompute": {BlockMode.CHECKPOINT},
              "delta": {BlockMode.CHECKPOINT}}
    if policy in wanted:
        assert modes == wanted[policy]
    else:
        assert plan.predicted_peak <= budget and modes != {BlockMode.KEEP}
    if BlockMode.SWAP in modes:
        assert mgr.stats.engine.bytes_offloaded > 0


def test_blocks_named_by_class_inside_their_compile_wrappers_are_planned_as_the_wrappers() -> None:
    data = batches(4)
    expected = compiled_plain("aot_eager", data)
    torch.manual_seed(0)
    model = GPT(CFG)
    for k, block in enumerate(model.blocks):
        model.blocks[k] = torch.compile(block, backend="aot_eager")
    mgr = manager(policy="recompute", block_types=(Block,))
    mgr.wrap(model)
    assert mgr.block_names == [f"blocks.{k}" for k in range(CFG.n_layer)]
    for want, have in zip(expected, train(model, data, mgr), strict=True):
        assert_bitwise_equal(want, have)
    assert mgr.workload is not None and all(b.compiled for b in mgr.workload.blocks)


def test_a_failed_first_step_compiles_again_before_profiling() -> None:
    """The step that compiles a shape raised (here in the loss): the next step compiles again rather
    than profile, so no compilation lands in the profiled times."""
    data = batches(3)
    torch.manual_seed(0)
    model = GPT(CFG)
    mgr = manager(policy="recompute", compile={"backend": "aot_eager"})
    mgr.wrap(model)
    with pytest.raises(RuntimeError, match="loader broke"), mgr.step():
        model(*data[0])
        raise RuntimeError("loader broke")
    train(model, data[:1], mgr)
    assert mgr.workload is None, "compiling again"
    train(model, data[1:2], mgr)
    assert mgr.workload is not None and all(b.compiled for b in mgr.workload.blocks)


def test_modules_compiled_inside_blocks_run_eagerly_with_a_warning_or_inside_the_compiled_blocks() -> None:
    data = batches(3)
    expected = compiled_plain("aot_eager", data)
    torch.manual_seed(0)
    model = GPT(CFG)
    model.blocks[1].attn = torch.compile(model.blocks[1].attn, backend="aot_eager")
    parts = r"1 block\(s\) of GPT \(blocks\.1 first\) are compiled in place in parts"
    with pytest.warns(UserWarning, match=parts):
        manager().wrap(model)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(CFG)
    model.blocks[1].attn = torch.compile(model.blocks[1].attn, backend="aot_eager")
    mgr = manager(policy="swap", compile={"backend": "aot_eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole blocks are compiled: no warning
        mgr.wrap(model)
    for want, have in zip(expected, train(model, data, mgr), strict=True):
        assert_bitwise_equal(want, have)
    assert mgr.workload is not None and all(b.compiled for b in mgr.workload.blocks)


def test_blocks_compiled_by_the_user_run_compiled_and_are_planned_whole() -> None:
    data = batches(4)
    expected = compiled_plain("aot_eager", data)
    for how in ("in place", "replaced"):
        torch._dynamo.reset()
        backend = CountingBackend()
        torch.manual_seed(0)
        model = GPT(CFG)
        for k, block in enumerate(model.blocks):
            if how == "in place":
                block.compile(backend=backend)
            else:
                model.blocks[k] = torch.compile(block, backend=backend)  # the torchtitan way
        mgr = manager(policy="swap")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # whole blocks compiled: nothing runs eagerly, no warning
            mgr.wrap(model)
        assert mgr.block_names == [f"blocks.{k}" for k in range(CFG.n_layer)]
        got = train(model, data, mgr)
        for want, have in zip(expected, got, strict=True):
            assert_bitwise_equal(want, have)
        assert mgr.workload is not None and all(b.compiled for b in mgr.workload.blocks), how
        assert backend.compiles == 1 and backend.runs >= len(data) * CFG.n_layer, how
        assert mgr.stats.engine.bytes_offloaded > 0, how
        runs = backend.runs
        with torch.no_grad():
            model(*data[0])  # evaluation runs the compiled blocks too
        assert backend.runs == runs + CFG.n_layer, how


def _has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor on a CPU needs a C++ compiler")
def test_inductor_compiled_blocks_keep_swap_and_recompute_with_the_compiled_models_gradients() -> None:
    """With inductor's own kernels (and its own dropout RNG, which eager PyTorch does not reproduce):
    equal to the compiled model, not to the eager one."""
    data = batches(4)
    expected = compiled_plain("inductor", data)
    torch.manual_seed(0)
    eager = train(GPT(CFG), data)
    assert any(not torch.equal(a, b) for a, b in zip(expected[0], eager[0], strict=True)), \
        "the compiled model differs from the eager one, so equality below says the blocks ran compiled"
    for policy in ("keep", "swap", "recompute"):
        torch.manual_seed(0)
        model = GPT(CFG)
        mgr = manager(policy=policy, compile=True)
        mgr.wrap(model)
        got = train(model, data, mgr)
        for want, have in zip(expected, got, strict=True):
            assert_bitwise_equal(want, have)
        mgr.unwrap()


def test_a_hand_made_plan_cannot_store_op_outputs_of_a_compiled_block() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    mgr = manager(policy="recompute", compile={"backend": "aot_eager"})
    mgr.wrap(model)
    train(model, batches(2), mgr)
    work = mgr.workload
    assert work is not None
    stored = checkpoint_block(work.blocks[0], {0: OpDecision.KEEP})
    with pytest.raises(ValueError, match=r"block call 0 \(blocks\.0\) runs compiled: it is planned whole"):
        mgr.use_plan([stored] + [keep_block(c) for c in work.blocks[1:]])
    mgr.use_plan([keep_block(c) for c in work.blocks])  # whole-block plans are fine


def test_a_model_compiled_whole_is_refused_with_the_option_to_use_instead() -> None:
    with pytest.raises(ValueError, match=r"compiled as a whole.*SwapConfig\(compile=True\)"):
        manager().wrap(torch.compile(GPT(CFG)))
    in_place = GPT(CFG)
    in_place.compile()
    with pytest.raises(ValueError, match=r"GPT is compiled as a whole.*SwapConfig\(compile=True\)"):
        manager().wrap(in_place)
    model = GPT(CFG)
    model.ln_f = torch.compile(model.ln_f)  # compiled, but not a block
    with pytest.raises(ValueError, match=r"ln_f of GPT is compiled .* not one of the blocks"):
        manager().wrap(model)


@pytest.mark.parametrize(
    ("compile_", "error", "match"),
    [("yes", TypeError, "True, False or a dict"),
     ({"mode": "reduce-overhead"}, ValueError, "CUDA graphs"),
     ({"options": {"triton.cudagraphs": True}}, ValueError, "CUDA graphs"),
     ({"options": "fast"}, TypeError, "'options' must be a dict"),
     ({"fullgraf": True}, ValueError, "fullgraf is not a torch.compile argument")],
)
def test_bad_compile_options_are_refused_with_what_to_write(compile_: object, error: type,
                                                            match: str) -> None:
    with pytest.raises(error, match=match):
        SwapConfig(compile=compile_)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        DeltaSwapPlugin(compile=compile_)  # type: ignore[arg-type]


def test_replan_cannot_change_compile_while_a_model_is_wrapped() -> None:
    mgr = manager()
    mgr.wrap(GPT(CFG))
    with pytest.raises(ValueError, match="replan cannot change compile"):
        mgr.replan(SwapConfig(min_bytes=0, bandwidth_gbps=50.0, compile=True))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's CPU/num_workers hints, deltaswap's CPU run
def test_the_lightning_strategy_and_the_accelerate_plugin_compile_the_blocks(tmp_path: Path) -> None:
    _, plain = fit("auto", tmp_path)  # aot_eager computes what eager PyTorch does
    backend = CountingBackend()
    trainer, ours = fit(SwapStrategy(policy="recompute", compile={"backend": backend}), tmp_path)
    assert_bitwise_equal(params(plain), params(ours))
    assert backend.compiles >= 1 and backend.runs > 0
    work = trainer.strategy.manager.workload  # type: ignore[attr-defined]
    assert work is not None and all(b.compiled for b in work.blocks)

    plain_weights, _ = accelerate_train(None)
    backend = CountingBackend()
    plugin = DeltaSwapPlugin(policy="recompute", compile={"backend": backend})
    weights, _ = accelerate_train(plugin)
    assert_bitwise_equal(plain_weights, weights)
    assert backend.compiles >= 1 and backend.runs > 0
    assert plugin.manager is not None
    work = plugin.manager.workload
    assert work is not None and all(b.compiled for b in work.blocks)
