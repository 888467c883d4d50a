"""Weights at run time: the host weight store, resident device copies and the device slot ring.

* **Host store**: each streamed layer's weights packed into one host buffer (pinned on CUDA,
  so copies are asynchronous). The model's parameters are re-pointed at views of that buffer,
  so host memory holds each weight once. A layer stored quantized (the layout's ``scheme``) is
  quantized into its buffer instead, and the model keeps its own weights as they were.
* **Resident copies**: groups the policy keeps on the device are packed into a device buffer
  once, when the runtime is built (or, when the weights already live on the compute device,
  used where they are and not copied at all).
* **Slot ring**: ``ring_slots`` device buffers of the largest streamed layer. The streamed
  layer at position ``i`` of the streamed order always uses slot ``i % ring_slots``; a
  prefetch into a slot waits for the release of its previous occupant.
* **Disk tier**: a layer whose weights stay in the checkpoint's files (the policy's
  ``disk_layers``; a loader maps them, :func:`~hscompile.ir.layout.map_file`) has no host
  buffer: its prefetch takes it from the model's :class:`~hscompile.runtime.disk.DiskTier`, read
  there ahead of time, and copies each weight from the staging slot into the device slot (a
  quantized one, from its packed copy in the offload directory, in one piece: :func:`disk_sources`).

Every copy is counted: ``setup_h2d_bytes`` (resident copies, once) and ``weight_h2d_bytes``
(setup plus every prefetch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ir.layout import GroupLayout, disk_groups, mapped_at
from ..ir.policy import Policy
from ..ops.quant import quantize
from .device import DeviceBackend
from .disk import DiskReader, DiskTier, offload_file, offload_source

__all__ = ["Stored", "WeightRuntime", "disk_sources"]


@dataclass(slots=True)
class _Slot:
    buffer: torch.Tensor
    occupant: int | None = None
    ready: Any = None
    free: Any = None


def _pack(flat: torch.Tensor, layout: GroupLayout, sources: dict[str, torch.Tensor]) -> None:
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for packed in layout.weights:
        view = flat.narrow(0, packed.offset, packed.nbytes).view(packed.dtype).view(packed.shape)
        if packed.part is None:
            view.copy_(sources[packed.node])
            continue
        if packed.node not in quantized:
            assert layout.scheme is not None
            q = quantize(sources[packed.node], layout.scheme, packed.node)
            quantized[packed.node] = {"values": q.values, "scales": q.scales, "zeros": q.zeros}
        view.copy_(quantized[packed.node][packed.part])


def _views(flat: torch.Tensor, layout: GroupLayout) -> dict[str, torch.Tensor]:
    return {
        packed.node: flat.narrow(0, packed.offset, packed.nbytes).view(packed.dtype).view(packed.shape)
        for packed in layout.weights
    }


class WeightRuntime:
    """Serves ``wait_weights`` / ``prefetch_weights`` / ``release_weights`` for one compiled graph."""

    def __init__(
        self,
        policy: Policy,
        layouts: dict[int, GroupLayout],
        weights: dict[str, torch.Tensor],
        backend: DeviceBackend,
        disk: DiskTier | None = None,
        stored: dict[int, list[Stored]] | None = None,
    ) -> None:
        """``weights`` maps placeholder names to the model's weight tensors (dynamo's example inputs);
        ``disk`` is the model's disk tier when layers of it stay on disk, ``stored`` where each such
        layer's weights lie (:func:`disk_sources`)."""
        self.backend = backend
        self.layouts = layouts
        self.setup_h2d_bytes = 0
        self.streamed_h2d_bytes = 0
        self.prefetches = 0
        self.disk = disk
        self._resident: dict[int, torch.Tensor] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._slot_of: dict[int, int] = {}
        self._stored = dict(stored or {})
        # What the reader brings in after each streamed layer on disk: the next ones, cyclically (the
        # next step starts over), as many as it has slots; known once, not worked out at each prefetch.
        order = [g for g in policy.streamed_layers if g in self._stored]
        ahead = min(len(disk.slots), len(order)) if disk is not None else 0
        self._upcoming = {g: [order[(i + k) % len(order)] for k in range(1, ahead + 1)] for i, g in enumerate(order)}

        staging = []  # host buffers must outlive their asynchronous copies
        for group in policy.copied_groups:
            layout = layouts[group]
            flat = backend.device_buffer(layout.nbytes)
            # After an event recorded since the allocation: the allocator may have handed out memory
            # whose previous user, on the compute stream, is not done with it.
            if group in self._stored:
                self._from_disk(group, flat, after=backend.record(), label=f"resident {group}")
            else:
                staging.append(self._host_buffer(layout, weights, repoint=False))
                backend.copy_to_device(flat, staging[-1], after=backend.record(), label=f"resident {group}")
            self._resident[group] = flat
            self.setup_h2d_bytes += layout.nbytes
        backend.synchronize()
        del staging

        for position, group in enumerate(policy.streamed_layers):
            if group not in self._stored:
                self._host[group] = self._host_buffer(layouts[group], weights, repoint=True)
            self._slot_of[group] = position % policy.ring_slots
        slots = policy.ring_slots if policy.streamed_layers else 0
        self._slots = [_Slot(backend.device_buffer(policy.slot_bytes)) for _ in range(slots)]
        allocated = backend.record()  # the first prefetch into a slot waits for its allocation
        for slot in self._slots:
            slot.free = allocated

    # -- building ------------------------------------------------------------------------

    def _host_buffer(self, layout: GroupLayout, weights: dict[str, torch.Tensor], *, repoint: bool) -> torch.Tensor:
        """The group's packed host buffer, reusing one an earlier compilation made for the same weights."""
        sources = {p.node: weights[p.node] for p in layout.weights}
        existing = _packed_storage(layout, sources)
        if existing is not None and self.backend.is_pinned(existing):
            return existing
        flat = self.backend.host_buffer(layout.nbytes)
        _pack(flat, layout, sources)
        if repoint and layout.scheme is None:
            # The store now holds these weights; point the model at it so host memory holds them once.
            for node, view in _views(flat, layout).items():
                sources[node].data = view
        return flat

    # -- the ops -------------------------------------------------------------------------

    def reset(self) -> None:
        """Free every slot of the ring, at the start of a call and after one that raised midway
        (its copies stay ordered on the copy stream). A slot still held was never released, so
        compute may still read it: the next copy into it waits for an event recorded now."""
        held = [slot for slot in self._slots if slot.occupant is not None]
        if held:
            now = self.backend.record()
            for slot in held:
                slot.occupant, slot.free = None, now

    def prefetch(self, group: int) -> None:
        slot = self._slots[self._slot_of[group]]
        if slot.occupant is not None:
            raise RuntimeError(
                f"prefetch of layer {group} into a slot still held by layer {slot.occupant}: the schedule must "
                "release a slot before reusing it"
            )
        layout = self.layouts[group]
        if group in self._stored:
            slot.ready = self._from_disk(group, slot.buffer, after=slot.free, label=f"weights L{group}")
        else:
            slot.ready = self.backend.copy_to_device(
                slot.buffer.narrow(0, 0, layout.nbytes), self._host[group], after=slot.free, label=f"weights L{group}"
            )
        slot.occupant = group
        self.streamed_h2d_bytes += layout.nbytes
        self.prefetches += 1

    def wait(self, group: int) -> torch.Tensor:
        resident = self._resident.get(group)
        if resident is not None:
            return resident
        slot = self._slots[self._slot_of[group]]
        if slot.occupant != group:
            raise RuntimeError(f"wait for layer {group}, which was not prefetched (its slot holds {slot.occupant})")
        self.backend.wait(slot.ready)
        return slot.buffer.narrow(0, 0, self.layouts[group].nbytes)

    def release(self, group: int) -> None:
        if group in self._resident:
            return
        slot = self._slots[self._slot_of[group]]
        if slot.occupant != group:
            raise RuntimeError(f"release of layer {group}, which does not hold a slot")
        slot.free = self.backend.record()
        slot.occupant = None

    def _from_disk(self, group: int, flat: torch.Tensor, *, after: Any, label: str) -> Any:
        """Copy layer ``group`` from its disk tier staging slot into ``flat`` (device), weight by
        weight (the file lays them out its own way); returns the event of the last copy."""
        assert self.disk is not None
        upcoming = self._upcoming.get(group, [])  # none for a resident layer, read once
        staged = self.disk.get(group, upcoming, self.backend)
        done = None
        for offset, nbytes, path, start in self._stored[group]:
            done = self.backend.copy_to_device(flat.narrow(0, offset, nbytes), staged.at(path, start, nbytes),
                                               after=after, label=label)
        self.disk.copied(staged, done, upcoming)
        return done

    # -- accounting ----------------------------------------------------------------------

    @property
    def weight_h2d_bytes(self) -> int:
        return self.setup_h2d_bytes + self.streamed_h2d_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory this runtime holds for weights: resident copies and the slot ring."""
        return sum(t.numel() for t in self._resident.values()) + sum(s.buffer.numel() for s in self._slots)

    def host_buffers(self) -> Sequence[torch.Tensor]:
        return list(self._host.values())


Stored = tuple[int, int, str, int]
"""Where bytes of a layer on disk lie: (offset in the packed layer, bytes, file, offset in the file)."""


def disk_sources(policy: Policy, layouts: dict[int, GroupLayout], weights: dict[str, torch.Tensor]
                 ) -> dict[int, list[Stored]]:
    """Where the weights of each layer on disk (every weight file-mapped, :func:`~hscompile.ir.layout.mapped_at`)
    lie: each where the model's tensor maps it; for a layer stored quantized (the policy's
    ``weight_format``), its packed quantized layout, written once into the policy's
    ``offload_dir`` (:func:`~hscompile.runtime.disk.offload_file`) and read from there whole."""
    found: dict[int, list[Stored]] = {}
    for group in disk_groups(layouts, weights):
        layout = layouts[group]
        where = {p.node: mapped_at(weights[p.node]) for p in layout.weights}
        if layout.scheme is None:
            found[group] = [(p.offset, p.nbytes, *where[p.node]) for p in layout.weights]  # type: ignore[misc]
            continue
        assert policy.offload_dir is not None, "placement names the offload directory of quantized layers on disk"
        path = _quantized_copy(layout, weights, where, Path(policy.offload_dir))  # type: ignore[arg-type]
        found[group] = [(0, layout.nbytes, str(path), 0)]
    return found


def _quantized_copy(layout: GroupLayout, weights: dict[str, torch.Tensor], where: dict[str, tuple[str, int]],
                    directory: Path) -> Path:
    """The layer packed and quantized as ``layout`` says, in a file of ``directory`` keyed by its
    sources (their files' sizes and times) and the format. Its weights are read from their files
    with direct reads, one layer in memory at a time, not through the model's memory maps."""
    nodes = list(dict.fromkeys(p.node for p in layout.weights))
    identity = {"quantized": repr(layout.scheme),
                "layout": [[p.node, p.part, p.offset, p.nbytes, str(p.dtype)] for p in layout.weights],
                "sources": [offload_source(where[n][0], where[n][1], weights[n].nbytes, weights[n].dtype,
                                           weights[n].shape) for n in nodes]}

    def fill(flat: torch.Tensor) -> None:
        sources = {}
        for node in nodes:
            tensor = weights[node]
            with DiskReader(where[node][0]) as reader:
                data = reader.read(where[node][1], tensor.nbytes, DiskReader.buffer(tensor.nbytes))
            sources[node] = data.view(tensor.dtype).view(tensor.shape)
        _pack(flat, layout, sources)

    return offload_file(directory, identity, layout.nbytes, fill)


def _packed_storage(layout: GroupLayout, sources: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The flat buffer the group's weights already are views of, if an earlier store packed them."""
    if layout.scheme is not None:
        return None  # a quantized buffer is never the model's own
    storages = {t.untyped_storage().data_ptr() for t in sources.values()}
    if len(storages) != 1:
        return None
    first = next(iter(sources.values()))
    storage = first.untyped_storage()
    if storage.nbytes() != layout.nbytes:
        return None
    flat = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, 0, (layout.nbytes,), (1,))
    for packed in layout.weights:
        tensor = sources[packed.node]
        if tensor.storage_offset() * tensor.element_size() != packed.offset or tuple(tensor.shape) != packed.shape:
            return None
    return flat
