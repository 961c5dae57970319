"""Host memory when the swap context is created anew every step, as torch's ``save_on_cpu`` idiom writes it.

Users know ``with torch.autograd.graph.save_on_cpu(pin_memory=True):`` written inside the training loop,
and write ``with offload_activations():`` the same way. Each step then makes a new offloader and a new
pinned pool. This script trains that loop and reports, per step, the pinned memory torch's caching host
allocator holds (``torch.cuda.host_memory_stats()``), the process's resident memory (RSS) and the GPU
memory allocated, and whether every step's gradients equal the plain run's bitwise (the weights stay
fixed: no optimizer step, so every step computes the same gradients; ``plain_repeatable`` says whether
two plain runs agree bitwise, which the attention kernels decide). It passes when the pinned memory
and the RSS of the last step are within ``--tolerance`` of the first step's, and every step was exact.

The model is :mod:`gpt`'s; the default (``--preset bench --batch-size 8``: 16 layers, d 2048, seq 2048,
about 22 GiB swapped per step) is the shape of the benchmark. On a CPU (``--preset tiny``, for the smoke
test) nothing is pinned and only the exactness and RSS are meaningful.

Launch::

    python examples/context_per_step.py --steps 50 --out out/context_per_step.json     # one H200, ~1.5 min
    python examples/context_per_step.py --deterministic --batch-size 1 --steps 10      # exactness too
    python examples/context_per_step.py --preset tiny --batch-size 2 --steps 5          # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch

from deltaswap.swap import offload_activations

from gpt import GPT, PRESETS, random_batch

GiB = 1 << 30


def pinned_bytes() -> int:
    """Pinned host bytes torch's caching host allocator holds (in use and cached); 0 without CUDA."""
    if not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--min-bytes", default="1MiB", help="offload_activations' min_bytes")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="how far the last step's pinned memory and RSS may lie above the first's")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels, TF32 off and math attention, so that the plain run "
                             "repeats itself bitwise and exactness can be decided (math attention saves "
                             "far more: use a smaller --batch-size)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="write the per-step numbers as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    model = GPT(cfg).to(device)
    x, y = random_batch(cfg, args.batch_size, device, torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention() -> contextlib.AbstractContextManager[Any]:
        return sdpa_kernel(SDPBackend.MATH) if args.deterministic else contextlib.nullcontext()

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def step(context: Any) -> None:
        model.zero_grad(set_to_none=True)
        with context, autocast, attention():
            loss = model(x, y)
        with attention():
            loss.backward()

    step(torch.enable_grad())  # the plain run: the gradients every step must give
    plain = gradients(model)
    step(torch.enable_grad())  # once more: whether the plain run repeats itself bitwise (attention
    repeatable = all(torch.equal(a, b) for a, b in zip(plain, gradients(model), strict=True))  # kernels)
    print(f"plain run repeats itself bitwise: {repeatable}")
    process = psutil.Process()
    rows: list[dict[str, Any]] = []
    exact = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not cuda else "default")  # the CPU run's no-swap warning
        for i in range(args.steps):
            off = offload_activations(min_bytes=args.min_bytes)  # anew, every step
            step(off)
            same = all(torch.equal(a, b) for a, b in zip(plain, gradients(model), strict=True))
            exact = exact and same
            stats = off.stats
            if cuda:
                torch.cuda.synchronize()
            rows.append({"step": i, "pinned_bytes": pinned_bytes(), "rss_bytes": process.memory_info().rss,
                         "gpu_allocated_bytes": torch.cuda.memory_allocated() if cuda else 0,
                         "offloaded_bytes": stats.bytes_offloaded, "exact": same})
            row = rows[-1]
            print(f"step {i:3d}  offloaded {row['offloaded_bytes'] / GiB:7.2f} GiB  pinned "
                  f"{row['pinned_bytes'] / GiB:7.2f} GiB  rss {row['rss_bytes'] / GiB:7.2f} GiB  gpu "
                  f"{row['gpu_allocated_bytes'] / GiB:6.2f} GiB  exact {same}", flush=True)
    first, last = rows[0], rows[-1]
    grew = {k: last[k] / first[k] - 1 if first[k] else 0.0 for k in ("pinned_bytes", "rss_bytes")}
    flat = all(g <= args.tolerance for g in grew.values())
    verdict: bool | None = exact if repeatable else None  # undecidable when plain disagrees with itself
    said = {True: "yes", False: "NO", None: "undecidable (the plain run does not repeat itself; use "
                                            "--deterministic)"}[verdict]
    print(f"after {args.steps} steps: pinned {grew['pinned_bytes']:+.1%}, rss {grew['rss_bytes']:+.1%} "
          f"against the first step (tolerance {args.tolerance:.0%}); every step exact: {said}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps, "growth": grew,
            "flat": flat, "exact": verdict, "plain_repeatable": repeatable, "rows": rows}, indent=2))
    return 0 if flat and verdict is not False else 1


if __name__ == "__main__":
    sys.exit(main())
