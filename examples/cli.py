"""Command-line options the examples share: how deltaswap is asked for, and its budget and policy."""

from __future__ import annotations

import argparse

from deltaswap.swap.config import POLICIES, memory_budget_from_text


def memory_budget(text: str) -> int | float | str:
    """``--memory-budget``: see :func:`~deltaswap.swap.config.memory_budget_from_text`."""
    try:
        return memory_budget_from_text(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_deltaswap_options(parser: argparse.ArgumentParser, *, strategy: bool = True) -> None:
    """``--strategy plain|deltaswap`` (unless ``strategy`` is False), ``--memory-budget`` and ``--policy``."""
    if strategy:
        parser.add_argument("--strategy", default="deltaswap", choices=("plain", "deltaswap"))
    parser.add_argument("--memory-budget", type=memory_budget, default="auto",
                        help="deltaswap's activation budget: auto, a size (12GiB) or a fraction (0.6)")
    parser.add_argument("--policy", default="auto", choices=POLICIES)
