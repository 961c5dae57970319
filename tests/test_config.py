"""Configuration parsing and validation: bad input gets an error that says what to write instead."""

from __future__ import annotations

import pytest

from deltaswap.swap import OffloadConfig, SwapConfig, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (123, 123),
        ("123", 123),
        ("1KiB", 1024),
        ("1.5GiB", 3 << 29),
        ("512 MiB", 512 << 20),
        ("2gb", 2 * 10**9),
        ("  8GiB ", 8 << 30),
    ],
)
def test_parse_bytes_accepts_counts_and_units(text: int | str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["12 gigs", "GiB", "1.2.3MiB", "-5MiB", ""])
def test_parse_bytes_rejects_malformed_strings_with_an_example(bad: str) -> None:
    with pytest.raises(ValueError, match=r"'8GiB'"):
        parse_bytes(bad, name="pinned_bytes")


def test_parse_bytes_rejects_negative_and_wrong_types() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        parse_bytes(-1)
    with pytest.raises(TypeError, match="size string"):
        parse_bytes(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        parse_bytes(True)


def test_format_bytes() -> None:
    assert format_bytes(3 << 30) == "3.00 GiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(12) == "12 B"


def test_config_normalizes_sizes() -> None:
    cfg = OffloadConfig(min_bytes="1MiB", prefetch_lookahead="2GiB", pinned_bytes="16GiB")
    assert cfg.min_bytes == 1 << 20
    assert cfg.prefetch_lookahead == 2 << 30
    assert cfg.pinned_bytes == 16 << 30
    assert cfg.lookahead_bytes(10**12) == 2 << 30


def test_config_fraction_lookahead_scales_with_the_step() -> None:
    cfg = OffloadConfig(prefetch_lookahead=0.25)
    assert cfg.lookahead_bytes(1000) == 250
    assert cfg.lookahead_bytes(0) == 1


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_config_rejects_fraction_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"prefetch_lookahead.*\(0, 1\]"):
        OffloadConfig(prefetch_lookahead=bad)


def test_config_rejects_an_empty_fixed_pool() -> None:
    with pytest.raises(ValueError, match="pinned_bytes=0"):
        OffloadConfig(pinned_bytes=0)


def test_config_rejects_a_malformed_min_bytes() -> None:
    with pytest.raises(ValueError, match="min_bytes='one meg'"):
        OffloadConfig(min_bytes="one meg")


def test_swap_config_budget_forms() -> None:
    assert SwapConfig().memory_budget == "auto"
    assert SwapConfig(memory_budget="12GiB").memory_budget == 12 << 30
    assert SwapConfig(memory_budget=1 << 30).memory_budget == 1 << 30
    assert SwapConfig(memory_budget=0.5).memory_budget == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"memory_budget": "12 gigs"}, ValueError, r"memory_budget='12 gigs' is not a size.*'8GiB'"),
        ({"memory_budget": 1.5}, ValueError, r"memory_budget=1.5 .* \(0, 1\].*'auto'"),
        ({"memory_budget": 0}, ValueError, "memory_budget=0 leaves no room"),
        ({"memory_budget": "AUTO"}, ValueError, "is not a size"),
        ({"policy": "fast"}, ValueError, r"policy='fast' is not one of 'auto', 'delta', 'swap'"),
        ({"block_types": ("Block",)}, TypeError, "tuple of module classes"),
        ({"bandwidth_gbps": 0.0}, ValueError, "positive rate"),
        ({"prefetch_lookahead": 2.0}, ValueError, r"prefetch_lookahead=2.0"),
        ({"min_bytes": "tiny"}, ValueError, "min_bytes='tiny'"),
    ],
)
def test_swap_config_rejects_bad_input_saying_what_to_write(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        SwapConfig(**kwargs)  # type: ignore[arg-type]


def test_swap_config_builds_the_engine_config() -> None:
    cfg = SwapConfig(min_bytes="2MiB", prefetch_lookahead="1GiB", pinned_bytes="4GiB")
    off = cfg.offload_config()
    assert (off.min_bytes, off.prefetch_lookahead, off.pinned_bytes) == (2 << 20, 1 << 30, 4 << 30)
