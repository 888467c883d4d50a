"""Reading byte ranges of a file into host memory, as the disk tier streams weights (issue 26).

:class:`DiskReader` reads with large aligned direct reads (``O_DIRECT``: the page cache neither
serves nor keeps them, so reading a checkpoint larger than memory does not fill memory, and the
rate is the device's) where the filesystem allows it; elsewhere (tmpfs, some network filesystems)
with ordinary reads, each followed by ``POSIX_FADV_DONTNEED`` so the page cache does not grow
without bound. Direct reads need the file offset, the length and the memory address aligned to the
device's block: :meth:`DiskReader.buffer` allocates host memory with the slack that takes, and
:meth:`DiskReader.read` reads the aligned range around the bytes asked for and returns a view of
exactly them (no copy). A short read (the file ends before the range) is a
:class:`~hscompile.errors.CheckpointError` naming the file.

:func:`read_bandwidth` measures the rate a file reads at this way (``benchmarks/bandwidth.py --disk
FILE``); :func:`directory_read_bandwidth` the rate of a directory's filesystem (``hscompile tune --disk DIR``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from ..ir.layout import DISK_ALIGN, Extent, read_bytes, staging_bytes

if TYPE_CHECKING:
    from .device_base import DeviceBackend

__all__ = ["ALIGN", "DiskReader", "DiskTier", "Staged", "directory_read_bandwidth", "offload_file", "offload_source",
           "read_bandwidth"]

ALIGN = DISK_ALIGN

_CHUNK = 16 * 2**20
"""The most one system call reads: large enough to reach the device's rate, small enough to stay
interruptible."""


def _down(n: int) -> int:
    return n - n % ALIGN


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DiskReader:
    """Reads ranges of one file (see the module docstring). ``direct``: try ``O_DIRECT`` (the
    default); False reads through the page cache and drops what it read from it."""

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        self.direct = False
        """Whether reads bypass the page cache (``O_DIRECT`` was accepted and a first read worked)."""
        self._fd = -1
        try:
            if direct and hasattr(os, "O_DIRECT"):
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = self._probe()
                if not self.direct:
                    os.close(self._fd)
                    self._fd = -1
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise CheckpointError(f"{self.path} cannot be read: {error.strerror or error}") from None
        opened = os.fstat(self._fd)
        self.size = opened.st_size
        self._stamp = (opened.st_size, opened.st_mtime_ns)
        """What the file was when opened: a write into it since (same size or not) changes it."""

    def _check_unchanged(self) -> None:
        """A file written in place after it was opened is refused: the weights read would mix old
        and new bytes (a file replaced by a new one is not: the open descriptor keeps the old one)."""
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != self._stamp:
            raise CheckpointError(f"{self.path} was written to after hscompile opened it (size {self._stamp[0]} -> "
                                  f"{now.st_size} bytes, modified at {now.st_mtime_ns / 1e9:.3f}): the file is "
                                  "truncated or changed; load the model again")

    def _probe(self) -> bool:
        """Whether a direct read works here (tmpfs refuses it at open or at the first read)."""
        probe = self.buffer(ALIGN)
        try:
            os.preadv(self._fd, [_memory(_aligned(probe), ALIGN)], 0)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @staticmethod
    def buffer(nbytes: int, *, allocate: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Host memory :meth:`read` can read any ``nbytes`` bytes into, wherever they start in the
        file (``allocate(n)``: how to get ``n`` bytes, pinned on CUDA; default pageable)."""
        size = read_bytes(nbytes)  # the aligned range around the bytes, and the address's alignment
        return allocate(size) if allocate is not None else torch.empty(size, dtype=torch.uint8)

    def read(self, offset: int, nbytes: int, into: torch.Tensor) -> torch.Tensor:
        """Bytes ``offset .. offset + nbytes`` of the file, read into ``into`` (a :meth:`buffer` of at
        least ``nbytes``): a view of exactly them."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointError(f"{self.path} ends at byte {self.size}, before bytes {offset}..{offset + nbytes} "
                                  "a tensor is stored at: the file is truncated or changed")
        if into.dtype != torch.uint8 or into.dim() != 1 or not into.is_contiguous():
            raise ValueError("read into a contiguous uint8 buffer (DiskReader.buffer)")
        if not self.direct:
            out = into[:nbytes]
            self._fill(out, offset, nbytes)
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
            self._check_unchanged()
            return out
        first = _down(offset)
        span = _up(offset + nbytes) - first
        aligned = _aligned(into)
        if aligned.numel() < span:
            raise ValueError(f"a buffer of {into.numel()} bytes cannot take a direct read of {nbytes} bytes at "
                             f"{offset}: allocate it with DiskReader.buffer({nbytes})")
        # The aligned range may pass the end of the file: a direct read stops there.
        self._fill(aligned[:span], first, min(span, self.size - first))
        self._check_unchanged()
        return aligned[offset - first:offset - first + nbytes]

    def _fill(self, out: torch.Tensor, offset: int, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            count = min(_CHUNK, out.numel() - done)
            try:
                got = os.preadv(self._fd, [_memory(out[done:], count)], offset + done)
            except OSError as error:
                raise CheckpointError(f"{self.path}: reading {count} bytes at {offset + done} failed: "
                                      f"{error.strerror or error}") from None
            if got <= 0:
                raise CheckpointError(f"{self.path} ends before byte {offset + nbytes}: the file is truncated or "
                                      "changed")
            done += got


def _aligned(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` from its first address aligned to :data:`ALIGN`."""
    return buffer[(-buffer.data_ptr()) % ALIGN:]


def _memory(t: torch.Tensor, nbytes: int) -> memoryview:
    """``nbytes`` of ``t``'s memory (contiguous ``uint8``) as a writable buffer for ``preadv``."""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def read_bandwidth(path: str | Path, *, nbytes: int | None = None, direct: bool = True) -> tuple[float, bool]:
    """``(bytes per second, direct)``: ``path`` read from its start in chunks of :data:`_CHUNK`
    (all of it, or its first ``nbytes``), as :class:`DiskReader` reads. The first read of a file
    through the page cache (``direct`` False, or refused) may be served from memory: measure a
    file larger than memory, or one not read since it was written with ``direct``."""
    with DiskReader(path, direct=direct) as reader:
        total = reader.size if nbytes is None else min(nbytes, reader.size)
        buffer = DiskReader.buffer(_CHUNK)
        start = time.perf_counter()
        for offset in range(0, total, _CHUNK):
            reader.read(offset, min(_CHUNK, total - offset), buffer)
        seconds = time.perf_counter() - start
        return total / seconds if seconds > 0 else float("inf"), reader.direct


def directory_read_bandwidth(directory: str | Path, *, nbytes: int = 256 * 2**20) -> float:
    """Bytes per second :class:`DiskReader` reads from ``directory``'s filesystem: its largest
    file's first ``nbytes`` when one has that many (a checkpoint's weights), else a file of
    ``nbytes`` written there, synced, read back and removed (an empty ``offload_dir``). Direct
    reads where the filesystem takes them, so the page cache does not answer for the disk."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory: measure the disk of a checkpoint's or an offload directory")
    files = [f for f in directory.iterdir() if f.is_file() and not f.is_symlink()]
    largest = max(files, key=lambda f: f.stat().st_size, default=None)
    if largest is not None and largest.stat().st_size >= nbytes:
        return read_bandwidth(largest, nbytes=nbytes)[0]
    probe = directory / f".hscompile-disk-probe-{os.getpid()}"
    try:
        with probe.open("wb") as handle:
            chunk = os.urandom(_CHUNK)  # incompressible, as weights are
            for _ in range(-(-nbytes // _CHUNK)):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return read_bandwidth(probe, nbytes=nbytes)[0]
    except OSError as error:
        raise ValueError(f"cannot measure the disk of {directory}: {error.strerror or error}") from None
    finally:
        probe.unlink(missing_ok=True)


@dataclass(slots=True, eq=False)
class Staged:
    """One host staging slot of a :class:`DiskTier`, and the group read into it."""

    buffer: torch.Tensor
    group: int | None = None
    free: Any = None
    """The event after which no copy reads this slot any more (None: none ever did, or copies are synchronous)."""
    future: Future[None] | None = None
    """The read in flight on the reader thread (None: not started, or done)."""
    error: CheckpointError | None = None
    """A read that failed on the caller's thread (no reader thread), raised when the group is asked for."""
    views: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    """``(file, extent offset) -> the extent's bytes`` once read."""

    def at(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes ``offset .. offset + nbytes`` of ``path``, as read into this slot."""
        for (file, start), data in self.views.items():
            if file == path and start <= offset and offset + nbytes <= start + data.numel():
                return data[offset - start:offset - start + nbytes]
        raise KeyError(f"bytes {offset}..{offset + nbytes} of {path} were not read for layer {self.group}")


class DiskTier:
    """The disk tier of a model: its layers read from the checkpoint's files into a few host
    staging slots, ahead of the copies to the device (see :data:`~hscompile.ir.layout.DISK_SLOTS`).

    :meth:`get` hands over a group's slot once read (waiting for the read if it is still running)
    and starts reading the groups the caller says come next into the free slots; :meth:`copied`
    gives the slot back with the event after which its copies are done. The reads run on one
    thread (a direct read releases the GIL, so it runs beside compute) and wait for that event
    before they overwrite a slot. Where the backend's events cannot be waited for from another
    thread (the simulated device) each read runs at once, on the caller's thread. A read asked for
    out of the expected order (another graph, a call that failed midway) drops the reads ahead
    and starts over: correct, only slower. One tier serves every graph of a model, so host memory
    holds its slots once.
    """

    def __init__(self, extents: Mapping[int, Sequence[Extent]], backend: DeviceBackend, *,
                 slots: int) -> None:
        self.extents = {group: tuple(e) for group, e in extents.items()}
        self.slot_bytes = max((staging_bytes(e) for e in self.extents.values()), default=0)
        self._slots = [Staged(backend.host_buffer(self.slot_bytes)) for _ in range(slots)]
        self._free: deque[Staged] = deque(self._slots)
        self._queue: deque[Staged] = deque()
        self._readers: dict[str, DiskReader] = {}
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="hscompile-disk")
                      if backend.host_threads else None)
        self._backend = backend
        self.read_bytes = 0
        self.reads = 0
        """Groups read from disk."""
        self.read_seconds = 0.0
        """Seconds the reads took (on the reader thread: beside the compute)."""
        self.wait_seconds = 0.0
        """Seconds :meth:`get` waited for a read not done yet (the disk behind the compute)."""
        if self._pool is not None:
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    @property
    def slots(self) -> Sequence[Staged]:
        return tuple(self._slots)

    @property
    def host_bytes(self) -> int:
        """Host memory the staging slots hold."""
        return sum(slot.buffer.numel() for slot in self._slots)

    def get(self, group: int, upcoming: Sequence[int], backend: DeviceBackend) -> Staged:
        """``group``'s slot, read; starts the reads of ``upcoming`` (the groups asked for next, in
        order) into the slots free now."""
        self._backend = backend
        while self._queue and self._queue[0].group != group:
            self._drop(self._queue.popleft())
        if not self._queue:
            self._submit(group)
        slot = self._queue.popleft()
        try:
            self._finish(slot)
        except BaseException:
            self._drop(slot)  # the slot is free again: a later call (after the file is fixed) reads anew
            raise
        self._ahead(upcoming)
        return slot

    def copied(self, slot: Staged, event: Any, upcoming: Sequence[int] = ()) -> None:
        """The copies from ``slot`` are issued; it may be read into again after ``event``."""
        slot.free, slot.group = event, None
        slot.views.clear()
        self._free.append(slot)
        self._ahead(upcoming)

    # -- reading -------------------------------------------------------------------------

    def _ahead(self, upcoming: Sequence[int]) -> None:
        queued = [slot.group for slot in self._queue]
        for position, group in enumerate(upcoming):
            if position < len(queued):
                if queued[position] != group:
                    return  # another order was asked for: the next get drops what does not match
                continue
            if not self._free or group not in self.extents:
                return
            self._submit(group)

    def _submit(self, group: int) -> None:
        if not self._free:
            raise RuntimeError(f"no free staging slot for layer {group}: every slot is held; give slots back "
                               "(DiskTier.copied) before asking for more")
        slot = self._free.popleft()
        slot.group = group
        self._queue.append(slot)
        if self._pool is not None:
            slot.future = self._pool.submit(self._read, slot, group, self._backend)
        else:  # at once, as the reader thread would: so the simulator sees a slot reused too early
            try:
                self._read(slot, group, self._backend)
            except CheckpointError as error:  # raised when the group is asked for, as a thread's would be
                slot.error = error

    def _finish(self, slot: Staged) -> None:
        start = time.perf_counter()
        if slot.future is not None:
            future, slot.future = slot.future, None
            future.result()  # a failed read (a truncated file) raises here, on the caller's thread
        if slot.error is not None:
            error, slot.error = slot.error, None
            raise error
        self.wait_seconds += time.perf_counter() - start

    def _drop(self, slot: Staged) -> None:
        if slot.future is not None:
            slot.future.cancel()
            try:
                slot.future.result()
            except BaseException:  # noqa: BLE001 - a read nobody will use: its failure is not this call's
                pass
            slot.future = None
        slot.group, slot.error = None, None
        slot.views.clear()
        self._free.append(slot)

    def _read(self, slot: Staged, group: int | None, backend: DeviceBackend) -> None:
        assert group is not None
        start = time.perf_counter()
        backend.host_wait(slot.free)  # the copies that read this slot before are done
        backend.check_host_write(slot.buffer, what=f"the disk read of layer {group}")
        position = 0
        for extent in self.extents[group]:
            need = read_bytes(extent.nbytes)
            data = self._reader(extent.path).read(extent.offset, extent.nbytes, slot.buffer[position:position + need])
            slot.views[(extent.path, extent.offset)] = data
            position += need
            self.read_bytes += extent.nbytes
        self.reads += 1
        self.read_seconds += time.perf_counter() - start

    def _reader(self, path: str) -> DiskReader:
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = DiskReader(path)
        return reader


def offload_source(path: str | Path, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> list[object]:
    """What an offload file's key records of one source tensor: its file (resolved), the file's size
    and modification time (a checkpoint changed since gets new keys), where the tensor lies and what it is."""
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, offset, nbytes, str(dtype), list(shape)]


OFFLOAD_FORMAT = 1
"""Version of what an offload file holds (a layer packed as its layout says); part of every key, so
files an older layout wrote are never trusted."""


def offload_file(directory: Path, identity: object, nbytes: int, fill: Callable[[torch.Tensor], None]) -> Path:
    """The file of ``nbytes`` under ``directory`` that ``identity`` (JSON data naming the sources,
    their files' sizes and modification times, and the conversion) keys: an existing one is used as
    it is, else ``fill`` writes a host buffer of ``nbytes`` and it is written once, atomically (a
    temporary file, synced, renamed: no run ever finds a partial file under a key). A failed write
    (a full disk) is a :class:`~hscompile.errors.CheckpointError` naming the file; the temporary is
    removed."""
    key = hashlib.sha256(json.dumps([OFFLOAD_FORMAT, identity], sort_keys=True).encode()).hexdigest()[:40]
    path = directory / f"{key}.layer"
    if path.is_file() and path.stat().st_size == nbytes:
        return path
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    fill(buffer)
    temporary = directory / f".{key}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as out:
            out.write(memoryview(buffer.numpy()))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path} ({nbytes} bytes) in offload_dir {directory}: "
                              f"{error.strerror or error}; free space there or give another offload_dir") from None
    return path
