"""Does deltaswap scale to several GPUs like plain DDP? Train the same per-device batch on one device and
on ``--devices`` devices, with Lightning's plain strategies and with deltaswap's, and compare.

Each of the four runs is ``train_gpt.py`` in its own process (Lightning's DDP launcher starts one process
per device): plain on one device, plain DDP, deltaswap on one device, ``deltaswap_ddp``. The table says,
for each, the throughput over all devices, its ratio to the one-device run of the same strategy, each
rank's activation peak (deltaswap: measured by ``MemoryTimeline``), the bytes swapped per step, and, for
the DDP runs, how much of the profiled last step's gradient all-reduce ran beside computation
(``overlap.py``).

Launch (on a machine with at least two GPUs)::

    python examples/scaling.py --preset gpt2-large --batch-size 16 --memory-budget 12GiB --devices 2

The targets: deltaswap on N devices at least 0.95 N times its one-device throughput, each rank's
activation peak that of the one-device run, and no more exposed communication than plain DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from deltaswap.swap import format_bytes

from cli import memory_budget

TRAIN_GPT = Path(__file__).with_name("train_gpt.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step on each device")
    parser.add_argument("--memory-budget", type=memory_budget, default="auto",
                        help="deltaswap's activation budget of each device")
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--devices", type=int, default=2, help="devices of the DDP runs (at least 2)")
    parser.add_argument("--max-steps", type=int, default=20,
                        help="steps per run; the last is profiled, steps 3 to the one before it are timed")
    parser.add_argument("--strategies", nargs="+", default=["plain", "deltaswap"],
                        choices=("plain", "deltaswap"))
    parser.add_argument("--out", default="scaling", help="folder for the logs, summaries and results.json")
    parser.add_argument("--precision", default=None, help="passed to train_gpt.py")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error(f"--devices {args.devices}: the DDP runs need at least 2 devices")
    if args.max_steps < 5:
        parser.error(f"--max-steps {args.max_steps}: at least 5 (2 warm-up, 2 timed, 1 profiled)")
    return args


def run(args: argparse.Namespace, strategy: str, devices: int, out: Path) -> list[dict[str, Any]]:
    """One ``train_gpt.py`` run; its ranks' summaries, rank 0 first.

    Raises:
        RuntimeError: if the run fails (with the end of its output).
    """
    name = f"{strategy}_{devices}"
    summary = out / f"{name}.json"
    command = [sys.executable, str(TRAIN_GPT), "--preset", args.preset, "--strategy", strategy,
               "--devices", str(devices), "--batch-size", str(args.batch_size), "--max-steps",
               str(args.max_steps), "--memory-budget", str(args.memory_budget), "--policy", args.policy,
               "--log-dir", str(out / name), "--log-every", str(args.max_steps), "--summary", str(summary),
               "--profile-step", str(args.max_steps - 1), "--timeline-step", "3"]
    if args.precision:
        command += ["--precision", args.precision]
    # a run started from inside another DDP process must not inherit its rank
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    print(f"--- {name}: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{tail}")
    print(result.stdout, flush=True)
    if devices == 1:
        return [json.loads(summary.read_text())]
    return [json.loads(summary.with_name(f"{name}_rank{r}.json").read_text()) for r in range(devices)]


def compare(runs: dict[str, list[dict[str, Any]]], devices: int) -> dict[str, Any]:
    """The ratios the table prints: each strategy's throughput on ``devices`` over one device, and
    deltaswap's over plain's at the same device count."""
    def speed(name: str) -> float | None:
        return runs[name][0]["samples_per_s"] if name in runs else None

    ratios: dict[str, Any] = {}
    for strategy in ("plain", "deltaswap"):
        one, many = speed(f"{strategy}_1"), speed(f"{strategy}_{devices}")
        if one and many:
            ratios[f"{strategy}_scaling"] = many / one
    for count in (1, devices):
        plain, ours = speed(f"plain_{count}"), speed(f"deltaswap_{count}")
        if plain and ours:
            ratios[f"deltaswap_vs_plain_{count}"] = ours / plain
    return ratios


def table(runs: dict[str, list[dict[str, Any]]], ratios: dict[str, Any]) -> str:
    """The results as a fixed-width table, one row per run."""
    rows = ["run            samples/s  x 1 device  activation peak per rank      swapped/step  "
            "NCCL exposed / total (ms)"]
    for name, ranks in runs.items():
        strategy, devices = name.rsplit("_", 1)
        first = ranks[0]
        scaling = ratios.get(f"{strategy}_scaling") if devices != "1" else 1.0
        peaks = " / ".join(format_bytes(r["activation_peak"]) if r.get("activation_peak") is not None
                           else "-" for r in ranks)
        swapped = first.get("bytes_offloaded")
        overlap = first.get("overlap")
        comm = f"{overlap['exposed_comm_ms']:.1f} / {overlap['comm_ms']:.1f}" if overlap else "-"
        rows.append(f"{name:<14} {first['samples_per_s'] or 0:9.1f}  "
                    f"{'' if scaling is None else f'{scaling:.3f}':>10}  {peaks:<28}  "
                    f"{format_bytes(swapped) if swapped is not None else '-':>12}  {comm}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for strategy in args.strategies:
        for devices in (1, args.devices):
            runs[f"{strategy}_{devices}"] = run(args, strategy, devices, out)
    ratios = compare(runs, args.devices)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs, "ratios": ratios},
                                                 indent=1, default=str))
    print(table(runs, ratios))
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
