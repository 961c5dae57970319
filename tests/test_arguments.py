"""What deltaswap does to a block's call arguments before it runs the block: the KV cache turned off
(swap/arguments.py), on the arguments HF layers pass."""

from __future__ import annotations

import torch
from torch import nn

from deltaswap.swap.arguments import without_cache


class Cache:  # HF's base class is recognised by its name
    pass


class DynamicCache(Cache):
    pass


class Layer(nn.Module):
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x


class ReadsCache(Layer):
    _can_checkpoint_with_cache = True  # as HF marks a layer that only reads the cache


def test_tensor_arguments_come_back_as_they_were() -> None:
    x, mask = torch.ones(2), torch.zeros(2)
    kwargs: dict[str, object] = {}
    args, out_kwargs, changed = without_cache(Layer(), (x, mask), kwargs)
    assert args[0] is x and args[1] is mask and out_kwargs is kwargs and changed == []


def test_the_cache_and_use_cache_are_turned_off_by_keyword_and_by_position() -> None:
    cache = DynamicCache()
    args, kwargs, changed = without_cache(Layer(), (torch.ones(2), cache),
                                          {"use_cache": True, "past_key_value": DynamicCache()})
    assert args[1] is None and kwargs == {"use_cache": False, "past_key_value": None}
    assert changed == ["use_cache=False", "past_key_value=None", "positional argument 1 (DynamicCache)=None"]


def test_a_layer_that_only_reads_the_cache_keeps_it_also_when_compiled() -> None:
    for block in (ReadsCache(), torch.compile(ReadsCache())):  # compiled lazily: nothing compiles here
        cache = DynamicCache()
        _, kwargs, changed = without_cache(block, (torch.ones(2),), {"use_cache": True, "cache": cache})
        assert kwargs["cache"] is cache and kwargs["use_cache"] is False, type(block).__name__
        assert changed == ["use_cache=False"]
