"""Weight streaming: ``hybridserve::prefetch_weights``, ``wait_weights`` and ``release_weights``,
ordered effects acting on the bound runtime's weights.

Weights are identified by *group*: a decoder layer's index, or
:data:`~hscompile.ir.layout.GLOBAL_GROUP` for the weights outside the layers (embeddings,
final norm, head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .context import OpRuntime, active_runtime
from .effects import register_ordered_effect

__all__ = ["KERNELS", "prefetch_weights", "release_weights", "wait_weights"]


def _prefetch_weights(rt: OpRuntime, group: int, nbytes: int) -> None:
    rt.weights.prefetch(group)


def _wait_weights(rt: OpRuntime, group: int, host_weights: Any, device: Any, nbytes: int) -> Tensor:
    return rt.weights.wait(group)


def _release_weights(rt: OpRuntime, group: int, after: Any) -> None:
    rt.weights.release(group)


@torch.library.custom_op("hybridserve::prefetch_weights", mutates_args=())
def prefetch_weights(group: int, nbytes: int) -> None:
    """Start copying ``group``'s weights (``nbytes``) from host memory into its device slot.

    On CUDA the copy runs on the copy stream, after the slot's previous occupant was
    released; on CPU it is a synchronous copy.
    """
    _prefetch_weights(active_runtime("prefetch_weights"), group, nbytes)


@prefetch_weights.register_fake
def _prefetch_weights_fake(group: int, nbytes: int) -> None:
    return None


@torch.library.custom_op("hybridserve::wait_weights", mutates_args=())
def wait_weights(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    """The device buffer (``nbytes`` of uint8) holding ``group``'s weights, once its copy is done.

    ``host_weights`` are the weights as the model holds them (graph inputs): they say which
    tensors the buffer stands for; the schedule carves them out of it with ``as_strided``.
    """
    return _wait_weights(active_runtime("wait_weights"), group, host_weights, device, nbytes)


@wait_weights.register_fake
def _wait_weights_fake(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@torch.library.custom_op("hybridserve::release_weights", mutates_args=())
def release_weights(group: int, after: list[Tensor]) -> None:
    """Give ``group``'s device slot back once the steps producing ``after`` are done with it."""
    _release_weights(active_runtime("release_weights"), group, after)


@release_weights.register_fake
def _release_weights_fake(group: int, after: list[Tensor]) -> None:
    return None


for _op in (prefetch_weights, wait_weights, release_weights):
    register_ordered_effect(_op._opoverload)

KERNELS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    prefetch_weights._opoverload: _prefetch_weights,
    wait_weights._opoverload: _wait_weights,
    release_weights._opoverload: _release_weights,
}
"""Each op's body, taking the runtime first (see :mod:`hscompile.ops.kernels`)."""
