"""Group-wise quantization of weights, and its exact inverse (see :mod:`hscompile.ir.quant`).

Quantization picks each group's scale (and zero point), stores it in the weight's dtype, and
quantizes against the *stored* values, so that :func:`dequantize` of the result is a fixed
function of the stored bytes: the round trip any two implementations of it agree on. Every
operation here is an ordinary torch op (no custom kernel), so a graph that dequantizes can be
traced and fused by Inductor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.quant import QuantScheme

__all__ = ["QuantizedWeight", "dequantize", "dequantize_parts", "dequantize_rows", "pack_int4", "quantize",
           "quantize_rows", "unpack_int4"]


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
    """The weight ``q`` stands for, in its dtype (see :func:`dequantize_parts`)."""
    parts = (q.values, q.scales) if q.zeros is None else (q.values, q.scales, q.zeros)
    return dequantize_parts(q.dtype, *parts)


def dequantize_parts(dtype: torch.dtype, values: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None = None) -> torch.Tensor:
    """``value * scale (+ zero)`` per group, in ``dtype`` (zero points: int4, whose ``values`` hold
    two a byte; none: int8): the one formula, run eagerly by the
    reference and traced into the compute that dequantizes on the device.

    It is written so that every correct compiler gives the same bits. int8 is one multiplication
    in float32. int4 adds the zero point, and a compiler may fuse ``q * s + z`` into one FMA (one
    rounding instead of two): in float64 the product of a 4-bit value and a scale of at most 24
    significant bits is exact, so fused or not the sum rounds once, and the result goes down to
    float32 and then to ``dtype`` explicitly (not in one step, which a GPU may round differently).
    """
    if zeros is None:
        groups = values.to(torch.float32).reshape(*scales.shape, -1)
        return (groups * scales.to(torch.float32).unsqueeze(-1)).reshape(values.shape).to(dtype)
    unpacked = unpack_int4(values)
    groups = unpacked.to(torch.float64).reshape(*scales.shape, -1)
    out = groups * scales.to(torch.float64).unsqueeze(-1) + zeros.to(torch.float64).unsqueeze(-1)
    return out.reshape(unpacked.shape).to(torch.float32).to(dtype)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two values in ``[0, 15]`` a byte along the last dimension: even index low, odd index high."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each of ``x``'s rows (its first dimension) as one row of bytes: int8 values (symmetric,
    groups of ``group`` along the last dimension), then the groups' scales in ``x``'s dtype. How
    an int8 cache block holds a token (``group``: a head's ``head_dim`` for K/V, the hidden size
    for a checkpoint); :func:`dequantize_rows` is its inverse."""
    n = x.shape[0]
    q = quantize(x, QuantScheme("int8", group), "cache")
    return torch.cat((q.values.reshape(n, -1).view(torch.uint8), q.scales.reshape(n, -1).view(torch.uint8)), dim=1)


def dequantize_rows(rows: torch.Tensor, shape: tuple[int, ...], group: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``(len(rows), *shape)`` tensor in ``dtype`` that :func:`quantize_rows` turned into ``rows``."""
    n, values = rows.shape[0], math.prod(shape)
    q = rows[:, :values].view(torch.int8).reshape(n, *shape)
    # A contiguous copy: the scales start at byte ``values`` of a row, where ``dtype`` may not be
    # aligned (and a one-row slice keeps its row stride through a plain clone).
    scales = rows[:, values:].clone(memory_format=torch.contiguous_format).view(dtype)
    scales = scales.reshape(n, *shape[:-1], shape[-1] // group)
    return dequantize_parts(dtype, q, scales)
