"""Benchmark deltaswap on the models users bring, against the plain run and torch's checkpointing.

Each model is built from its config with random weights (nothing is downloaded) and keeps the config's
defaults apart from its shape: Hugging Face's ``GPT2LMHeadModel`` (``GPT2Config()``), ``LlamaForCausalLM``
(a ~1.1B shape: 22 layers, d 2048, grouped-query attention), ``T5ForConditionalGeneration`` (``T5Config()``,
t5-small), ``BertForMaskedLM`` (``BertConfig()``, bert-base), ``ViTForImageClassification`` (``ViTConfig()``,
ViT-B/16) and torchvision's ``resnet50()``. The decoders keep ``use_cache=True``, their default: they
build a KV cache in the training forward, and deltaswap turns it off in the steps it plans. Inputs are
random token ids, images and labels; the loss is the model's own (``model(input_ids=x, labels=x).loss``,
T5 with ``labels``, ViT with ``labels``, ResNet-50 with cross-entropy).

Modes, run in this order for each model (the ``auto_*`` budgets come from peaks measured before them):

- ``plain``: nothing changed; the reference of every ratio, measured in this process;
- ``checkpoint``: torch's per-block checkpointing (``use_reentrant=False``) of exactly the blocks
  deltaswap plans (:func:`deltaswap.swap.discovery.find_blocks`), applied with
  ``apply_activation_checkpointing`` and removed afterwards. Its model calls pass ``use_cache=False``, as
  Hugging Face's own gradient checkpointing does: a recomputed layer would append to the cache again
  (T5 fails outright);
- ``ds_recompute``, ``ds_swap``: deltaswap's ``ActivationManager`` with that policy;
- ``auto_fits``: ``auto`` with a budget far above plain's peak (deltaswap's cost when it moves nothing);
- ``auto_ckpt``: ``auto`` with the budget at ``checkpoint``'s measured activation peak;
- ``auto_mid``: ``auto`` with the budget midway between ``plain``'s and ``checkpoint``'s peaks.

For each mode: the activation peak (``torch.cuda.max_memory_allocated()`` over the forward and backward,
less what was allocated before the forward), the median step time (forward, backward, AdamW; CUDA
events) over ``--steps`` timed steps after ``--warmup`` warm-up steps (3 for every mode by default, and
never fewer for deltaswap: profiling, first plan, re-plan), in each of ``--rounds`` rounds (the modes in
turn, each set up anew, so that a drift of the host's speed over the run falls on every mode alike; with
``--interleave``, after the first round, ``rounds x steps`` steps of every mode by turns, step by step,
each mode on its own copy of the model: the GPU machine's host changes speed by 1.7x between phases of a
run, and on host-bound steps, as torch's checkpointing makes them, only that compares like with like), its
ratio to ``plain``'s (``x_plain``; ``x_plain_best``: the fastest step's over plain's fastest, the ratio
a host that is busy now and then disturbs least: on the GPU machine, steps of one mode measured 57 and
70 ms by turns), and ``exact``: whether
the gradients of one step from the same weights and inputs are bitwise equal (``torch.equal``) to
``plain``'s. For ``plain`` itself ``exact`` says whether a second plain run repeats the first, so a
``False`` elsewhere is not noise. For the models with a KV cache, ``exact_no_cache`` compares with a
plain run that passes ``use_cache=False`` (the run deltaswap and torch's checkpointing train), which
tells a difference the cache alone makes (the cache's copy of the keys can change the memory layout the
attention reads) from one deltaswap makes. For deltaswap's modes: the plan's predicted peak, its
predicted forward+backward time against the one the manager measured (``mgr.stats``), the blocks
planned and what each block call does.

The exactness check runs apart from the timed steps, in deterministic mode
(``torch.use_deterministic_algorithms(True, warn_only=True)``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set
before CUDA starts, TF32 off, ``sdpa_kernel(SDPBackend.MATH)``: flash and memory-efficient attention
backward add atomically), on a batch of ``--exact-batch-size`` samples (math attention on the full batch
would not fit), with budgets for ``auto_*`` taken the same way from the peaks of that batch. Ops that
have no deterministic kernel are listed under ``nondeterministic``. Dropout stays as the configs have it
(on in GPT-2, T5 and BERT): the models train in train mode and the RNG is seeded identically before each
compared step (the engine replays dropout's RNG in a recompute, as torch's checkpoint does). The timed
steps run with the normal fast settings.

A mode that runs out of GPU memory is recorded (``oom``) and the next one runs; any other error is
recorded too (``error``) and makes the exit status 1. Each deltaswap mode closes its manager, and each
model's memory is freed before the next model is built.

Output: the JSON file ``--out`` and, per model, a markdown table (mode, activation peak, step time, x
plain, exact, predicted peak). ``--tiny`` builds CPU-sized configs (2 layers, d 32, short sequences,
small images) for the smoke test; on a CPU, budgets are byte counts, the activation peak counts the
bytes of the tensors created in the step and still alive (no allocator statistics there) and the step
times (wall clock) mean nothing. Bandwidths and host costs are measured by each manager.

Launch (wall times on one H200, torch 2.11, bf16, the default shapes)::

    python examples/bench_models.py --models gpt2 resnet50 --dtype bf16 --out out/models.json   # ~1.5 min
    python examples/bench_models.py --dtype bf16 --out out/models.json     # the 5 default models, ~4.5 min
    python examples/bench_models.py --models vit --dtype bf16 --out out/vit.json                # ~0.5 min
    python examples/bench_models.py --models resnet50 --rounds 2 --steps 8 --interleave --dtype bf16
    python examples/bench_models.py --models llama --batch-size 4 --seq-len 1024 --dtype bf16
    python examples/bench_models.py --models gpt2 t5 --batch-size gpt2=8 t5=16 --attn eager
    python examples/bench_models.py --tiny --dtype fp32 --models gpt2 resnet50 --steps 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from deltaswap.swap import ActivationManager, SwapConfig
from deltaswap.swap.discovery import describe_blocks, find_blocks

from benchmark import GiB, _plan_summary

MODELS = ("gpt2", "llama", "t5", "bert", "vit", "resnet50")
DEFAULT_MODELS = ("gpt2", "llama", "t5", "bert", "resnet50")
MODES = ("plain", "checkpoint", "ds_recompute", "ds_swap", "auto_fits", "auto_ckpt", "auto_mid")
DS_WARMUP = 3
"""Warm-up steps deltaswap needs before its steps represent the rest: profiling, first plan, re-plan."""
CACHE_MODELS = ("gpt2", "llama", "t5")
"""The models that keep a KV cache in their training forward (``use_cache`` defaults to True)."""
TINY_VOCAB = 128


# -- the models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The input shape of one model: batch size, and sequence length or image size."""

    batch: int
    seq: int = 0
    image: int = 0


def default_shape(name: str, tiny: bool) -> Shape:
    """The default input shape of model ``name``: big enough on a GPU that activations dominate the
    step's memory (``tiny``: a few milliseconds on a CPU)."""
    if tiny:
        return Shape(batch=2, seq=16 if name not in ("vit", "resnet50") else 0,
                     image={"vit": 16, "resnet50": 32}.get(name, 0))
    return {
        "gpt2": Shape(batch=16, seq=1024),
        "llama": Shape(batch=8, seq=2048),
        "t5": Shape(batch=32, seq=512),
        "bert": Shape(batch=32, seq=512),
        "vit": Shape(batch=64, image=224),
        "resnet50": Shape(batch=64, image=224),
    }[name]


Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch, bool], torch.Tensor]
"""``loss(model, batch, cache)``: the model's own loss; ``cache=False`` passes ``use_cache=False``."""


@dataclass
class Bench:
    """One model under test, with what every mode starts from."""

    name: str
    model: nn.Module
    loss: LossFn
    make_batch: Callable[[int, torch.Generator], Batch]
    """``make_batch(batch_size, generator)``: random inputs of the model's shape, on its device."""
    shape: Shape
    params: list[nn.Parameter] = field(default_factory=list)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """The weights (and buffers) every mode starts from."""

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def has_cache(self) -> bool:
        """Whether the model keeps a KV cache in its training forward (BERT's config has ``use_cache``
        too, for its decoder use, but the masked-LM forward keeps none)."""
        config = getattr(self.model, "config", None)
        return self.name in CACHE_MODELS and bool(getattr(config, "use_cache", False))

    def reset(self) -> None:
        """Back to the initial weights, no gradients, train mode."""
        self.model.load_state_dict(self.initial)
        self.model.zero_grad(set_to_none=True)
        self.model.train()


def _hf_config(name: str, tiny: bool, shape: Shape) -> Any:
    """The Hugging Face config of ``name``: the library's defaults (``tiny``: 2 layers of width 32)."""
    import transformers as tf

    small = {"vocab_size": TINY_VOCAB} if tiny else {}
    seq = shape.seq
    if name == "gpt2":
        shape = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": seq, "bos_token_id": 0,
                 "eos_token_id": 0} if tiny else {"n_positions": max(1024, seq)}
        return tf.GPT2Config(**small, **shape)
    if name == "llama":
        shape = ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1} if tiny else
                 {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                  "num_attention_heads": 32, "num_key_value_heads": 4})
        ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0} if tiny else {}
        return tf.LlamaConfig(**small, **shape, **ids, max_position_embeddings=max(2048, seq))
    if name == "t5":
        shape = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16} if tiny else {}
        # the token ids of the t5 checkpoints' configs (T5Config() leaves decoder_start_token_id unset)
        return tf.T5Config(**small, **shape, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if name == "bert":
        shape = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                 "intermediate_size": 64} if tiny else {}
        return tf.BertConfig(**small, **shape, max_position_embeddings=max(512, seq))
    if name == "vit":
        sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "patch_size": 4} if tiny else {}
        return tf.ViTConfig(**sizes, image_size=shape.image, num_labels=10 if tiny else 1000)
    raise ValueError(f"unknown model {name!r}")


def _hf_model(name: str, cfg: Any, attn: str) -> nn.Module:
    import transformers as tf

    auto = {"gpt2": tf.AutoModelForCausalLM, "llama": tf.AutoModelForCausalLM, "t5": tf.AutoModelForSeq2SeqLM,
            "bert": tf.AutoModelForMaskedLM, "vit": tf.AutoModelForImageClassification}[name]
    return auto.from_config(cfg, attn_implementation=attn)


def _with_cache(cache: bool) -> dict[str, bool]:
    return {} if cache else {"use_cache": False}


def _causal_lm_loss(model: nn.Module, batch: Batch, cache: bool) -> torch.Tensor:
    return model(input_ids=batch["ids"], labels=batch["ids"], **_with_cache(cache)).loss


def _seq2seq_loss(model: nn.Module, batch: Batch, cache: bool) -> torch.Tensor:
    return model(input_ids=batch["ids"], labels=batch["labels"], **_with_cache(cache)).loss


def _masked_lm_loss(model: nn.Module, batch: Batch, cache: bool) -> torch.Tensor:
    return model(input_ids=batch["ids"], labels=batch["ids"]).loss


def _vit_loss(model: nn.Module, batch: Batch, cache: bool) -> torch.Tensor:
    return model(pixel_values=batch["images"], labels=batch["labels"]).loss


def _resnet_loss(model: nn.Module, batch: Batch, cache: bool) -> torch.Tensor:
    return F.cross_entropy(model(batch["images"]), batch["labels"])


def _token_batch(vocab: int, seq: int, target: int, device: torch.device, size: int,
                 gen: torch.Generator) -> Batch:
    ids = torch.randint(2, vocab, (size, seq), generator=gen)
    labels = torch.randint(2, vocab, (size, target), generator=gen)
    return {"ids": ids.to(device), "labels": labels.to(device)}


def _image_batch(image: int, classes: int, device: torch.device, size: int, gen: torch.Generator) -> Batch:
    images = torch.randn(size, 3, image, image, generator=gen)
    labels = torch.randint(0, classes, (size,), generator=gen)
    return {"images": images.to(device), "labels": labels.to(device)}


def build(name: str, shape: Shape, *, tiny: bool, attn: str, device: torch.device) -> Bench:
    """Model ``name`` with random weights (seed 0), built on ``device``, and its loss and inputs."""
    torch.manual_seed(0)
    with torch.device(device):
        if name == "resnet50":
            import torchvision

            classes = 10 if tiny else 1000
            model: nn.Module = torchvision.models.resnet50(num_classes=classes)
            make = partial(_image_batch, shape.image, classes, device)
            return Bench(name, model.train(), _resnet_loss, make, shape)
        cfg = _hf_config(name, tiny, shape)
        model = _hf_model(name, cfg, attn).train()
    if name == "vit":
        make = partial(_image_batch, shape.image, cfg.num_labels, device)
        return Bench(name, model, _vit_loss, make, Shape(shape.batch, image=shape.image))
    target = max(4, shape.seq // 4) if name == "t5" else 0
    loss = {"gpt2": _causal_lm_loss, "llama": _causal_lm_loss, "t5": _seq2seq_loss,
            "bert": _masked_lm_loss}[name]
    return Bench(name, model, loss, partial(_token_batch, cfg.vocab_size, shape.seq, target, device), shape)


# -- measuring one step ------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages created under it that are still alive, and their peak: the
    activation peak on a CPU, which keeps no allocator statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_sparse:
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # torch keeps one Python object per storage while the storage lives
        if key in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


@dataclass
class StepMeasure:
    """One step's time and activation peak, filled in by :func:`measure_step`."""

    cuda: bool
    peak: int = 0
    ms: float = 0.0
    host_forward_ms: float = 0.0
    """Host time until the forward returned (no synchronization: on a host-bound step, the forward's)."""
    host_backward_ms: float = 0.0
    """Host time until ``backward()`` returned, from the forward's start."""
    _before: int = 0
    _live: LiveBytes | None = None

    def backward_done(self) -> None:
        """Read the activation peak: call right after ``loss.backward()``, before the optimizer step."""
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self._before
        elif self._live is not None:
            self._live.__exit__(None, None, None)
            self.peak, self._live = self._live.peak, None


@contextlib.contextmanager
def measure_step(device: torch.device) -> Iterator[StepMeasure]:
    """Measure the step run in the block: on CUDA the allocator's peak above what was allocated before
    and the time between two CUDA events; on a CPU :class:`LiveBytes` and the wall clock."""
    m = StepMeasure(cuda=device.type == "cuda")
    if m.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m._before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        m._live = LiveBytes()
        m._live.__enter__()
        t0 = time.perf_counter()
    try:
        yield m
    finally:
        if m._live is not None:  # the block raised before backward_done
            m._live.__exit__(None, None, None)
            m._live = None
    if m.cuda:
        end.record()
        end.synchronize()
        m.ms = start.elapsed_time(end)
    else:
        m.ms = (time.perf_counter() - t0) * 1e3


StepContext = Callable[[], contextlib.AbstractContextManager]


def train_step(bench: Bench, batch: Batch, context: StepContext, *, cache: bool, bf16: bool,
               optimizer: torch.optim.Optimizer | None) -> tuple[StepMeasure, float]:
    """One step (forward under ``context()``, backward, the optimizer's step if given): its measure
    and its loss."""
    bench.model.zero_grad(set_to_none=True)
    with measure_step(bench.device) as m:
        t0 = time.perf_counter()
        with context(), torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = bench.loss(bench.model, batch, cache)
        t1 = time.perf_counter()
        loss.backward()
        m.host_forward_ms, m.host_backward_ms = (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3
        m.backward_done()
        if optimizer is not None:
            optimizer.step()
    return m, loss.item()


# -- exactness ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic() -> Iterator[list[str]]:
    """Deterministic kernels, TF32 off, math attention; yields the list of warnings about ops without a
    deterministic implementation that ran in the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    found: list[str] = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        for w in caught:
            text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
            if "deterministic" not in text:  # the others as they would have shown
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif text not in found:
                found.append(text)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[2], old[3]
        torch.backends.cudnn.benchmark = old[4]


EXACT_SEED = 1234


def exact_steps(bench: Bench, batch: Batch, context: StepContext, *, cache: bool, bf16: bool,
                steps: int) -> int:
    """``steps`` steps without an optimizer (the weights stay the initial ones), each seeded alike;
    leaves the last step's gradients on the model and returns its activation peak."""
    peak = 0
    for _ in range(steps):
        torch.manual_seed(EXACT_SEED)
        m, _ = train_step(bench, batch, context, cache=cache, bf16=bf16, optimizer=None)
        peak = m.peak
    return peak


def grads(bench: Bench) -> list[torch.Tensor | None]:
    """A copy of every parameter's gradient."""
    return [None if p.grad is None else p.grad.detach().clone() for p in bench.params]


def grads_equal(bench: Bench, reference: list[torch.Tensor | None]) -> bool:
    """Whether every parameter's gradient is bitwise equal to ``reference``'s."""
    return all((p.grad is None) == (r is None) and (r is None or torch.equal(p.grad, r))
               for p, r in zip(bench.params, reference, strict=True))


# -- the modes ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_checkpointing(model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
    """Torch's per-block checkpointing (``use_reentrant=False``) of ``blocks`` inside the block."""
    ids = {id(b) for b in blocks}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_fn=checkpoint, use_reentrant=False),
        check_fn=lambda m: id(m) in ids,
    )
    try:
        yield
    finally:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, CheckpointWrapper) and id(child._checkpoint_wrapped_module) in ids:
                    setattr(parent, child_name, child._checkpoint_wrapped_module)


def auto_budget(mode: str, peaks: dict[str, int], device: torch.device) -> int | str | None:
    """The ``memory_budget`` of ``mode`` from the peaks measured before it (``None``: one is missing)."""
    if not mode.startswith("auto_"):
        return "auto"  # ds_swap and ds_recompute use every block's policy whatever the budget
    wanted = {"auto_fits": ("plain",), "auto_ckpt": ("checkpoint",),
              "auto_mid": ("plain", "checkpoint")}[mode]
    if not all(k in peaks for k in wanted):
        return None
    if mode == "auto_fits":
        far = max(2 * peaks["plain"], peaks["plain"] + GiB)
        if device.type == "cuda":
            far = min(far, torch.cuda.get_device_properties(device).total_memory)
        return far
    return sum(peaks[k] for k in wanted) // len(wanted)


@dataclass
class Settings:
    """What every mode of a run shares (from the command line)."""

    bf16: bool
    warmup: int
    steps: int
    exact_batch: int
    min_bytes: str
    rounds: int = 1
    """Times the modes run in turn; each round sets its mode up again and times ``steps`` steps."""
    interleave: bool = False
    """After the first round, time ``rounds x steps`` steps of every mode by turns, step by step, each
    mode on its own copy of the model (:func:`interleaved`), instead of round after round."""


@dataclass
class Session:
    """A mode's way of running a step: its step context, whether the model calls keep their KV cache,
    and deltaswap's manager for the deltaswap modes."""

    context: StepContext
    cache: bool
    manager: ActivationManager | None = None
    policy: str = ""
    min_bytes: str = ""
    budget_given: int | str = "auto"
    """The budget of the timed steps (``auto_*``: from the peaks measured before them)."""

    def budget(self, budget: int | str) -> None:
        """Plan for ``budget`` from the next step on (deltaswap's modes)."""
        self.budget_given = budget
        if self.manager is not None:
            config = SwapConfig(policy=self.policy, memory_budget=budget, min_bytes=self.min_bytes)
            self.manager.replan(config)


@contextlib.contextmanager
def session(mode: str, bench: Bench, blocks: list[nn.Module], min_bytes: str) -> Iterator[Session]:
    """Set the model up for ``mode`` from its initial weights; undo it (and close the manager) after."""
    bench.reset()
    if mode == "plain":
        yield Session(contextlib.nullcontext, cache=True)
    elif mode == "checkpoint":
        with torch_checkpointing(bench.model, blocks):
            yield Session(contextlib.nullcontext, cache=False)
    else:
        policy = mode.removeprefix("ds_") if mode.startswith("ds_") else "auto"
        mgr = ActivationManager(SwapConfig(policy=policy, min_bytes=min_bytes))
        mgr.wrap(bench.model)
        try:
            yield Session(mgr.step, cache=True, manager=mgr, policy=policy, min_bytes=min_bytes)
        finally:
            mgr.unwrap()
            mgr.close()
    bench.model.zero_grad(set_to_none=True)


@dataclass
class References:
    """The plain run's gradients on the exactness batch, and the peaks the ``auto_*`` budgets use."""

    plain: list[torch.Tensor | None] | None = None
    no_cache: list[torch.Tensor | None] | None = None
    timed_peaks: dict[str, int] = field(default_factory=dict)
    exact_peaks: dict[str, int] = field(default_factory=dict)


def check_exact(mode: str, bench: Bench, run: Session, refs: References,
                settings: Settings) -> dict[str, Any]:
    """The exactness check of ``mode`` (see the module docstring); sets the references when ``plain``."""
    batch = bench.make_batch(settings.exact_batch, torch.Generator().manual_seed(1))
    budget = auto_budget(mode, refs.exact_peaks, bench.device)
    out: dict[str, Any] = {"exact_budget": budget}
    if budget is None or (mode != "plain" and refs.plain is None):
        return out  # nothing to compare with (plain did not run, or ran out of memory)
    run.budget(budget)
    steps = DS_WARMUP + 1 if run.manager is not None else 1
    with deterministic() as nondeterministic:
        peak = exact_steps(bench, batch, run.context, cache=run.cache, bf16=settings.bf16, steps=steps)
        if mode == "plain":
            refs.plain = grads(bench)
            if bench.has_cache:
                exact_steps(bench, batch, run.context, cache=False, bf16=settings.bf16, steps=1)
                refs.no_cache = grads(bench)
            exact_steps(bench, batch, run.context, cache=True, bf16=settings.bf16, steps=1)  # once more
    refs.exact_peaks[mode] = peak
    assert refs.plain is not None
    out["exact"] = grads_equal(bench, refs.plain)
    if refs.no_cache is not None:
        out["exact_no_cache"] = grads_equal(bench, refs.no_cache)
    out["exact_peak_bytes"] = peak
    out["nondeterministic"] = nondeterministic
    if run.manager is not None:
        out["exact_step_profiling"] = run.manager.stats.profiling  # False: the compared step ran a plan
        plan = run.manager.plan
        out["exact_plan_modes"] = [b.mode.value for b in plan.blocks] if plan is not None else None
    bench.model.zero_grad(set_to_none=True)
    return out


class Timer:
    """The timed steps of one mode: its optimizer and batch, and what each recorded step measured."""

    def __init__(self, bench: Bench, run: Session, settings: Settings) -> None:
        self.bench, self.run, self.settings = bench, run, settings
        self.optimizer = torch.optim.AdamW(bench.params, lr=1e-4, fused=bench.device.type == "cuda")
        self.batch = bench.make_batch(bench.shape.batch, torch.Generator().manual_seed(0))
        self.warmup = max(settings.warmup, DS_WARMUP) if run.manager is not None else settings.warmup
        self.times: list[float] = []
        self.peaks: list[int] = []
        self.predicted_ms: list[float] = []
        self.measured_ms: list[float] = []
        self.forward_ms: list[float] = []
        self.loss = math.nan

    def step(self, *, record: bool = True) -> None:
        """One training step; its time and peak (and the manager's numbers) are kept if ``record``."""
        m, self.loss = train_step(self.bench, self.batch, self.run.context, cache=self.run.cache,
                                  bf16=self.settings.bf16, optimizer=self.optimizer)
        if not record:
            return
        self.times.append(m.ms)
        self.peaks.append(m.peak)
        if self.run.manager is not None:
            stats = self.run.manager.stats
            self.predicted_ms.append(stats.predicted_ms)
            self.measured_ms.append(stats.measured_ms)
            self.forward_ms.append(stats.forward_ms)

    def warm_up(self) -> None:
        for _ in range(self.warmup):
            self.step(record=False)

    def summary(self) -> dict[str, Any]:
        """Median and fastest step, all steps, the activation peak (and the manager's summary)."""
        peak = max(self.peaks)
        out = {"step_ms": statistics.median(self.times), "best_ms": min(self.times),
               "step_ms_all": list(self.times), "act_peak_bytes": peak, "act_peak_gib": peak / GiB,
               "loss": self.loss}
        if self.run.manager is not None:
            out.update(_manager_summary(self.run.manager, self.run.budget_given, self.predicted_ms,
                                        self.measured_ms, self.forward_ms))
        return out


def timer(mode: str, bench: Bench, run: Session, refs: References, settings: Settings) -> Timer | None:
    """A :class:`Timer` of ``mode``, its budget set from the peaks measured before it (``None``: one of
    them is missing)."""
    budget = auto_budget(mode, refs.timed_peaks, bench.device)
    if budget is None:
        return None
    run.budget(budget)
    return Timer(bench, run, settings)


def timed(mode: str, bench: Bench, run: Session, refs: References, settings: Settings) -> dict[str, Any]:
    """The timed steps of ``mode``: median step time and activation peak over the steps after warm-up."""
    t = timer(mode, bench, run, refs, settings)
    if t is None:
        return {"budget": None, "skipped": "needs the peaks of plain and checkpoint first"}
    t.warm_up()
    for _ in range(settings.steps):
        t.step()
    refs.timed_peaks[mode] = max(t.peaks)
    out = {"budget": run.budget_given, **t.summary()}
    del t
    return out


def interleaved(name: str, shape: Shape, modes: list[str], refs: References, settings: Settings, *,
                tiny: bool, attn: str, device: torch.device) -> dict[str, dict[str, Any]]:
    """Every mode's timed steps taken by turns, one step of each mode after the other's
    (``--interleave``), so that the host's changes of speed fall on every mode alike: each mode gets its
    own copy of the model (same seed, same weights), all set up at once and warmed up first; ``rounds x
    steps`` timed steps each. Budgets come from the peaks of the first, sequential round."""
    with contextlib.ExitStack() as stack:
        timers: dict[str, Timer] = {}
        for mode in modes:
            bench = build(name, shape, tiny=tiny, attn=attn, device=device)
            run = stack.enter_context(session(mode, bench, find_blocks(bench.model), settings.min_bytes))
            made = timer(mode, bench, run, refs, settings)
            if made is not None:
                timers[mode] = made
        for each in timers.values():
            each.warm_up()
        for _ in range(settings.rounds * settings.steps):
            for each in timers.values():
                each.step()
        out = {mode: {"budget": each.run.budget_given, **each.summary()} for mode, each in timers.items()}
        timers.clear()
    bench = run = made = each = None  # the loops' last ones would keep a model on the GPU
    free_memory()
    return out


def _manager_summary(mgr: ActivationManager, budget: int | str, predicted_ms: list[float],
                     measured_ms: list[float], forward_ms: list[float]) -> dict[str, Any]:
    plan, work = mgr.plan, mgr.workload
    assert plan is not None
    return {
        "predicted_peak_bytes": plan.predicted_peak,
        "predicted_peak_gib": plan.predicted_peak / GiB,
        "predicted_fwd_bwd_ms": sum(predicted_ms) / len(predicted_ms),
        "measured_fwd_bwd_ms": sum(measured_ms) / len(measured_ms),
        # what swapping alone could free: what PCIe carries while the forward runs
        "measured_forward_ms": statistics.median(forward_ms),
        "d2h_gbps": work.bandwidth.d2h_gbps if work is not None else math.nan,
        "blocks_planned": len(plan.blocks),
        "blocks": mgr.blocks_summary,
        "outside_share": plan.outside_share,
        "plan": _plan_summary(mgr, budget, show=False),
        "engine": asdict(mgr.stats.engine),
    }


def run_mode(mode: str, bench: Bench, blocks: list[nn.Module], refs: References,
             settings: Settings) -> dict[str, Any]:
    """``mode``'s exactness check and timed steps; an out-of-memory error or any other is recorded."""
    result: dict[str, Any] = {}
    try:
        with session(mode, bench, blocks, settings.min_bytes) as run:
            result.update(check_exact(mode, bench, run, refs, settings))
            result.update(timed(mode, bench, run, refs, settings))
    except torch.OutOfMemoryError as err:
        result["oom"] = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
    except Exception as err:  # recorded, and the exit status says so
        result["error"] = f"{type(err).__name__}: {err}"
    free_memory(bench)
    return result


def retime(mode: str, bench: Bench, blocks: list[nn.Module], refs: References,
           settings: Settings) -> dict[str, Any]:
    """Another round of ``mode``'s timed steps, set up anew (budgets from the first round's peaks)."""
    with session(mode, bench, blocks, settings.min_bytes) as run:
        result = timed(mode, bench, run, References(timed_peaks=dict(refs.timed_peaks)), settings)
    free_memory(bench)
    return result


def _ratio(results: dict[str, dict[str, Any]], mode: str) -> None:
    """Set ``mode``'s ``x_plain``: its median step time over plain's; and ``x_plain_best``: its fastest
    step over plain's fastest (a host that is busy now and then slows some steps of every mode)."""
    plain = results.get("plain", {})
    if "step_ms" in results[mode] and plain.get("step_ms"):
        results[mode]["x_plain"] = results[mode]["step_ms"] / plain["step_ms"]
        results[mode]["x_plain_best"] = results[mode]["best_ms"] / plain["best_ms"]


def free_memory(bench: Bench | None = None) -> None:
    """Drop gradients and cached GPU memory."""
    if bench is not None:
        bench.model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- a model, the run ----------------------------------------------------------------------------------
def bench_model(name: str, shape: Shape, modes: list[str], settings: Settings, *, tiny: bool, attn: str,
                device: torch.device) -> dict[str, Any]:
    """Every mode of model ``name``, in order; the model's memory is freed before it returns."""
    bench = build(name, shape, tiny=tiny, attn=attn, device=device)
    named = {id(m): n for n, m in bench.model.named_modules()}
    blocks = find_blocks(bench.model)
    out: dict[str, Any] = {
        "class": type(bench.model).__name__,
        "params": sum(p.numel() for p in bench.params),
        "shape": asdict(bench.shape),
        "exact_batch": settings.exact_batch,
        "kv_cache": bench.has_cache,
        "blocks": describe_blocks([named[id(b)] for b in blocks], blocks),
        "n_blocks": len(blocks),
        "modes": {},
    }
    print(f"\n{name}: {out['class']}, {out['params'] / 1e6:.1f}M params, {asdict(bench.shape)}, "
          f"blocks {out['blocks']}", flush=True)
    refs = References()
    for mode in modes:
        result = run_mode(mode, bench, blocks, refs, settings)
        out["modes"][mode] = result
        _ratio(out["modes"], mode)
        print(f"  {mode:<13}{_one_line(result)}", flush=True)
    timed_modes = [m for m in modes if "step_ms" in out["modes"][m]]  # not those that failed or were skipped
    if settings.interleave and timed_modes:
        del bench, blocks  # the copies of the model that the modes get take its place
        free_memory()
        try:
            turns = interleaved(name, shape, timed_modes, refs, settings, tiny=tiny, attn=attn,
                                device=device)
        except torch.OutOfMemoryError:  # a copy of the model per mode does not fit: the first round stays
            free_memory()
            out["interleave_oom"] = True
            print("  interleaved: out of memory with a copy of the model per mode; the first round's "
                  "times stand", flush=True)
            return out
        for mode, more in turns.items():  # the first round's times are kept beside the interleaved ones
            out["modes"][mode].update(sequential_ms=out["modes"][mode]["step_ms"], timing="interleaved",
                                      **{k: more[k] for k in ("step_ms", "best_ms", "step_ms_all")})
        print(f"  interleaved, step by step (median of {settings.rounds * settings.steps} steps):")
        for mode in modes:
            _ratio(out["modes"], mode)
            print(f"  {mode:<13}{_one_line(out['modes'][mode])}", flush=True)
        return out
    for _ in range(1, settings.rounds):
        for mode in modes:
            result = out["modes"][mode]
            if "step_ms" in result:
                more = retime(mode, bench, blocks, refs, settings)
                result.setdefault("round_ms", [result["step_ms"]])  # the first round's median
                result["round_ms"].append(more["step_ms"])
                result["step_ms_all"] += more["step_ms_all"]
                result["step_ms"] = statistics.median(result["step_ms_all"])
                result["best_ms"] = min(result["step_ms_all"])
    if settings.rounds > 1:
        print(f"  after {settings.rounds} rounds (median of {settings.rounds * settings.steps} steps):")
        for mode in modes:
            _ratio(out["modes"], mode)
            print(f"  {mode:<13}{_one_line(out['modes'][mode])}", flush=True)
    del bench, blocks, refs
    free_memory()
    return out


def _one_line(r: dict[str, Any]) -> str:
    for key in ("oom", "error", "skipped"):
        if key in r:
            return f"{key}: {r[key]}"
    line = (f"step {r['step_ms']:9.1f} ms  x plain {r.get('x_plain', math.nan):6.3f} (best "
            f"{r.get('x_plain_best', math.nan):5.3f})  act peak "
            f"{r['act_peak_gib']:9.4g} GiB  exact {r.get('exact')}")
    if "predicted_peak_bytes" in r:
        budget = r["budget"] / GiB if isinstance(r["budget"], int) else math.nan
        line += (f"  predicted peak {r['predicted_peak_gib']:.6g} GiB (budget {budget:.6g}), f+b "
                 f"{r['predicted_fwd_bwd_ms']:.1f} ms predicted, {r['measured_fwd_bwd_ms']:.1f} measured")
    return line


def markdown_table(name: str, result: dict[str, Any]) -> str:
    """Model ``name``'s modes as a markdown table."""
    lines = [f"### {name} ({result['class']}, {result['params'] / 1e6:.1f}M params, {result['shape']})", "",
             "| mode | activation peak GiB | step ms | x plain step | x plain, best steps | exact "
             "| predicted peak GiB |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for mode, r in result["modes"].items():
        if "step_ms" not in r:
            note = next((f"{k}: {r[k]}" for k in ("oom", "error", "skipped") if k in r), "")
            lines.append(f"| {mode} | {note[:80]} | | | | {_exact_text(r)} | |")
            continue
        predicted = f"{r['predicted_peak_gib']:.4g}" if "predicted_peak_gib" in r else ""
        lines.append(f"| {mode} | {r['act_peak_gib']:.4g} | {r['step_ms']:.1f} "
                     f"| {r.get('x_plain', math.nan):.3f} | {r.get('x_plain_best', math.nan):.3f} "
                     f"| {_exact_text(r)} | {predicted} |")
    if any("exact_no_cache" in r for r in result["modes"].values()):
        lines += ["", "exact: vs plain with the config's use_cache=True; (no-cache: ...) vs plain with "
                      "use_cache=False"]
    return "\n".join(lines)


def _exact_text(r: dict[str, Any]) -> str:
    if "exact" not in r:
        return ""
    text = "yes" if r["exact"] else "no"
    if "exact_no_cache" in r:
        text += f" (no-cache: {'yes' if r['exact_no_cache'] else 'no'})"
    return text


def _per_model(values: list[str] | None, kind: type = int) -> dict[str, Any]:
    """``--batch-size 16`` (every model) or ``--batch-size gpt2=16 resnet50=64``, as ``{model: value}``
    (key ``"*"`` for every model)."""
    out: dict[str, Any] = {}
    for value in values or []:
        name, _, number = value.rpartition("=")
        if name and name not in MODELS:
            raise SystemExit(f"unknown model {name!r} in {value!r}: one of {', '.join(MODELS)}")
        out[name or "*"] = kind(number)
    return out


def model_shape(name: str, args: argparse.Namespace) -> Shape:
    """Model ``name``'s input shape: its default, with what the command line gave."""
    base = default_shape(name, args.tiny)
    pick = {k: _per_model(getattr(args, k)) for k in ("batch_size", "seq_len", "image_size")}
    return Shape(batch=pick["batch_size"].get(name, pick["batch_size"].get("*", base.batch)),
                 seq=pick["seq_len"].get(name, pick["seq_len"].get("*", base.seq)),
                 image=pick["image_size"].get(name, pick["image_size"].get("*", base.image)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="a subset of the modes (always run in the default order)")
    per = "N for every model, or MODEL=N for one (default: per model, see default_shape)"
    parser.add_argument("--batch-size", nargs="+", default=None, metavar="[MODEL=]N", help=per)
    parser.add_argument("--seq-len", nargs="+", default=None, metavar="[MODEL=]N", help=per)
    parser.add_argument("--image-size", nargs="+", default=None, metavar="[MODEL=]N", help=per)
    parser.add_argument("--exact-batch-size", type=int, default=2,
                        help="samples in the exactness check's batch (0: the timed batch)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs (2 layers, width 32)")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="bf16: autocast")
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"), help="HF attn_implementation")
    parser.add_argument("--warmup", type=int, default=DS_WARMUP,
                        help=f"warm-up steps of every mode (deltaswap's: at least {DS_WARMUP})")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the modes in turn this many times (each set up anew) and take the median "
                             "of all their timed steps: on models whose step is host-bound, the host's "
                             "speed drifts by 10%% and more over a run")
    parser.add_argument("--interleave", action="store_true",
                        help="after the first round, time rounds x steps steps of every mode by turns, "
                             "step by step, each mode on its own copy of the model (memory: one model, "
                             "its gradients and AdamW state per mode): the host's changes of speed then "
                             "fall on every mode alike")
    parser.add_argument("--min-bytes", default="1MiB", help="deltaswap's min_bytes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="bench_models.json", help="where to write the JSON results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # before CUDA starts, for the deterministic cuBLAS of the exactness check
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be at least 1")
    modes = [m for m in MODES if m in args.modes]
    import transformers

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}  "
          f"torch {torch.__version__}  transformers {transformers.__version__}  {args.dtype}  "
          f"attn {args.attn}", flush=True)
    results: dict[str, Any] = {}
    for name in args.models:
        shape = model_shape(name, args)
        settings = Settings(bf16=args.dtype == "bf16", warmup=args.warmup, steps=args.steps,
                            exact_batch=args.exact_batch_size or shape.batch, min_bytes=args.min_bytes,
                            rounds=args.rounds, interleave=args.interleave)
        results[name] = bench_model(name, shape, modes, settings, tiny=args.tiny, attn=args.attn,
                                    device=device)
        print("\n" + markdown_table(name, results[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
        "attn": args.attn, "tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
        "rounds": args.rounds, "interleave": args.interleave,
        "modes": modes, "models": results,
    }, indent=2))
    print(f"\nwrote {args.out}")
    failed = [f"{n}/{m}" for n, r in results.items() for m, x in r["modes"].items() if "error" in x]
    if failed:
        print(f"errors in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
