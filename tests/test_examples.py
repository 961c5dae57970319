"""The examples: the chunked loss of gpt.py, train_gpt.py (the main job) and max_batch.py's search."""

from __future__ import annotations

import argparse
import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import accelerate_gpt
import cli
import max_batch
import train_gpt
from gpt import GPT, GPTConfig, random_batch

SMALL = GPTConfig(vocab_size=97, seq_len=32, n_layer=2, n_head=2, d_model=32)


def logged_losses(log_dir: Path) -> tuple[list[float], list[str]]:
    """The ``train_loss`` values of a run's metrics.csv, in step order, and the file's columns."""
    (path,) = log_dir.rglob("metrics.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    losses = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    return [loss for _, loss in sorted(losses)], list(rows[0])


# -- gpt.py: the chunked loss ------------------------------------------------------------------------
def _loss_and_grads(
    cfg: GPTConfig, state: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = GPT(cfg)
    model.load_state_dict(state)
    tokens, targets = random_batch(cfg, 5, "cpu", torch.Generator().manual_seed(1))
    loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("chunk", [1, 7, 32, 100, 160, 1000])  # 160 = batch x seq: one chunk
def test_chunked_loss_equals_the_unchunked_loss_and_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    state = GPT(SMALL).state_dict()
    loss, grads = _loss_and_grads(SMALL, state)
    chunked_loss, chunked_grads = _loss_and_grads(dataclasses.replace(SMALL, loss_chunk=chunk), state)
    # fp32 on the CPU: only the order of the additions differs
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grads, grads, rtol=1e-4, atol=1e-6)


def saved_logits(model: GPT, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The loss, and the row counts of the tensors with a vocabulary-sized last dimension that autograd
    keeps for the backward pass."""
    rows: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and t.shape[-1] == model.cfg.vocab_size and not isinstance(t, torch.nn.Parameter):
            rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, targets)
    return loss, rows


def test_chunked_loss_computes_one_chunks_logits_at_a_time_and_keeps_none() -> None:
    cfg = dataclasses.replace(SMALL, loss_chunk=16)
    tokens, targets = random_batch(cfg, 5, "cpu", torch.Generator().manual_seed(1))
    _, unchunked_rows = saved_logits(GPT(SMALL), tokens, targets)
    assert tokens.numel() in unchunked_rows                          # the unchunked loss keeps all logits

    model = GPT(cfg)
    computed: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, out: computed.append(out.shape[0]))
    loss, rows = saved_logits(model, tokens, targets)
    n_chunks = tokens.numel() // cfg.loss_chunk
    assert rows == []                                                 # no logits kept for the backward
    assert computed == [cfg.loss_chunk] * n_chunks                    # forward: chunk by chunk
    loss.backward()
    assert computed == [cfg.loss_chunk] * (2 * n_chunks)              # backward: recomputed chunk by chunk


def test_loss_chunk_defaults_to_the_unchunked_loss() -> None:
    assert GPTConfig().loss_chunk == 0
    model = GPT(SMALL)
    tokens, targets = random_batch(SMALL, 2, "cpu", torch.Generator().manual_seed(1))
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, SMALL.vocab_size), targets.reshape(-1))
    assert torch.equal(model(tokens, targets), expected)


# -- train_gpt.py ------------------------------------------------------------------------------------
def test_train_gpt_default_trains_with_deltaswap_and_the_loss_falls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train_gpt.main(["--max-steps", "40", "--log-every", "5", "--log-dir", str(tmp_path)]) == 0
    losses, columns = logged_losses(tmp_path)
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses                      # from ~6 (ln 512) to under 3
    assert any(c.startswith("deltaswap/") for c in columns)          # SwapMonitor's metrics are logged
    out = capsys.readouterr().out
    assert "final loss" in out and "tokens/s" in out and "samples/s" in out
    assert "deltaswap plan: policy auto" in out and "deltaswap stats:" in out


def test_train_gpt_plain_trains_without_deltaswap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_gpt.main(["--strategy", "plain", "--max-steps", "6", "--log-every", "2",
                           "--log-dir", str(tmp_path)]) == 0
    losses, columns = logged_losses(tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not any(c.startswith("deltaswap/") for c in columns)
    assert "deltaswap plan" not in capsys.readouterr().out


def test_train_gpt_fsdp_picks_the_fsdp_strategies_with_blocks_as_units() -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from deltaswap.strategy import SwapFSDPStrategy

    args = argparse.Namespace(fsdp=True, strategy="deltaswap", devices=2, memory_budget="12GiB",
                              policy="swap")
    ours = train_gpt.training_strategy(args)
    assert isinstance(ours, SwapFSDPStrategy)
    assert ours.swap_config.memory_budget == 12 << 30 and ours.swap_config.policy == "swap"
    plain = train_gpt.training_strategy(argparse.Namespace(**{**vars(args), "strategy": "plain"}))
    assert type(plain) is FSDPStrategy
    for strategy in (ours, plain):
        assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs FSDP")
def test_train_gpt_fsdp_without_cuda_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_gpt.main(["--fsdp"])
    assert "--fsdp: Lightning's FSDP trains on CUDA GPUs" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the attention backward is not deterministic")
def test_train_gpt_deltaswap_and_plain_log_the_same_losses(tmp_path: Path) -> None:
    common = ["--max-steps", "12", "--log-every", "3", "--seed", "3"]
    for strategy in ("plain", "deltaswap"):
        assert train_gpt.main([*common, "--strategy", strategy, "--log-dir", str(tmp_path / strategy)]) == 0
    plain, _ = logged_losses(tmp_path / "plain")
    swapped, _ = logged_losses(tmp_path / "deltaswap")
    assert len(plain) == 4
    torch.testing.assert_close(swapped, plain, rtol=1e-6, atol=0.0)


def printed_losses(out: str) -> list[float]:
    return [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_accelerate_gpt_default_trains_with_the_plugin_and_the_loss_falls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert accelerate_gpt.main(["--max-steps", "40", "--log-every", "5"]) == 0
    out = capsys.readouterr().out
    losses = printed_losses(out)
    assert len(losses) == 9 and losses[-1] < 0.5 * losses[0], losses
    assert "samples/s" in out and "policy auto" in out and "ManagerStats" in out


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_accelerate_gpt_plain_prints_the_same_losses(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--max-steps", "12", "--log-every", "3", "--grad-accum", "2", "--clip", "1.0"]
    losses = {}
    for strategy in ("plain", "deltaswap"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        assert accelerate_gpt.main([*common, "--strategy", strategy]) == 0
        losses[strategy] = printed_losses(capsys.readouterr().out)
    assert len(losses["plain"]) == 5 and losses["plain"] == losses["deltaswap"]


@pytest.mark.parametrize(("text", "expected"), [("auto", "auto"), ("0.6", 0.6), ("12GiB", "12GiB"),
                                                ("1000000", 1000000)])
def test_memory_budget_argument(text: str, expected: int | float | str) -> None:
    for example in (train_gpt, accelerate_gpt, max_batch):
        assert example.parse_args(["--memory-budget", text]).memory_budget == expected


@pytest.mark.parametrize("bad", ["1.5", "0", "12 gigs"])
def test_memory_budget_argument_rejects_what_swapconfig_rejects(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.memory_budget(bad)
    for example in (train_gpt, accelerate_gpt, max_batch):
        with pytest.raises(SystemExit):
            example.parse_args(["--memory-budget", bad])
        assert "memory_budget" in capsys.readouterr().err


# -- max_batch.py ------------------------------------------------------------------------------------
def counting(threshold: int) -> tuple[Callable[[int], bool], list[int]]:
    """``fits(b) = b <= threshold``, recording every batch size it is asked about."""
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= threshold

    return fits, calls


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 37, 64, 65, 100, 511, 1023])
@pytest.mark.parametrize("start", [1, 3])
def test_largest_batch_finds_the_exact_threshold(threshold: int, start: int) -> None:
    fits, calls = counting(threshold)
    expected = threshold if threshold >= start else 0
    assert max_batch.largest_batch(fits, start=start, limit=1024) == expected
    assert len(calls) == len(set(calls))                              # each batch tried once
    assert len(calls) <= 2 * 10 + 2                                   # doubling, then bisection


def test_largest_batch_doubles_then_bisects() -> None:
    fits, calls = counting(37)
    assert max_batch.largest_batch(fits, start=1, limit=1024) == 37
    assert calls == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


def test_largest_batch_returns_zero_when_start_fails() -> None:
    fits, calls = counting(3)
    assert max_batch.largest_batch(fits, start=4, limit=1024) == 0
    assert calls == [4]


@pytest.mark.parametrize(("threshold", "limit", "expected"), [(5000, 1000, 1000), (5000, 1024, 1024),
                                                               (700, 1000, 700), (1, 1, 1)])
def test_largest_batch_never_passes_the_limit(threshold: int, limit: int, expected: int) -> None:
    fits, calls = counting(threshold)
    assert max_batch.largest_batch(fits, start=1, limit=limit) == expected
    assert max(calls) <= limit


@pytest.mark.parametrize(("start", "limit"), [(0, 8), (9, 8)])
def test_largest_batch_rejects_an_empty_range(start: int, limit: int) -> None:
    with pytest.raises(ValueError, match="start"):
        max_batch.largest_batch(lambda b: True, start=start, limit=limit)


def test_search_and_summary_compare_deltaswap_with_plains_best(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = {"plain": 14, "deltaswap": 100}

    def speed(strategy: str, batch: int) -> float:  # plain is fastest at batch 8, not at its largest
        return (10.0 * batch if batch <= 8 else 70.0) if strategy == "plain" else 60.0

    def fake_trial(cfg: GPTConfig, strategy: str, batch: int, args: argparse.Namespace) -> max_batch.Trial:
        fits = batch <= limits[strategy]
        return max_batch.Trial(batch, fits, samples_per_s=speed(strategy, batch) if fits else 0.0,
                               peak_gib=min(80.0, 0.5 * batch))

    monkeypatch.setattr(max_batch, "run_trial", fake_trial)
    args = max_batch.parse_args([])
    results = [max_batch.search(SMALL, strategy, args) for strategy in ("plain", "deltaswap")]
    assert [r.max_batch for r in results] == [14, 100]
    assert [t.batch for t in results[0].trials] == [1, 2, 4, 8, 16, 12, 14, 15]

    summary = max_batch.summarize(results, max_batch.model_state(SMALL), total_gib=80.0)
    plain = summary["strategies"]["plain"]
    assert plain == {"max_batch": 14, "samples_per_s_at_max": 70.0, "best_samples_per_s": 80.0,
                     "best_batch": 8, "peak_gib_at_max": 7.0}
    assert summary["max_batch_ratio"] == pytest.approx(100 / 14)
    assert summary["speed_ratio"] == pytest.approx(60.0 / 80.0)
    out = capsys.readouterr().out
    assert "max batch 7.14x" in out and "0.750x" in out and "AdamW states" in out


def test_max_batch_without_cuda_says_so_and_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert max_batch.main([]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_benchmark_fsdp_models_train_as_the_model_does_under_fsdp_and_its_checkpointing() -> None:
    """benchmark.py --fsdp's two wrappers of one model (plain FSDP, and FSDP with its activation
    checkpointing of every block, as Lightning applies it) and deltaswap planning the blocks inside the
    FSDP units give the model's own gradients (CPU, a process group of one over gloo)."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    from deltaswap.swap import ActivationManager, SwapConfig

    import benchmark

    torch.manual_seed(0)
    model = GPT(SMALL)
    x, y = random_batch(SMALL, 2, "cpu", torch.Generator().manual_seed(0))
    model(x, y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP of one rank: NO_SHARD; deltaswap on a CPU: no swapping
        net, peer, started = benchmark.fsdp_models(model, torch.device("cpu"))
        try:
            assert sum(isinstance(m, FullyShardedDataParallel) for m in net.modules()) == SMALL.n_layer + 1
            assert sum(isinstance(m, CheckpointWrapper) for m in peer.modules()) == SMALL.n_layer
            mgr = ActivationManager(SwapConfig(policy="recompute", min_bytes=0))
            mgr.wrap(net)
            assert len(mgr.blocks) == SMALL.n_layer
            for wrapped, ctx in ((peer, None), (net, None), (net, mgr), (net, mgr)):
                wrapped.zero_grad(set_to_none=True)
                with ctx.step() if ctx is not None else torch.enable_grad():
                    loss = wrapped(x, y)
                loss.backward()
                for a, b in zip(expected, [p.grad for p in wrapped.parameters()], strict=True):
                    torch.testing.assert_close(b, a, rtol=0, atol=0)
        finally:
            if started:
                dist.destroy_process_group()
