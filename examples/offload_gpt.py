"""Train a small GPT with its activations swapped to pinned host memory by deltaswap's engine.

The whole integration is three lines: create the offloader once, run each forward pass inside it, read
its stats after the backward pass. On a machine without CUDA the offloader warns once and training runs
unchanged, so this script runs anywhere.

Launch::

    python examples/offload_gpt.py                                   # tiny model, ~20 s on a laptop CPU
    python examples/offload_gpt.py --preset gpt2-medium --batch-size 8 --steps 50   # on a GPU
    python examples/offload_gpt.py --no-offload                      # the same run without deltaswap
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from deltaswap.swap import format_bytes, offload_activations

from gpt import GPT, PRESETS, random_batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-bytes", default="1MiB", help="saved tensors below this stay on the GPU")
    parser.add_argument("--no-offload", action="store_true", help="train without deltaswap")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    with torch.device(device):
        model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    offloader = None if args.no_offload else offload_activations(min_bytes=args.min_bytes)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}, "
          f"{'plain' if offloader is None else 'deltaswap offload'}")
    start, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        x, y = random_batch(cfg, args.batch_size, device, data)
        with offloader or contextlib.nullcontext(), autocast:
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
        if step % 10 == 0 or step == args.steps:
            rate = tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss.item():.3f}  {rate:,.0f} tokens/s")
    if offloader is not None and offloader.backend is not None:
        stats = offloader.stats
        print(f"last step: swapped {format_bytes(stats.bytes_offloaded)} "
              f"(D2H {stats.d2h_gbps:.1f} GB/s, H2D {stats.h2d_gbps:.1f} GB/s), "
              f"backward stall {stats.backward_stall_ms:.1f} ms, pinned pool "
              f"{format_bytes(stats.pinned_bytes_reserved)}")


if __name__ == "__main__":
    main()
