"""Cache blocks on disk: the third home of KV and ACT blocks, past what the host pools hold.

When a call's plan spills (:class:`~hscompile.ir.call.CacheSpill`, decided by
:func:`~hscompile.planner.spill.plan_spill`), each kind's :class:`~hscompile.runtime.blocks.BlockPool`
numbers more blocks than its host tensor holds: blocks ``0 .. host_blocks - 1`` live in the host
pool as before, the others in a :class:`CacheFile`, laid out like the pool (token-major per
layer: ``[layers, slots, row bytes]``). The pools hand out their lowest free blocks first, so the
host blocks fill first and a sequence's blocks of one kind stay consecutive: its past in a layer
is still a run or two, now split where the host part ends (:func:`split_runs`).

Loads read a file run into a host staging buffer and copy it to the device as a host run is copied
(:class:`SpillStaging`); stores copy the new tokens' rows to host staging and write them to the
file once the step's tokens were fetched (the copies are done then), before the next step loads
anything (a batch's last step's, which nothing reads, are not written). Reads go through the page
cache and each step ends by dropping the file's pages from it (``POSIX_FADV_DONTNEED``), so
neither the process nor the page cache holds the spilled blocks between steps: the next step reads
them from the disk.

The file is created in ``offload_dir``, unlinked at once (nothing is left behind, whatever ends
the process) and its size reserved up front with ``posix_fallocate``: a disk without room is a
:class:`~hscompile.errors.BudgetError` naming the directory before any token is generated.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import format_bytes
from ..errors import BudgetError, CheckpointError
from .disk import _memory

__all__ = ["CacheFile", "SpillStaging", "split_runs"]

Run = tuple[int, int, int]


def split_runs(runs: list[Run], boundary: int) -> tuple[list[Run], list[Run]]:
    """``runs`` (``(first slot, destination, count)``) split at pool slot ``boundary``: ``(the runs'
    parts below it, the parts at or past it with their slots counted from it)``."""
    below: list[Run] = []
    past: list[Run] = []
    for slot, dest, count in runs:
        if slot + count <= boundary:
            below.append((slot, dest, count))
        elif slot >= boundary:
            past.append((slot - boundary, dest, count))
        else:
            head = boundary - slot
            below.append((slot, dest, head))
            past.append((0, dest + head, count - head))
    return below, past


class CacheFile:
    """One kind's blocks past its host pool (see the module docstring)."""

    def __init__(self, directory: str | Path, *, kind: str, layers: int, slots: int, row_bytes: int) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.layers, self.slots, self.row_bytes = layers, slots, row_bytes
        self.size = layers * slots * row_bytes
        self.read_bytes = self.write_bytes = 0
        self.read_seconds = self.write_seconds = 0.0
        try:
            fd, name = tempfile.mkstemp(prefix=f"hscompile-{kind}-blocks-", suffix=".bin", dir=self.directory)
        except OSError as error:
            raise BudgetError(f"offload_dir {self.directory} cannot hold the {kind.upper()} cache blocks past "
                              f"host_memory: {error.strerror or error}; give a writable offload_dir, a larger "
                              "host_memory, or disk_cache='off'") from None
        os.unlink(name)  # the open descriptor keeps it; nothing is left behind
        self._fd = fd
        self.name = name
        try:
            if self.size:
                os.posix_fallocate(fd, 0, self.size)
        except OSError as error:
            os.close(fd)
            self._fd = -1
            raise BudgetError(f"offload_dir {self.directory} has no room for {format_bytes(self.size)} ({self.size} "
                              f"bytes) of {kind.upper()} cache blocks past host_memory: {error.strerror or error}; "
                              "free space there, give another offload_dir, a larger host_memory, or "
                              "disk_cache='off'") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _offset(self, layer: int, slot: int, count: int) -> int:
        if not (0 <= layer < self.layers and 0 <= slot and slot + count <= self.slots):
            raise RuntimeError(f"{self.kind} cache file: layer {layer} slots {slot}..{slot + count} outside "
                               f"{self.layers} layers of {self.slots} slots")
        return (layer * self.slots + slot) * self.row_bytes

    def read(self, layer: int, slot: int, count: int, into: torch.Tensor) -> None:
        """Rows ``slot .. slot + count`` of ``layer`` into ``into`` (contiguous host memory of at
        least their bytes)."""
        self._transfer(os.preadv, layer, slot, count, into, "reading")

    def write(self, layer: int, slot: int, rows: torch.Tensor) -> None:
        """``rows`` (contiguous host memory, one row a slot) into ``layer``'s slots from ``slot``."""
        self._transfer(os.pwritev, layer, slot, rows.shape[0], rows, "writing")

    def _transfer(self, call: Any, layer: int, slot: int, count: int, memory: torch.Tensor, doing: str) -> None:
        nbytes = count * self.row_bytes
        if memory.device.type != "cpu" or not memory.is_contiguous() or memory.numel() * memory.element_size() < nbytes:
            raise RuntimeError(f"{doing} cache rows needs {nbytes} bytes of contiguous host memory")
        offset = self._offset(layer, slot, count)
        flat = memory.view(-1).view(torch.uint8) if memory.dtype != torch.uint8 else memory.view(-1)
        start, done = time.perf_counter(), 0
        while done < nbytes:
            try:
                moved = call(self._fd, [_memory(flat[done:], nbytes - done)], offset + done)
            except OSError as error:
                raise CheckpointError(f"{doing} {nbytes - done} bytes of {self.kind.upper()} cache blocks at byte "
                                      f"{offset + done} of {self.name} (offload_dir) failed: "
                                      f"{error.strerror or error}") from None
            if moved <= 0:
                raise CheckpointError(f"{self.name} (offload_dir) ended at byte {offset + done} while {doing} "
                                      "cache blocks: the file was truncated")
            done += moved
        seconds = time.perf_counter() - start
        if call is os.preadv:
            self.read_bytes += nbytes
            self.read_seconds += seconds
        else:
            self.write_bytes += nbytes
            self.write_seconds += seconds

    def drop_cached(self) -> None:
        """Drop the file's pages from the page cache (written ones once written back): the next
        step reads the blocks from the disk, and memory does not fill with them."""
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass(slots=True)
class _Pending:
    file: CacheFile
    layer: int
    slot: int
    rows: torch.Tensor
    done: Any


@dataclass(slots=True)
class SpillStaging:
    """Host staging of the file runs: per load buffer, the memory a load's file runs are read into
    (reused once the copies that last read it are done); the rows stores copied to the host, written
    to the file by :meth:`flush`."""

    backend: Any
    buffers: list[torch.Tensor] = field(default_factory=list)
    free: list[Any] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        """Staging buffer ``index`` with room for ``nbytes``, once the copies that read it last are
        done (a host wait: the disk read happens on the host)."""
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
            self.free.append(None)
        self.backend.host_wait(self.free[index])
        self.free[index] = None
        if self.buffers[index].numel() < nbytes:
            self.buffers[index] = self.backend.host_buffer(nbytes)
        self.backend.check_host_write(self.buffers[index][:nbytes], what="a cache staging buffer read from disk")
        return self.buffers[index]

    def read_by(self, index: int, event: Any) -> None:
        """The copies out of buffer ``index`` are done at ``event``."""
        self.free[index] = event

    def store(self, file: CacheFile, layer: int, slot: int, packed: torch.Tensor, *, after: Any, label: str) -> Any:
        """Rows of ``packed`` (new tokens, on the device) into ``file`` from ``slot``: written now
        where copies are synchronous, else copied to host staging (the returned event marks the
        copy done) and written by :meth:`flush`."""
        if not self.backend.asynchronous:
            file.write(layer, slot, packed.contiguous())
            return None
        rows = self.backend.host_tensor(tuple(packed.shape), packed.dtype)
        done = self.backend.copy_to_host(rows, packed, after=after, label=label)
        self.pending.append(_Pending(file, layer, slot, rows, done))
        return done

    def flush(self) -> None:
        """Write the stored rows copied so far (their copies are done, or waited for here)."""
        pending, self.pending = self.pending, []
        for item in pending:
            self.backend.host_wait(item.done)
            item.file.write(item.layer, item.slot, item.rows)

    def reset(self) -> None:
        """Forget buffers and stored rows not written yet (the batch ended, or the next one starts:
        nothing reads them), once their copies are done."""
        pending, self.pending = self.pending, []
        for item in pending:
            self.backend.host_wait(item.done)
        self.buffers.clear()
        self.free.clear()
