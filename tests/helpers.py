"""Assertions shared by the CPU and GPU tests."""

from __future__ import annotations

import torch


def assert_bitwise_equal(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    """Every tensor finite and bit-for-bit equal to the plain run's."""
    assert len(expected) == len(actual) and len(expected) > 0
    for x, y in zip(expected, actual, strict=True):
        assert torch.isfinite(y).all()
        assert torch.equal(x, y), (x - y).abs().max().item()
