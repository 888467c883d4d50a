"""What each op does to the runtime it acts on, callable without the dispatcher.

Every runtime-acting op has one body taking the runtime first (``KERNELS`` in its module):
the registered kernels call it with the runtime the executor bound, and an interpreter of a
schedule may call it directly (:func:`bound_kernels`), skipping the dispatcher on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch

from . import cache, transfer, weights
from .context import OpRuntime

__all__ = ["bound_kernels"]

_KERNELS: MappingProxyType[torch._ops.OpOverload, Callable[..., Any]] = MappingProxyType(
    {**weights.KERNELS, **transfer.KERNELS, **cache.KERNELS}
)
"""Each runtime-acting op's body (a constant table, built once at import)."""


def bound_kernels(runtime: OpRuntime) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """Each op a schedule calls, as a plain function acting on ``runtime``: what the registered
    kernel would do under :func:`~hscompile.ops.context.bind`, without the dispatcher and the
    context lookup (several microseconds a call, hundreds of calls a step)."""
    return {op: _bind(kernel, runtime, op.name()) for op, kernel in _KERNELS.items()}


def _bind(kernel: Callable[..., Any], runtime: OpRuntime, name: str) -> Callable[..., Any]:
    profiler = torch.autograd.profiler

    def call(*args: Any, **kwargs: Any) -> Any:
        if profiler._is_profiler_enabled:  # a profile still names the op (the dispatcher would)
            with profiler.record_function(name):
                return kernel(runtime, *args, **kwargs)
        return kernel(runtime, *args, **kwargs)

    call.__name__ = kernel.__name__.lstrip("_")
    return call
