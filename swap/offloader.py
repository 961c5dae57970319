"""The user-facing context manager that swaps a forward pass's activations to pinned host memory."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle

from .backend import CopyBackend, CudaCopyBackend
from .config import OffloadConfig, format_bytes
from .pool import PinnedPool, available_host_bytes
from .stats import OffloadStats
from .step import OffloadStep
from .weak import weakly


class ActivationOffloader:
    """Swaps the tensors autograd saves in a forward pass to pinned host memory and brings them back,
    ahead of need, in the backward pass.

    Use it when activations do not fit on the GPU and the forward pass is long enough to hide their copy
    over PCIe. Create it once and enter it around every forward pass: the pinned pool it sizes in the
    first step is reused by all later ones (no pinned allocation in the steady state).

    Device->host copies run on a side stream, ordered after the op that produced each tensor by an event;
    host->device copies run on a second stream, started ``prefetch_lookahead`` bytes of backward progress
    ahead of use; the compute stream waits on events, the host never waits in the forward pass. Gradients
    are bitwise equal to the run without it: the bytes that come back are the bytes that left.

    Args:
        config: what to swap and how far ahead to prefetch (:class:`OffloadConfig`).
        modules: if given, only tensors saved while one of these modules runs its forward are swapped
            (the rest are kept but still count as backward progress for prefetching).
        backend: the copy backend; default :class:`CudaCopyBackend` on ``device``. Without CUDA (or with
            a CPU ``device``) and without a backend, the context warns once and does nothing.
        device: the device whose activations are swapped (default: the current CUDA device, if any).
        host_memory_available: returns the host RAM available now (default: psutil); the pool checks it
            before every growth.

    Example::

        >>> off = ActivationOffloader(OffloadConfig(min_bytes="1MiB"))
        >>> for x in loader:                                 # doctest: +SKIP
        ...     with off:
        ...         loss = model(x).float().pow(2).mean()
        ...     loss.backward()
        ...     print(off.stats.bytes_offloaded, off.stats.backward_stall_ms)

    .. warning::
        A tensor whose copy has not finished still occupies GPU memory, so swapping alone shrinks the
        forward's peak by at most what PCIe carries during the forward pass (``stats.inflight_bytes_at_exit``
        shows what was left). Reading :attr:`stats` waits for the step's copies: do it after ``backward``.

    .. warning::
        Mutating a saved tensor in place through an alias that bypasses autograd's version counter
        (``.data``) is not detected, just as without the engine, but the host copy may then hold either
        value.
    """

    def __init__(
        self,
        config: OffloadConfig | None = None,
        *,
        modules: Iterable[torch.nn.Module] | None = None,
        backend: CopyBackend | None = None,
        device: torch.device | str | int | None = None,
        host_memory_available: Callable[[], int] = available_host_bytes,
    ) -> None:
        self.config = config if config is not None else OffloadConfig()
        self._modules = list(modules) if modules is not None else None
        self._backend = backend
        self._device = None if device is None else torch.device(device)
        self._host_memory_available = host_memory_available
        self._pool: PinnedPool | None = None
        self._step: OffloadStep | None = None
        self._hooks: saved_tensors_hooks | None = None
        self._module_hooks: list[RemovableHandle] = []
        self._depth = 0
        self._swap_override: bool | None = None
        self._active = False
        self._warned_no_cuda = False
        self._warned_pool_full = False
        self._next_buffers: list[torch.Tensor] | None = None

    # -- context ----------------------------------------------------------------------------------
    def __enter__(self) -> ActivationOffloader:
        if self._active:
            raise RuntimeError("this ActivationOffloader is already active: exit it before entering it again")
        backend = self._resolve_backend()
        if backend is None:
            self._active = True
            return self
        if self._pool is None:
            self._pool = PinnedPool(
                backend,
                reserve_bytes=int(self.config.host_ram_reserve),
                fixed_bytes=self.config.pinned_bytes,  # type: ignore[arg-type]
                available=self._host_memory_available,
            )
        self._step = OffloadStep(
            self.config,
            backend,
            self._pool,
            # weakly: the step (and the pool it holds) must not keep a dropped offloader alive in a cycle
            swap_enabled=weakly(self._swap_enabled, default=False),
            on_pool_full=weakly(self._warn_pool_full),
        )
        self._depth = 0
        if self._next_buffers is not None:  # named for this step: no hook on every module call
            self._step.note_buffers(self._next_buffers)
            self._next_buffers = None
        else:
            self._module_hooks.append(register_module_forward_pre_hook(self._step.note_module))
        if self._modules is not None:
            for module in self._modules:
                self._module_hooks.append(module.register_forward_pre_hook(self._enter_module))
                self._module_hooks.append(module.register_forward_hook(self._exit_module, always_call=True))
        self._hooks = saved_tensors_hooks(self._step.pack, self._step.unpack)
        self._hooks.__enter__()
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        if self._hooks is not None:
            self._hooks.__exit__(exc_type, exc, tb)
            self._hooks = None
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks.clear()
        if self._step is not None:
            self._step.close_forward()

    # -- results ----------------------------------------------------------------------------------
    @property
    def stats(self) -> OffloadStats:
        """What the most recent step did (:class:`OffloadStats`). Waits for that step's copies to finish,
        so read it after the backward pass, not inside the forward."""
        if self._step is None or self._pool is None or self._backend is None:
            return OffloadStats()
        return self._step.counters.summarize(self._backend, *self._pool.usage())

    @property
    def pinned_bytes_reserved(self) -> int:
        """Bytes the pinned pool holds now (0 before the first step)."""
        return self._pool.capacity if self._pool is not None else 0

    @property
    def saved_bytes(self) -> int:
        """Activation bytes saved through the engine in the most recent step (kept or swapped; read
        without waiting for the device)."""
        return self._step.cursor if self._step is not None else 0

    @property
    def store(self) -> OffloadStep | None:
        """While the context is active, the step that stores op outputs swapped or kept by
        :func:`~deltaswap.swap.recompute.checkpoint_with_policy`; ``None`` otherwise (and without CUDA)."""
        return self._step if self._active else None

    @property
    def backend(self) -> CopyBackend | None:
        """The copy backend in use (its streams, for profiling), or ``None`` before the first step and
        on a machine without CUDA."""
        return self._backend

    def close(self) -> None:
        """Give the pinned pool back. Call when training is over and no graph of it is alive."""
        if self._active:
            raise RuntimeError("cannot close an ActivationOffloader while it is active")
        if self._pool is not None:
            self._pool.release()
            self._pool = None
        self._step = None

    # -- internals --------------------------------------------------------------------------------
    def _resolve_backend(self) -> CopyBackend | None:
        on_cpu = self._device is not None and self._device.type == "cpu"
        if self._backend is None and not on_cpu and torch.cuda.is_available():
            self._backend = CudaCopyBackend(self._device)
        if self._backend is None and not self._warned_no_cuda:
            self._warned_no_cuda = True
            where = "the model runs on the CPU" if on_cpu else "CUDA is not available"
            warnings.warn(
                f"deltaswap: {where}, so activations are not swapped to host memory; training runs "
                f"unchanged with exact gradients (recompute still applies where a plan asks for it).",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._backend

    def note_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Name the module buffers of the next step (for example ``model.buffers()``): saved, they are
        kept, like parameters, since swapping them would move bytes and free none.

        Without it, each step finds the buffers of the modules as they run, through a global module
        forward pre-hook, which costs some host time at every module call. Call it before each
        ``with`` it is for; a buffer created during that step is then swapped like an activation
        (correct, only wasted bandwidth).
        """
        self._next_buffers = list(buffers)

    def set_device(self, device: torch.device | str | int) -> None:
        """Choose the device whose activations are swapped, before the first step resolves the backend.

        Raises:
            RuntimeError: once a backend is in use (the pool and streams belong to its device).
        """
        if self._backend is not None:
            raise RuntimeError("set_device: this offloader already swaps from a device; make a new one")
        self._device = torch.device(device)

    @contextlib.contextmanager
    def swapping(self, enabled: bool) -> Iterator[None]:
        """Switch swapping of saved tensors on or off for a region of the forward pass (overrides
        ``modules``); tensors saved while it is off are kept.

        Example::

            >>> with off:                              # doctest: +SKIP
            ...     with off.swapping(False):
            ...         h = embed(x)                   # kept
            ...     y = blocks(h)                      # swapped
        """
        previous, self._swap_override = self._swap_override, enabled
        try:
            yield
        finally:
            self._swap_override = previous

    def _swap_enabled(self) -> bool:
        if self._swap_override is not None:
            return self._swap_override
        return self._modules is None or self._depth > 0

    def _enter_module(self, *_: object) -> None:
        self._depth += 1

    def _exit_module(self, *_: object) -> None:
        self._depth -= 1

    def _warn_pool_full(self) -> None:
        if not self._warned_pool_full:
            self._warned_pool_full = True
            assert self._pool is not None
            warnings.warn(
                f"deltaswap: the pinned pool ({format_bytes(self._pool.capacity)}, pinned_bytes) is full; "
                f"further tensors stay on the GPU. Raise pinned_bytes (or set it to None to size the "
                f"pool automatically) to swap them.",
                RuntimeWarning,
                stacklevel=2,
            )


def offload_activations(
    *,
    min_bytes: int | str = 1 << 20,
    prefetch_lookahead: float | int | str = 0.25,
    pinned_bytes: int | str | None = None,
    host_ram_reserve: int | str = "2GiB",
    modules: Iterable[torch.nn.Module] | None = None,
    backend: CopyBackend | None = None,
) -> ActivationOffloader:
    """Swap the activations of the forward passes run inside the returned context to pinned host memory.

    A shortcut for ``ActivationOffloader(OffloadConfig(...), modules=..., backend=...)``; the arguments
    are :class:`OffloadConfig`'s. Keep the returned object and re-enter it every step to reuse its pinned
    pool.

    Example::

        >>> from deltaswap.swap import offload_activations
        >>> with offload_activations(min_bytes=1 << 20) as off:   # doctest: +SKIP
        ...     loss = model(x).float().pow(2).mean()
        >>> loss.backward()                                        # doctest: +SKIP
        >>> print(off.stats)                                       # doctest: +SKIP
    """
    config = OffloadConfig(
        min_bytes=min_bytes,
        prefetch_lookahead=prefetch_lookahead,
        pinned_bytes=pinned_bytes,
        host_ram_reserve=host_ram_reserve,
    )
    return ActivationOffloader(config, modules=modules, backend=backend)
