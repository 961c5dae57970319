"""The Lightning callbacks on CPU: SwapMonitor writes its documented keys on its logging steps only (no
predictions for the profiling step), SwapPlanSummary prints each new plan once as a table, format_plan
lays a plan out, plot_timeline writes a PNG, MemoryTimeline needs matplotlib and records nothing on a
CPU; each warns once with another strategy."""

from __future__ import annotations

import ast
import csv
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import deltaswap.callbacks
from deltaswap.callbacks import MemoryTimeline, SwapMonitor, SwapPlanSummary, format_plan, plot_timeline
from deltaswap.callbacks.monitor import KEYS
from deltaswap.strategy import SwapDDPStrategy, SwapStrategy
from deltaswap.swap import Plan, format_bytes
from deltaswap.swap.config import UNLIMITED
from deltaswap.swap.planner import (
    checkpoint_block,
    keep_block,
    make_plan,
    plan_manual,
    swap_block,
)
from deltaswap.swap.recompute import OpDecision

from helpers import MB
from helpers import synthetic_workload as workload
from lightning_helpers import CFG, LitGPT, fit

BLOCK_NAMES = [f"model.blocks.{i}" for i in range(CFG.n_layer)]
GIB = 2**30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fit_and_catch(strategy: Any, root: Path, callbacks: list[Callback], **kwargs: Any
                  ) -> tuple[L.Trainer, list[str]]:
    """Fit the small GPT on CPU with ``callbacks``; returns the trainer and every warning's message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(strategy, root, callbacks=callbacks, enable_checkpointing=False, **kwargs)
    return trainer, [str(w.message) for w in caught]


def logged_rows(trainer: L.Trainer) -> dict[int, dict[str, float]]:
    """The CSV logger's metrics: step -> {key: value} for the values logged at that step."""
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    rows: dict[int, dict[str, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v != ""})
    return rows


class LogCollector(logging.Handler):
    """The messages of one logger (and its children), each exactly once."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_info() -> Iterator[LogCollector]:
    """What ``rank_zero_info`` prints."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    collector = LogCollector()
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)


class PlanRecorder(Callback):
    """The strategy's plan, and its table, at the end of every training batch."""

    def __init__(self) -> None:
        self.plans: list[tuple[Plan | None, str | None]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, SwapStrategy) and strategy.manager is not None
        plan, manager = strategy.plan, strategy.manager
        text = None if plan is None else format_plan(plan, manager.block_names, manager.workload)
        self.plans.append((plan, text))


def table_rows(text: str) -> list[list[str]]:
    """The cells of the block rows of a :func:`format_plan` table."""
    return [[cell.strip() for cell in line.split("|")] for line in text.splitlines()
            if re.match(r"^\d+ +\|", line)]


# -- SwapMonitor ------------------------------------------------------------------------------------------
def test_monitor_logs_every_documented_key_with_the_plan_values(tmp_path: Path) -> None:
    trainer, caught = fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [SwapMonitor()],
                                    logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert not [m for m in caught if "SwapMonitor" in m]
    plan = trainer.strategy.plan  # type: ignore[attr-defined]
    assert plan is not None and plan.recompute_ops > 0
    rows = logged_rows(trainer)
    assert sorted(rows) == [0, 1, 2, 3]
    last = {k: v for k, v in rows[3].items() if k.startswith("deltaswap/")}
    # every key but the measured peak, which needs CUDA
    assert set(last) == set(KEYS) - {"deltaswap/peak_activation_gib"}
    assert last["deltaswap/recomputed_ops"] == plan.recompute_ops
    assert last["deltaswap/recompute_ms_predicted"] == pytest.approx(plan.recompute_ms, rel=1e-6)
    assert last["deltaswap/recompute_ms_predicted"] > 0
    assert last["deltaswap/predicted_step_ms"] == pytest.approx(plan.predicted_ms, rel=1e-6)
    assert last["deltaswap/predicted_step_ms"] > 0
    assert last["deltaswap/predicted_peak_gib"] == pytest.approx(plan.predicted_peak / GIB, rel=1e-6)
    assert last["deltaswap/step_ms"] > 0
    for key in ("offloaded_gib", "d2h_gbps", "h2d_gbps", "stall_ms"):  # a CPU swaps nothing
        assert last[f"deltaswap/{key}"] == 0.0
    # the profiling step: measured values only
    assert rows[0]["deltaswap/step_ms"] > 0 and "deltaswap/offloaded_gib" in rows[0]
    assert not any(k in rows[0] for k in ("deltaswap/predicted_step_ms", "deltaswap/recomputed_ops"))
    for step in (1, 2):
        assert rows[step]["deltaswap/recomputed_ops"] == plan.recompute_ops
        assert rows[step]["deltaswap/predicted_step_ms"] > 0


def test_monitor_logs_every_logging_interval_steps_and_nothing_between(tmp_path: Path) -> None:
    trainer, _ = fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [SwapMonitor(logging_interval=2)],
                               logger=CSVLogger(tmp_path), log_every_n_steps=1)
    rows = logged_rows(trainer)
    assert all("train_loss" in rows[step] for step in range(4))  # Lightning wrote every step
    assert [step for step in sorted(rows) if "deltaswap/offloaded_gib" in rows[step]] == [1, 3]


def test_monitor_logs_once_per_optimizer_step_when_accumulating(tmp_path: Path) -> None:
    trainer, _ = fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [SwapMonitor()], max_steps=2,
                               accumulate_grad_batches=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert trainer.global_step == 2
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:  # type: ignore[union-attr, arg-type]
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["deltaswap/offloaded_gib"] != ""]
    assert steps == [0, 1]


def test_monitor_needs_a_logger(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"SwapMonitor .* no logger"):
        fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [SwapMonitor()], logger=False)
    with pytest.raises(ValueError, match="logging_interval"):
        SwapMonitor(logging_interval=0)


def test_the_callbacks_take_the_ddp_strategy_too() -> None:
    """Each callback watches any deltaswap strategy (they share ``manager``, ``plan`` and ``stats``)."""
    strategy = SwapDDPStrategy(policy="recompute")
    trainer = SimpleNamespace(strategy=strategy)
    for callback in (SwapMonitor(), SwapPlanSummary()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.on_fit_start(trainer, None)  # type: ignore[arg-type]
        assert callback._strategy is strategy


def test_another_strategy_gets_one_warning_from_each_callback_and_no_keys(tmp_path: Path) -> None:
    timeline = MemoryTimeline(step=0, dirpath=tmp_path / "plots")
    trainer, caught = fit_and_catch("auto", tmp_path, [SwapMonitor(), SwapPlanSummary(), timeline],
                                    logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert len([m for m in caught if "SwapMonitor has nothing to monitor" in m]) == 1
    assert len([m for m in caught if "SwapPlanSummary has no plan" in m]) == 1
    assert len([m for m in caught if "MemoryTimeline has nothing to record" in m]) == 1
    rows = logged_rows(trainer)
    assert sorted(rows) == [0, 1, 2, 3] and all("train_loss" in row for row in rows.values())
    assert not [k for row in rows.values() for k in row if k.startswith("deltaswap/")]
    assert not (tmp_path / "plots").exists() and timeline.measured == []


# -- SwapPlanSummary ---------------------------------------------------------------------------------------
def test_plan_summary_prints_each_new_plan_once_as_a_table(tmp_path: Path,
                                                            lightning_info: LogCollector) -> None:
    recorder = PlanRecorder()
    fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [SwapPlanSummary(), recorder])
    printed = [m.removeprefix("deltaswap plan:\n") for m in lightning_info.messages
               if m.startswith("deltaswap plan:")]
    def decisions(plan: Plan) -> tuple:
        return tuple((b.mode, b.decisions, b.swap_input) for b in plan.blocks), plan.budget, plan.policy

    expected, last = [], None
    for plan, text in recorder.plans:
        if plan is not None and (last is None or decisions(plan) != last):
            expected.append(text)
            last = decisions(plan)
    assert len(recorder.plans) == 4 and len(expected) == 1  # a re-plan that only re-times is not printed
    assert printed == expected
    rows = table_rows(printed[-1])
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert [r[1] for r in rows] == BLOCK_NAMES
    assert [r[2] for r in rows] == ["checkpoint"] * 4
    assert all(r[5] not in ("-", "0 B") for r in rows), "a checkpointed block recomputes something"
    assert re.search(r"^ *\| Total", printed[-1], re.MULTILINE)
    assert "no limit" in printed[-1]  # no budget given on a CPU


def test_format_plan_lays_out_every_mode_with_totals() -> None:
    work = workload(n=4)
    plan = plan_manual(work, [
        keep_block(work.blocks[0]),
        swap_block(work.blocks[1]),
        checkpoint_block(work.blocks[2], {2: OpDecision.KEEP}),  # keeps its input and the first matmul
        checkpoint_block(work.blocks[3], {}, swap_input=True),  # swaps its input, recomputes all
    ], budget=2000 * MB)
    text = format_plan(plan, ["blocks.0", "blocks.1", "blocks.2", "blocks.3"], work)
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [["0", "blocks.0", "keep"], ["1", "blocks.1", "swap"],
                                     ["2", "blocks.2", "checkpoint"], ["3", "blocks.3", "checkpoint+in"]]
    assert [r[3] for r in rows] == [format_bytes(n * MB) for n in (300, 0, 150, 0)]  # kept
    assert [r[4] for r in rows] == [format_bytes(n * MB) for n in (0, 300, 0, 50)]  # swapped
    assert [r[5] for r in rows] == [format_bytes(n * MB) for n in (0, 0, 150, 250)]  # recomputed
    assert [r[6] for r in rows] == ["0.00", "0.00", "1.40", "2.40"]  # recompute ms
    total = next(line for line in text.splitlines() if "| Total" in line)
    assert [c.strip() for c in total.split("|")][3:] == [format_bytes(450 * MB), format_bytes(350 * MB),
                                                         format_bytes(400 * MB), "3.80"]
    footer = text.splitlines()[-6:]
    assert footer[0].split() == ["manual", "Policy"]
    assert footer[1].split()[0] == str(plan.recompute_ops)
    assert footer[2].startswith(format_bytes(2000 * MB)) and footer[2].endswith("Budget")
    assert footer[3].startswith(format_bytes(plan.predicted_peak))
    assert footer[4].startswith(f"{plan.predicted_ms:.1f} ms")
    assert footer[5].startswith(f"{plan.predicted_ms / plan.plain_ms:.3f}x")
    assert plan.predicted_ms > plan.plain_ms  # the ratio shows the cost: above 1.000x


def test_format_plan_of_an_auto_plan_has_one_row_per_block_call() -> None:
    work = workload(n=6)
    plan = make_plan(work, "auto", budget=1500 * MB)
    modes = [b.mode.value + ("+in" if b.swap_input else "") for b in plan.blocks]
    assert len(set(modes)) > 1, "the budget should make a mixed plan"
    text = format_plan(plan, [f"layer{i}" for i in range(6)], work)
    rows = table_rows(text)
    assert [r[1] for r in rows] == [f"layer{i}" for i in range(6)]
    assert [r[2] for r in rows] == modes
    assert [r[3] for r in rows] == [format_bytes(b.kept_bytes) for b in plan.blocks]
    assert [r[4] for r in rows] == [format_bytes(b.swapped_bytes) for b in plan.blocks]


def test_format_plan_without_workload_or_names_shows_dashes() -> None:
    work = workload(n=2)
    plan = plan_manual(work, [checkpoint_block(c, {}) for c in work.blocks], budget=UNLIMITED)
    text = format_plan(plan, ["only.one"], None)
    rows = table_rows(text)
    assert [r[1] for r in rows] == ["only.one", "-"]
    assert [r[5] for r in rows] == ["-", "-"]
    total = next(line for line in text.splitlines() if "| Total" in line)
    assert [c.strip() for c in total.split("|")][5] == "-"
    assert "no limit" in text


# -- MemoryTimeline -----------------------------------------------------------------------------------------
def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    measured = [(0.5, 10 * MB), (1.0, 30 * MB), (2.0, 40 * MB), (3.5, 20 * MB)]
    predicted = [(0.0, 0), (1.0, 32 * MB), (2.0, 42 * MB), (4.0, 5 * MB)]
    path = plot_timeline(measured, predicted, tmp_path / "nested" / "tl.png", "a step")
    assert path == tmp_path / "nested" / "tl.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    empty = plot_timeline([], [], tmp_path / "empty.png", "nothing")
    assert empty.read_bytes().startswith(PNG_MAGIC)


def test_memory_timeline_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=re.escape("MemoryTimeline needs matplotlib: pip install "
                                                    "'deltaswap[plot]'")):
        MemoryTimeline()


def test_memory_timeline_on_cpu_warns_once_and_writes_nothing(tmp_path: Path) -> None:
    timeline = MemoryTimeline(step=1, dirpath=tmp_path / "plots")
    _, caught = fit_and_catch(SwapStrategy(policy="recompute"), tmp_path, [timeline])
    assert len([m for m in caught if "MemoryTimeline" in m]) == 1
    assert any("no device memory to record" in m for m in caught)
    assert not (tmp_path / "plots").exists()
    assert timeline.measured == [] and timeline.path is None and timeline.recorded_step is None


def test_no_callback_module_imports_matplotlib_at_import_time() -> None:
    folder = Path(deltaswap.callbacks.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "monitor.py", "summary.py", "timeline.py"}
    for file in files:
        stack: list[ast.AST] = list(ast.parse(file.read_text()).body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not on import
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "matplotlib"], file.name
            stack.extend(ast.iter_child_nodes(node))


def test_lit_gpt_blocks_are_the_ones_named() -> None:
    """The names the summary test expects are those the manager finds in the test module."""
    module = LitGPT()
    names = {name for name, _ in module.named_modules()}
    assert set(BLOCK_NAMES) <= names and f"model.blocks.{CFG.n_layer}" not in names
