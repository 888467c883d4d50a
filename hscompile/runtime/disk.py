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
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["ALIGN", "DiskReader", "directory_read_bandwidth", "read_bandwidth"]

ALIGN = 4096
"""Alignment of direct reads (offset, length and address): the page size, a multiple of every
logical block size in use (512 or 4096 bytes)."""

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
        self.size = os.fstat(self._fd).st_size

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
        size = _up(nbytes) + 2 * ALIGN  # the aligned range around the bytes, and the address's alignment
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
            return out
        first = _down(offset)
        span = _up(offset + nbytes) - first
        aligned = _aligned(into)
        if aligned.numel() < span:
            raise ValueError(f"a buffer of {into.numel()} bytes cannot take a direct read of {nbytes} bytes at "
                             f"{offset}: allocate it with DiskReader.buffer({nbytes})")
        # The aligned range may pass the end of the file: a direct read stops there.
        self._fill(aligned[:span], first, min(span, self.size - first))
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
