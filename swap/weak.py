"""Callbacks that reach their object weakly.

What the engine hands to longer-lived owners (tensor hooks in an autograd graph that the user's ``loss``
keeps, a step's callbacks, a checkpoint's policy) must not keep its manager or offloader, and the pinned
memory they hold, alive: once the object is gone, the callback does nothing and returns its default.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


def weakly(method: Callable[..., _T], *bound: Any, default: _T | None = None) -> Callable[..., _T | None]:
    """``method(*bound, *args)`` called through a weak reference to the method's object.

    Use it for a bound method given to something that may outlive the object (an autograd hook, a
    callback): ``partial(self.f, x)`` there would keep ``self`` alive as long as that holder lives.

    Example::

        tensor.register_hook(weakly(self._backward_done, check))  # does nothing once self is gone

    Args:
        method: a bound method.
        bound: the arguments put before those of each call.
        default: what a call returns once the object is gone.
    """
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(*args: Any) -> _T | None:
        fn = ref()
        return fn(*bound, *args) if fn is not None else default

    return call
