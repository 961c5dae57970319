"""The models users bring, on CPU: Hugging Face decoders with their KV cache left on, T5, BERT, ViT and
torchvision's ResNet-50 are found block by block, planned from each block's own profile, and train
with gradients bitwise equal to the plain run under every policy."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from test_strategy_ddp import run_parallel
from torch import nn

from deltaswap.swap import ActivationManager, SwapConfig, SyncCopyBackend
from deltaswap.swap.discovery import describe_blocks, find_blocks
from deltaswap.swap.planner import BlockMode

from brought import HF_MODELS, MODELS, Loss, build, kv_cache_length
from helpers import assert_bitwise_equal, predicted_and_held
from lightning_helpers import LitHF, hf_batches

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

POLICIES = ("keep", "swap", "recompute", "delta", "auto")


def manager(policy: str, budget: int | str = "auto") -> ActivationManager:
    # a synchronous copy backend: swapping really copies (to CPU memory) without a GPU
    config = SwapConfig(policy=policy, memory_budget=budget, min_bytes=0, bandwidth_gbps=50.0)
    return ActivationManager(config, backend=SyncCopyBackend())


def grads_of_steps(model: nn.Module, loss_fn: Loss, mgr: ActivationManager | None, steps: int = 3
                   ) -> list[list[torch.Tensor]]:
    """The gradients of ``steps`` steps on the same weights (step ``i``: batch and dropout seed ``i``);
    without a manager (the plain run), with the KV cache off, as deltaswap trains (see :mod:`brought`)."""
    out = []
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)
        gen = torch.Generator().manual_seed(i)
        if mgr is None:
            loss = loss_fn(model, gen, cache=False)
        else:
            with mgr.step():
                loss = loss_fn(model, gen)
        loss.backward()
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return out


# -- discovery ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "count", "classes"), [
    ("resnet50", 16, {"Bottleneck"}), ("t5", 4, {"T5Block"}), ("gpt2", 2, {"GPT2Block"}),
    ("llama", 2, {"LlamaDecoderLayer"}), ("bert", 2, {"BertLayer"}), ("vit", 2, {"ViTLayer"}),
])
def test_discovery_finds_every_block_of_every_stack_and_stage(name: str, count: int,
                                                              classes: set[str]) -> None:
    model, _ = build(name)
    blocks = find_blocks(model)
    assert len(blocks) == count
    assert {type(b).__name__ for b in blocks} == classes


def test_discovery_names_the_blocks_and_the_plan_says_what_lies_outside_them() -> None:
    model, loss_fn = build("resnet50")
    mgr = manager("recompute")
    mgr.wrap(model)
    assert mgr.blocks_summary == "layer1.0 .. layer4.2: Bottleneck x16"
    grads_of_steps(model, loss_fn, mgr, steps=1)
    plan = mgr.plan
    assert plan is not None and plan.block_names[0] == "layer1.0" and plan.block_names[-1] == "layer4.2"
    text = str(plan)
    assert "layer3.5" in text and "outside the blocks" in text
    assert 0 < plan.outside_bytes < plan.plain_bytes  # the stem and the head


def test_without_an_engine_the_cpu_profile_still_counts_what_lies_outside_the_blocks() -> None:
    model, loss_fn = build("gpt2")
    mgr = ActivationManager(SwapConfig(policy="recompute"))  # CPU: no copy backend, no engine
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads_of_steps(model, loss_fn, mgr, steps=1)
    assert mgr.plan is not None and mgr.plan.outside_bytes > 0  # embeddings, logits, the loss


def test_a_sequential_of_layers_in_a_module_list_is_a_block() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
    assert find_blocks(model) == list(model.blocks)
    assert describe_blocks(["blocks.0", "blocks.1", "blocks.2"], list(model.blocks)) == \
        "blocks.0 .. blocks.2: Sequential x3"


def test_explicit_blocks_are_wrapped_and_checked() -> None:
    model, loss_fn = build("resnet50")
    mgr = manager("recompute")
    with pytest.raises(ValueError, match=r"layer1\.0 lies inside block layer1"):
        mgr.wrap(model, blocks=[model.layer1, model.layer1[0]])
    with pytest.raises(ValueError, match="not a module of the model"):
        mgr.wrap(model, blocks=[nn.Linear(2, 2)])
    mgr.wrap(model, blocks=[model.layer1, model.layer2, model.layer3, model.layer4])
    assert mgr.block_names == ["layer1", "layer2", "layer3", "layer4"]
    plain = grads_of_steps(model, loss_fn, None, steps=2)
    assert_bitwise_equal(plain[1], grads_of_steps(model, loss_fn, mgr, steps=2)[1])


def test_hf_gradient_checkpointing_on_is_refused_with_what_to_do() -> None:
    model, _ = build("llama")
    # newer transformers name it activation checkpointing
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match=r"gradient_checkpointing_disable\(\)"):
        manager("auto").wrap(model)


# -- every model, every policy -------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_with_bitwise_equal_gradients(name: str, policy: str) -> None:
    model, loss_fn = build(name, dropout=0.1 if name != "resnet50" else 0.0)
    plain = grads_of_steps(model, loss_fn, None)
    # auto with a budget of one byte: the smallest plan (swaps and recomputes), with one warning
    mgr = manager(policy, budget=1 if policy == "auto" else "auto")
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="deltaswap: the smallest plan")
        warnings.filterwarnings("ignore", message="deltaswap: .* keeps a KV cache")
        ours = grads_of_steps(model, loss_fn, mgr)
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)
    modes = {b.mode for b in mgr.plan.blocks}
    wanted = {"keep": {BlockMode.KEEP}, "swap": {BlockMode.SWAP}, "recompute": {BlockMode.CHECKPOINT},
              "delta": {BlockMode.CHECKPOINT}}
    if policy == "auto":
        assert BlockMode.KEEP not in modes  # the smallest plan moves every block
    else:
        assert modes == wanted[policy]
    if policy == "swap":
        assert mgr.stats.engine.bytes_offloaded > 0  # really moved, and came back exactly


# -- the KV cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_the_kv_cache_stays_empty_in_training_steps_with_one_warning(name: str, attn: str) -> None:
    model, _ = build(name, attn=attn)
    assert model.config.use_cache  # the config's default, untouched
    mgr = manager("recompute")
    mgr.wrap(model)
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids[:, :8].clone() if name == "t5" else ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # profiling, first plan, the plan
            with mgr.step():
                out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            assert kv_cache_length(out) == 0
    cache_warnings = [w for w in caught if "KV cache" in str(w.message)]
    assert len(cache_warnings) == 1 and type(model).__name__ in str(cache_warnings[0].message)
    model.eval()  # evaluation is untouched: the cache works as the model wants
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert kv_cache_length(out) > 0


# -- each block planned from its own profile -------------------------------------------------------------
def test_t5_decoder_blocks_are_profiled_as_what_they_are() -> None:
    model, loss_fn = build("t5")
    mgr = manager("recompute")
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads_of_steps(model, loss_fn, mgr, steps=1)
    work = mgr.workload
    assert work is not None and work.block_names == ("encoder.block.0", "encoder.block.1",
                                                     "decoder.block.0", "decoder.block.1")
    # four kinds: each stack's first layer computes the position bias the second receives
    assert work.plain_calls == (0, 1, 2, 3)
    encoder, decoder = work.blocks[1], work.blocks[3]
    assert len(decoder.ops) > len(encoder.ops)  # cross-attention
    assert decoder.saved_bytes != encoder.saved_bytes  # each measured as it runs


def test_resnet_stages_are_profiled_by_kind_and_each_kind_runs_plainly_once() -> None:
    model, loss_fn = build("resnet50")
    mgr = manager("recompute")
    mgr.wrap(model)
    grads_of_steps(model, loss_fn, mgr, steps=1)
    work = mgr.workload
    assert work is not None
    # each stage: its first block (downsample, new width) and the rest, alike
    assert work.plain_calls == (0, 1, 3, 4, 7, 8, 13, 14)
    saved = [b.saved_bytes for b in work.blocks]
    assert saved[1] == saved[2] and saved[0] != saved[1] and saved[3] != saved[4]
    assert len(work.blocks[0].ops) > len(work.blocks[1].ops)  # the downsample's conv and norm


class Appending(nn.Module):
    """A block that appends to a list it is given (as a cache would)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, seen: list[torch.Tensor]) -> torch.Tensor:
        seen.append(x)
        return torch.tanh(self.fc(x))


class WithList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Appending() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x, seen)
        return x.sum()


def test_a_block_that_mutates_its_argument_is_refused_before_any_step_goes_wrong() -> None:
    model = WithList()
    mgr = manager("recompute")
    mgr.wrap(model)
    with pytest.raises(ValueError, match=r"block blocks\.0 \(Appending\) changed its positional argument 1 "
                                         r"\(list\) in place"), mgr.step():
        model(torch.randn(2, 8))


class Branching(nn.Module):
    """Runs one of two op sequences, chosen by a flag (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.sigmoid(h) * h if self.other else torch.tanh(h).exp()


def test_a_block_running_other_ops_than_profiled_recomputes_and_is_profiled_again() -> None:
    branches = [Branching(), Branching(), Branching()]
    model, x = nn.Sequential(*branches), torch.randn(4, 8)

    def loss_fn(m: nn.Module, gen: torch.Generator, cache: bool = True) -> torch.Tensor:
        return m(x).pow(2).sum()

    # DELTA's rule with a fast link swaps every op output it can: a plan of stored outputs by op index
    mgr = ActivationManager(SwapConfig(policy="delta", min_bytes=0, bandwidth_gbps=1e6),
                            backend=SyncCopyBackend())
    mgr.wrap(model)
    grads_of_steps(model, loss_fn, mgr, steps=3)
    assert all(b.per_op for b in mgr.plan.blocks)
    for block in branches:
        block.other = True
    plain = grads_of_steps(model, loss_fn, None, steps=2)
    with pytest.warns(RuntimeWarning, match=r"block 0 ran other ops than when this input shape was profiled"):
        ours = grads_of_steps(model, loss_fn, mgr, steps=2)
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)
    ops = {op.op for op in mgr.workload.blocks[0].ops}
    assert "aten.sigmoid.default" in ops  # profiled again, as it now runs


# -- the peak model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_the_predicted_activations_are_what_autograd_holds(name: str, policy: str) -> None:
    """On a CPU the planner runs uncalibrated: its forward-end bytes must be what the step's saved
    tensors hold, each storage once (a ResNet bottleneck's closing ReLU output, the next one's input; the
    mask and position bias every HF block takes), and never less."""
    model, loss_fn = build(name)
    mgr = ActivationManager(SwapConfig(policy=policy, min_bytes=0))  # no engine, no swapping
    mgr.wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU and KV-cache warnings
        predicted, held = predicted_and_held(mgr, lambda: loss_fn(model, torch.Generator().manual_seed(0)))
    if name == "gpt2" and policy == "recompute":  # its position ids are saved outside the blocks too
        assert held <= predicted <= 1.01 * held
    else:
        assert predicted == held


# -- nothing to pay when nothing moves ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "resnet50"])
@pytest.mark.parametrize(("policy", "engine_runs"), [("keep", False), ("recompute", False), ("swap", True)])
def test_a_plan_that_swaps_nothing_runs_without_the_engine(name: str, policy: str, engine_runs: bool) -> None:
    model, loss_fn = build(name)
    mgr = manager(policy)
    mgr.wrap(model)
    plain = grads_of_steps(model, loss_fn, None)
    engine_seen: list[bool] = []
    first = mgr.blocks[0]._checkpoint_wrapped_module  # runs inside the manager's step (and its recompute)
    handle = first.register_forward_pre_hook(
        lambda *_: engine_seen.append(mgr._offloader.store is not None) if mgr._in_step else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = grads_of_steps(model, loss_fn, mgr)
    handle.remove()
    assert engine_seen == [True, engine_runs, engine_runs]  # the profiling step always runs the engine
    if engine_runs:
        assert mgr.stats.engine.bytes_offloaded > 0
    else:
        assert mgr.stats.engine.tensors_kept == 0  # and the stats say the last step used none
    for expected, actual in zip(plain, ours, strict=True):
        assert_bitwise_equal(expected, actual)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_models_keep_their_state_dict_and_unwrap(name: str) -> None:
    model, _ = build(name)
    keys = list(model.state_dict())
    mgr = manager("auto")
    mgr.wrap(model)
    assert list(model.state_dict()) == keys
    mgr.unwrap()
    assert find_blocks(model) and list(model.state_dict()) == keys


# -- through the adapters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_models_train_through_swap_strategy_as_without_it(name: str, tmp_path: Path) -> None:
    from deltaswap.strategy import SwapStrategy

    weights = []
    for strategy in ("auto", SwapStrategy(policy="recompute")):
        module = LitHF(name)
        if strategy == "auto":  # the plain run, as deltaswap trains: no cache
            module.model.config.use_cache = False
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=4, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, hf_batches())
        assert module.caches == [0, 0, 0, 0]
        weights.append([p.detach().clone() for p in module.parameters()])
    assert_bitwise_equal(*weights)
    assert trainer.strategy.plan is not None and trainer.strategy.plan.recompute_ops > 0


@pytest.mark.parametrize(("plain", "ours"), [("ddp", "deltaswap_ddp"), ("fsdp", "deltaswap_fsdp")])
def test_hf_gpt2_trains_through_the_ddp_and_fsdp_strategies_as_without_them(plain: str, ours: str,
                                                                            tmp_path: Path) -> None:
    # two CPU ranks; recompute would append to the KV cache again if deltaswap kept it on
    expected = run_parallel(plain, tmp_path / "plain", "--model", "gpt2")
    got = run_parallel(ours, tmp_path / "ours", "--model", "gpt2", "--policy", "recompute")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    for rank in (0, 1):
        assert (tmp_path / "ours" / f"cache_rank{rank}.txt").read_text() == "0 0 0 0"
        assert "checkpoint" in (tmp_path / "ours" / f"plan_rank{rank}.txt").read_text()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_hf_models_train_through_the_accelerate_plugin_as_without_it() -> None:
    from accelerate import Accelerator

    from deltaswap.strategy import DeltaSwapPlugin

    weights = []
    for plugin in (None, DeltaSwapPlugin(policy="recompute")):
        model, loss_fn = build("gpt2")
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        if plugin is not None:
            model = plugin.prepare(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(3):
                loss = loss_fn(model, torch.Generator().manual_seed(i), cache=plugin is not None)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert_bitwise_equal(*weights)
    assert plugin.stats is not None and plugin.stats.recompute_ops > 0
