"""How a weight group is packed into one flat byte buffer.

A *group* is the unit weights move in: one decoder layer, or the weights outside the layers.
Its tensors are packed contiguously, each at an offset aligned to :data:`ALIGNMENT` bytes,
into one ``uint8`` buffer: one copy moves a whole layer, and the schedule carves each weight
back out with ``as_strided``. With a weight format (:mod:`hscompile.ir.quant`) the projections of
a layer are packed as their parts (quantized values, scales, zero points), each a weight of the
layout in its own right. The same layout is used for host buffers, device slots and
resident device copies, so every layer's weights reach a shared compiled partition with the
same shapes, strides and alignment.
"""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .plan import ModelPlan, WeightRef
from .quant import QuantScheme, is_quantized_weight

__all__ = ["ALIGNMENT", "DISK_ALIGN", "DISK_SLOTS", "GLOBAL_GROUP", "HOST_WEIGHTS_ATTR", "Extent", "GroupLayout",
           "PackedWeight", "disk_extents", "disk_groups", "group_layouts", "host_weight_bytes", "layout_group", "map_file",
           "mapped_at", "plan_on_disk", "read_bytes", "staging_bytes"]

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
    part: str | None = None
    """Which part of a quantized weight this is (``"values"``, ``"scales"``, ``"zeros"``); None
    for a weight stored as it is."""

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
    scheme: QuantScheme | None = None
    """The format of the weights packed as parts (None: every weight as it is)."""

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


def layout_group(group: int, weights: Sequence[WeightRef], scheme: QuantScheme | None = None) -> GroupLayout:
    """Pack ``weights`` in the given order (layers: by name, see ``placement.group_layouts``);
    with ``scheme``, the weights :func:`~hscompile.ir.quant.is_quantized_weight` picks as their parts.

    Only ``node``, ``shape``, ``dtype``, ``nbytes`` (and for errors ``qualname``) of each weight are read."""
    entries: list[tuple[str, tuple[int, ...], torch.dtype, int, str | None]] = []
    quantized = False
    for weight in weights:
        if scheme is not None and is_quantized_weight(weight.shape, weight.dtype, in_layer=group != GLOBAL_GROUP):
            scheme.check(weight.qualname, weight.shape)
            quantized = True
            for part in scheme.parts:
                shape, dtype = scheme.part_shape(part, weight.shape), scheme.part_dtype(part, weight.dtype)
                entries.append((weight.node, shape, dtype, math.prod(shape) * dtype.itemsize, part))
        else:
            entries.append((weight.node, weight.shape, weight.dtype, weight.nbytes, None))
    packed, offset = [], 0
    for node, shape, dtype, nbytes, part in entries:
        packed.append(PackedWeight(node=node, offset=offset, shape=shape, stride=_contiguous_strides(shape),
                                   dtype=dtype, nbytes=nbytes, part=part))
        offset = _align(offset + nbytes)
    return GroupLayout(group=group, weights=tuple(packed), nbytes=max(offset, ALIGNMENT),
                       scheme=scheme if quantized else None)


def group_layouts(plan: ModelPlan, scheme: QuantScheme | None = None) -> dict[int, GroupLayout]:
    """The packed layout of every weight group: each layer, and the global group.

    A layer's weights are packed in the order of their names inside the layer (the same in every
    layer): a loader can then lay a checkpoint's layers out exactly so before anything is traced
    (:mod:`hscompile.loading`), and the host store adopts those buffers instead of copying them.
    With ``scheme`` (the policy's :attr:`~hscompile.ir.policy.Policy.weight_format`) the layers'
    projections are packed quantized; the global group never is.
    """
    layouts = {
        layer.index: layout_group(layer.index, sorted(layer.weights, key=lambda w: w.local_name), scheme)
        for layer in plan.layers
    }
    layouts[GLOBAL_GROUP] = layout_group(GLOBAL_GROUP, plan.global_weights)
    return layouts


# -- the disk tier: weights read from the checkpoint's own files ------------------------------

DISK_ALIGN = 4096
"""Alignment of direct reads (file offset, length and memory address): the page size, a multiple
of every logical block size in use (512 or 4096 bytes)."""

DISK_SLOTS = 3
"""Host staging slots of the disk tier: one being read from disk, one whose copy to the device
runs, one read and waiting (FlexGen's disk -> host -> device pipeline: the read of layer l+2
beside the copy of l+1 and the compute of l). A choice, not a measurement."""

DISK_GAP = 2**20
"""Ranges of a layer closer than this in one file are read as one (a short gap costs less than
another request)."""

_FILE_ATTR = "_hscompile_file"
_OFFSET_ATTR = "_hscompile_file_offset"


@dataclass(frozen=True, slots=True)
class Extent:
    """A range of bytes one direct read brings in."""

    path: str
    offset: int
    nbytes: int


def map_file(path: str, nbytes: int) -> torch.UntypedStorage:
    """The file's first ``nbytes`` as a read-only memory map (nothing is read until a page is
    touched), remembered as stored in ``path``: tensors made from it are weights on disk
    (:func:`mapped_at`). The weight store never touches them; it reads them with direct reads.

    Read-only, because a writable private map of a file larger than memory is refused by the
    kernel's overcommit check (``torch.UntypedStorage.from_file`` makes one); a write through it
    would fault, and nothing writes weights on disk."""
    with open(path, "rb") as handle:
        memory = mmap.mmap(handle.fileno(), nbytes, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": nothing writes it
        storage = torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()  # keeps the map alive
    setattr(storage, _FILE_ATTR, path)  # torch keeps a storage's Python object, and so this mark
    return storage


def mapped_at(tensor: torch.Tensor) -> tuple[str, int] | None:
    """``(file, byte offset)`` of a contiguous weight whose storage :func:`map_file` made (or that
    :func:`plan_on_disk` marked); None for a weight held in memory."""
    storage = tensor.untyped_storage()
    path = getattr(storage, _FILE_ATTR, None)
    if path is None or not tensor.is_contiguous():
        return None
    return path, getattr(storage, _OFFSET_ATTR, 0) + tensor.storage_offset() * tensor.element_size()


def plan_on_disk(tensor: torch.Tensor, path: str, offset: int) -> None:
    """Mark ``tensor`` (a weight on the meta device, for a plan) as one a loader would leave in
    ``path`` at ``offset``: placement then plans its layer as read from disk at every step."""
    if tensor.device.type != "meta":
        raise ValueError("only a weight of a plan (on the meta device) is marked as on disk; a loader maps real ones")
    storage = tensor.untyped_storage()
    setattr(storage, _FILE_ATTR, path)
    setattr(storage, _OFFSET_ATTR, offset)


def disk_extents(pieces: Sequence[tuple[str, int, int]]) -> tuple[Extent, ...]:
    """The reads that bring in ``pieces`` (``(file, offset, nbytes)`` each): by file and offset,
    ranges that touch or lie within :data:`DISK_GAP` of each other merged."""
    extents: list[Extent] = []
    for path, offset, nbytes in sorted(pieces):
        last = extents[-1] if extents else None
        if last is not None and last.path == path and offset <= last.offset + last.nbytes + DISK_GAP:
            end = max(last.offset + last.nbytes, offset + nbytes)
            extents[-1] = Extent(path, last.offset, end - last.offset)
        else:
            extents.append(Extent(path, offset, nbytes))
    return tuple(extents)


def read_bytes(nbytes: int) -> int:
    """Host bytes a direct read of ``nbytes`` needs, wherever they start: the aligned range around
    them, and the alignment of the address."""
    return -(-nbytes // DISK_ALIGN) * DISK_ALIGN + 2 * DISK_ALIGN


def staging_bytes(extents: Sequence[Extent]) -> int:
    """Bytes of one host staging slot that takes a group read as ``extents``."""
    return sum(read_bytes(e.nbytes) for e in extents)


def disk_groups(layouts: Mapping[int, GroupLayout], weights: Mapping[str, torch.Tensor]) -> dict[int, tuple[Extent, ...]]:
    """The layers whose every weight (``weights``: placeholder -> tensor) lies in a file
    (:func:`mapped_at`), with the reads that bring each in. The weights outside the layers are
    never read from disk (a loader keeps them in memory)."""
    found: dict[int, tuple[Extent, ...]] = {}
    for group, layout in layouts.items():
        if group == GLOBAL_GROUP:
            continue
        pieces = []
        for packed in layout.weights:
            where = mapped_at(weights[packed.node])
            if where is None:
                break
            pieces.append((*where, weights[packed.node].nbytes))
        else:
            found[group] = disk_extents(pieces)
    return found


HOST_WEIGHTS_ATTR = "hscompile_host_weight_bytes"
"""The attribute a loader that kept layers on disk sets on the model: see :func:`host_weight_bytes`."""


def host_weight_bytes(model: object) -> int:
    """Host bytes a loader gave the weights of a model whose layers partly stay on disk (the held
    layers, the weights outside them, the disk tier's staging slots), which ``host_memory`` bounds
    together with the cache pools; 0 for any other model (its weights are the caller's)."""
    return int(getattr(model, HOST_WEIGHTS_ATTR, 0))
