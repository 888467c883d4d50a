"""Group-wise quantization of weights, and its exact inverse (see :mod:`hscompile.ir.quant`).

Quantization picks each group's scale (and zero point), stores it in the weight's dtype, and
quantizes against the *stored* values, so that :func:`dequantize` of the result is a fixed
function of the stored bytes: the round trip any two implementations of it agree on. Every
operation here is an ordinary torch op (no custom kernel), so a graph that dequantizes can be
traced and fused by Inductor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.quant import QuantScheme

__all__ = ["QuantizedWeight", "dequantize", "pack_int4", "quantize", "unpack_int4"]


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A weight in a :class:`QuantScheme`: ``values`` (int8, or uint8 holding two int4 values),
    ``scales`` and ``zeros`` (None for symmetric int8) of shape ``(*leading, groups_per_row)`` in
    the weight's dtype."""

    scheme: QuantScheme
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        parts = (self.values, self.scales) if self.zeros is None else (self.values, self.scales, self.zeros)
        return sum(p.numel() * p.element_size() for p in parts)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    return weight.reshape(*weight.shape[:-1], weight.shape[-1] // group_size, group_size)


def quantize(weight: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> QuantizedWeight:
    """``weight`` in ``scheme`` (its last dimension must be a multiple of the group size)."""
    shape = tuple(weight.shape)
    scheme.check(name, shape)
    groups = _grouped(weight.detach().float(), scheme.group_size)
    if scheme.asymmetric:
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / scheme.levels).to(weight.dtype)
        zeros = low.to(weight.dtype)
        step = _nonzero(scales.float())
        q = torch.round((groups - zeros.float().unsqueeze(-1)) / step.unsqueeze(-1)).clamp(0, scheme.levels)
        values = pack_int4(q.to(torch.uint8).reshape(shape))
        return QuantizedWeight(scheme, shape, weight.dtype, values, scales, zeros)
    scales = (groups.abs().amax(dim=-1) / scheme.levels).to(weight.dtype)
    q = torch.round(groups / _nonzero(scales.float()).unsqueeze(-1)).clamp(-scheme.levels, scheme.levels)
    return QuantizedWeight(scheme, shape, weight.dtype, q.to(torch.int8).reshape(shape), scales, None)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    # A group of equal values (a zero row, say) has scale 0: any step quantizes it to 0 exactly.
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The weight ``q`` stands for, in its dtype: ``value * scale (+ zero)`` computed in float32."""
    values = unpack_int4(q.values) if q.scheme.asymmetric else q.values
    groups = _grouped(values.float(), q.scheme.group_size)
    out = groups * q.scales.float().unsqueeze(-1)
    if q.zeros is not None:
        out = out + q.zeros.float().unsqueeze(-1)
    return out.reshape(q.shape).to(q.dtype)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two values in ``[0, 15]`` a byte along the last dimension: even index low, odd index high."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
