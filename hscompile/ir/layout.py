"""How a weight group is packed into one flat byte buffer.

A *group* is the unit weights move in: one decoder layer, or the weights outside the layers.
Its tensors are packed contiguously, each at an offset aligned to :data:`ALIGNMENT` bytes,
into one ``uint8`` buffer: one copy moves a whole layer, and the schedule carves each weight
back out with ``as_strided``. The same layout is used for host buffers, device slots and
resident device copies, so every layer's weights reach a shared compiled partition with the
same shapes, strides and alignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .plan import ModelPlan, WeightRef

__all__ = ["ALIGNMENT", "GLOBAL_GROUP", "GroupLayout", "PackedWeight", "group_layouts", "layout_group"]

GLOBAL_GROUP = -1
"""Group id of the weights outside the decoder layers (embeddings, final norm, head)."""

ALIGNMENT = 256
"""Byte alignment of each weight in a group buffer: what CUDA allocations guarantee, more than
any vector load Inductor emits assumes, a multiple of every dtype's size."""


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """One weight's place in its group buffer."""

    node: str
    """The weight's placeholder in the captured graph."""
    offset: int
    """Byte offset in the group buffer (a multiple of :data:`ALIGNMENT`)."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    """Contiguous strides of ``shape``, in elements."""
    dtype: torch.dtype
    nbytes: int

    @property
    def element_offset(self) -> int:
        """``offset`` in elements of ``dtype`` (for ``as_strided`` on the buffer viewed as ``dtype``)."""
        return self.offset // self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """The packing of one weight group."""

    group: int
    """Layer index, or :data:`GLOBAL_GROUP` for the weights outside the layers."""
    weights: tuple[PackedWeight, ...]
    nbytes: int
    """Buffer size: the end of the last weight, rounded up to :data:`ALIGNMENT`."""

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights, without alignment padding."""
        return sum(w.nbytes for w in self.weights)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def layout_group(group: int, weights: Sequence[WeightRef]) -> GroupLayout:
    """Pack ``weights`` in the given order (layers: by name, see ``placement.group_layouts``).

    Only ``node``, ``shape``, ``dtype`` and ``nbytes`` of each weight are read."""
    packed, offset = [], 0
    for weight in weights:
        packed.append(
            PackedWeight(
                node=weight.node,
                offset=offset,
                shape=weight.shape,
                stride=_contiguous_strides(weight.shape),
                dtype=weight.dtype,
                nbytes=weight.nbytes,
            )
        )
        offset = _align(offset + weight.nbytes)
    return GroupLayout(group=group, weights=tuple(packed), nbytes=max(offset, ALIGNMENT))


def group_layouts(plan: ModelPlan) -> dict[int, GroupLayout]:
    """The packed layout of every weight group: each layer, and the global group.

    A layer's weights are packed in the order of their names inside the layer (the same in every
    layer): a loader can then lay a checkpoint's layers out exactly so before anything is traced
    (:mod:`hscompile.loading`), and the host store adopts those buffers instead of copying them.
    """
    layouts = {
        layer.index: layout_group(layer.index, sorted(layer.weights, key=lambda w: w.local_name)) for layer in plan.layers
    }
    layouts[GLOBAL_GROUP] = layout_group(GLOBAL_GROUP, plan.global_weights)
    return layouts
