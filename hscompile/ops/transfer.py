"""Graph inputs and outputs crossing the link: ``hybridserve::to_device`` and ``to_host``,
counted by the bound runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .context import OpRuntime, active_runtime

__all__ = ["KERNELS", "to_device", "to_host"]


def _to_device(rt: OpRuntime, x: Tensor, device: torch.device) -> Tensor:
    return rt.copy_in(x, device)


def _to_host(rt: OpRuntime, x: Tensor, device: torch.device) -> Tensor:
    return rt.copy_out(x, device)


@torch.library.custom_op("hybridserve::to_device", mutates_args=())
def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A user input, copied to the compute device (counted as host-to-device bytes)."""
    return _to_device(active_runtime("to_device"), x, device)


@to_device.register_fake
def _to_device_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)


@torch.library.custom_op("hybridserve::to_host", mutates_args=())
def to_host(x: Tensor, device: torch.device) -> Tensor:
    """A graph output, copied back to the device the model was traced on (counted as device-to-host bytes)."""
    return _to_host(active_runtime("to_host"), x, device)


@to_host.register_fake
def _to_host_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)


KERNELS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    to_device._opoverload: _to_device,
    to_host._opoverload: _to_host,
}
"""Each op's body, taking the runtime first (see :mod:`hscompile.ops.kernels`)."""
