"""Group-wise weight quantization formats: what is stored, and how many bytes it takes.

A quantized weight is cut into groups of ``group_size`` consecutive values along its last
(contiguous) dimension. Each group keeps one scale, and for asymmetric int4 one zero point
(the group's minimum), both in the model's dtype, so a bf16 weight quantized to int8 moves
``1 + 2 / group_size`` bytes per value and to int4 ``0.5 + 4 / group_size`` (FlexGen's
"group-wise min/max" format; int8 is symmetric, absmax / 127).

Which weights are quantized is a rule, not a list: the two-dimensional floating-point parameters
of the decoder layers (the projections). Norm weights, biases, embeddings and the head stay in
the model's dtype, exactly.

This module is arithmetic on shapes and dtypes; the tensor math is :mod:`hscompile.ops.quant`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import WEIGHT_QUANT, QuantConfig
from ..errors import ConfigError

__all__ = ["PARTS", "WEIGHT_SCHEMES", "QuantScheme", "is_quantized_weight", "scheme_of", "weight_part",
           "weight_scheme"]

WEIGHT_SCHEMES = WEIGHT_QUANT
"""Values of the ``weight_quant`` option."""
DEFAULT_GROUP_SIZE = QuantConfig().group_size


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """One group-wise format: ``"int8"`` (symmetric) or ``"int4"`` (asymmetric, two values a byte)."""

    name: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.name not in WEIGHT_SCHEMES[1:]:
            raise ConfigError(f"unknown quantization scheme {self.name!r}; expected one of {', '.join(WEIGHT_SCHEMES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"quant_group_size must be an int of at least 2, got {self.group_size!r}")
        if self.name == "int4" and self.group_size % 2:
            raise ConfigError(f"quant_group_size must be even for int4 (two values a byte), got {self.group_size}")

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    @property
    def asymmetric(self) -> bool:
        """Whether each group also keeps a zero point (its minimum)."""
        return self.name == "int4"

    @property
    def levels(self) -> int:
        """The largest quantized magnitude: 127 (int8, symmetric) or 15 (int4, unsigned)."""
        return 127 if self.name == "int8" else 15

    @property
    def parts(self) -> tuple[str, ...]:
        """What a quantized weight is stored as, in this order (packed so in its group buffer, and
        passed so to the compute that dequantizes it)."""
        return PARTS if self.asymmetric else PARTS[:2]

    def part_shape(self, part: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``part`` of a weight of ``shape``: values as the weight (int4: half the last
        dimension, two a byte); scales and zeros one per group."""
        if part == "values":
            return (*shape[:-1], shape[-1] // 2) if self.bits == 4 else shape
        return (*shape[:-1], shape[-1] // self.group_size)

    def part_dtype(self, part: str, dtype: torch.dtype) -> torch.dtype:
        """Dtype of ``part`` of a weight of ``dtype``."""
        if part == "values":
            return torch.int8 if self.bits == 8 else torch.uint8
        return dtype

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` unless the groups tile ``name``'s last dimension."""
        columns = shape[-1]
        if columns % self.group_size:
            valid = [g for g in range(2, columns + 1) if columns % g == 0 and (self.name != "int4" or g % 2 == 0)]
            shown = ", ".join(str(g) for g in valid[:12]) + (", ..." if len(valid) > 12 else "")
            raise ConfigError(
                f"quant_group_size={self.group_size} does not divide the last dimension ({columns}) of weight "
                f"{name!r} {tuple(shape)}; sizes that divide it: {shown}"
            )

    def groups(self, shape: tuple[int, ...]) -> int:
        """Groups in a weight of ``shape`` (it must pass :meth:`check`)."""
        return math.prod(shape) // self.group_size

    def value_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the packed quantized values of a weight of ``shape``."""
        numel = self.groups(shape) * self.group_size
        return numel if self.bits == 8 else numel // 2

    def packed_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes that hold a weight of ``shape`` quantized: values, scales and zero points (in ``dtype``)."""
        per_group = dtype.itemsize * (2 if self.asymmetric else 1)
        return self.value_bytes(shape) + self.groups(shape) * per_group


PARTS = ("values", "scales", "zeros")
"""The parts of a quantized weight (symmetric schemes have no zeros)."""


def scheme_of(quant: QuantConfig) -> QuantScheme | None:
    """The weight format a validated config asks for (None: weights stay in the model's dtype)."""
    return weight_scheme(quant.weight_quant, quant.group_size)


def weight_scheme(weight_quant: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantScheme | None:
    """The scheme of the ``weight_quant`` option (None for ``"none"``), validated."""
    if weight_quant == "none":
        return None
    if weight_quant not in WEIGHT_SCHEMES:
        raise ConfigError(f"weight_quant must be one of {', '.join(WEIGHT_SCHEMES)}, got {weight_quant!r}")
    return QuantScheme(weight_quant, group_size)


def is_quantized_weight(shape: tuple[int, ...], dtype: torch.dtype, in_layer: bool) -> bool:
    """Whether a parameter is quantized: a two-dimensional floating-point weight of a decoder layer."""
    return in_layer and len(shape) == 2 and dtype.is_floating_point


def weight_part(weight: torch.Tensor, part: str) -> torch.Tensor:
    """Schedule vocabulary: ``part`` of quantized ``weight``, as it lies in its layer's packed
    buffer. The quantize pass writes it and the offload pass replaces it by a view of that buffer;
    it never runs."""
    raise RuntimeError(f"weight_part({part!r}) ran: a schedule with quantized weights must go through the offload "
                       "pass, which reads them from their packed buffer")
