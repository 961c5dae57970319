"""Configuration parsing and validation: bad input gets an error that says what to write instead."""

from __future__ import annotations

import pytest

from deltaswap.swap import OffloadConfig, format_bytes, parse_bytes


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
