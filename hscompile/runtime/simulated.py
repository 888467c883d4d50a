"""A simulated asynchronous device: the CPU, with CUDA's copy-stream and event semantics.

**A test tool.** ``HSCOMPILE_ASYNC_SIM=late|early|random:SEED`` with ``device="cpu"`` makes
:func:`~hscompile.runtime.device.device_backend` return a :class:`SimulatedAsyncDevice` instead of
the synchronous :class:`~hscompile.runtime.device.CpuDevice`. It reports ``asynchronous = True``, so
the runtime takes its CUDA paths (loads issued ahead into a second buffer, stores on the copy
stream, events between the streams), and it keeps those paths honest on any machine:

* every copy is queued, in issue order, on the one copy stream of its backend instance (the cache
  runtime and each compiled graph's weight runtime have their own backend, hence their own stream,
  as on CUDA) and returns an event (:class:`SimEvent`);
* a copy *completes* (its destination is written, from its source as the source is *then*) only
  when the semantics force it: compute waits on its event (:meth:`~SimulatedAsyncDevice.wait`), or
  on a later copy of the same stream (a stream runs in order), or the host synchronizes the device
  (:meth:`~SimulatedAsyncDevice.synchronize`, every simulated stream). The schedule says when, within
  that: ``late`` as late as allowed, ``early`` at once (what the synchronous ``CpuDevice`` does),
  ``random:SEED`` at any legal point, chosen at each call of the backend by a generator seeded with
  ``SEED`` (the same seed, the same schedule);
* from its issue until it completes, a copy's destination is **poisoned**: NaN for floating
  tensors, all bits set for integer ones (0xFF bytes). All-ones bytes are NaN read as any float
  width (fp32, fp16, bf16, fp64), so the byte buffers the runtime copies (weight groups packed as
  bytes, int8 cache rows) poison what is read through them: an int8 value alone reads as the finite
  -1, but every int8 payload here travels in the same copy as its float scales (``quantize_rows``
  puts a token's scales in its own row of bytes; a quantized weight group packs values, scales and
  zeros in one buffer), so a dequantized read before completion is NaN;
* the source is read when the copy completes (a reference to it is kept), so a source that compute
  overwrites before then is a race that shows as wrong data.

:meth:`~SimulatedAsyncDevice.fetch` is the host waiting for the *compute* stream, as ``x.cpu()`` is on
CUDA: it completes no copy the compute did not wait for. Compute itself is synchronous here, so an
event :meth:`~SimulatedAsyncDevice.record` returns has always happened: a copy issued ``after`` it may
start at once (its destination is poisoned at issue); a copy issued after another stream's copy
event starts, and is poisoned, when that copy completes, and so does one whose destination an
earlier copy of its own stream still reads (the stream runs in order: that is no race).

Counters: ``async_sim`` (the schedule's name, None on a real device), ``deferred_copies`` (copies
completed after the backend call that issued them: 0 under ``early``), ``copies``,
``pageable_copies`` (copies whose host side was not allocated by :meth:`host_buffer`; on CUDA such a
copy is not asynchronous). Host syncs are counted as on the CPU and on CUDA.

Not modelled yet (later increments of issue 25): queued copies hold their tensors strongly (no
caching allocator with per-stream free lists, so freeing a buffer with a copy pending is not caught),
no happens-before between the compute stream's allocations and the copy stream's first use, no
device/pinned tags on tensors (pageable ``.to(device)``, ``.item()`` inside a step are not counted),
no host reads of pinned pools checked against their copy's event beyond the poison, no clock. Copies
from or to host memory not allocated by :meth:`~SimulatedAsyncDevice.host_buffer` (the cache pools,
which ``pins_host = False`` allocates pageable; the model's own packed weights) are deferred like
pinned ones and only counted in ``pageable_copies``.
"""

from __future__ import annotations

import random
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .device_base import DeviceBackend
from .timeline import Timeline, active_timeline

__all__ = ["SCHEDULES", "SimEvent", "SimulatedAsyncDevice", "poison"]

SCHEDULES = ("late", "early", "random:SEED")
"""The schedules ``HSCOMPILE_ASYNC_SIM`` accepts."""

_LIVE: weakref.WeakSet[SimulatedAsyncDevice] = weakref.WeakSet()
"""Every simulated backend alive: one device, so :meth:`SimulatedAsyncDevice.synchronize` drains them all."""
_PINNED: weakref.WeakValueDictionary[int, torch.UntypedStorage] = weakref.WeakValueDictionary()
"""Host storages :meth:`SimulatedAsyncDevice.host_buffer` gave, by address: pinned memory belongs to the
process, not to one backend (a graph's weight store reuses the buffers an earlier graph's packed)."""


def poison(t: torch.Tensor) -> None:
    """Fill ``t`` with what a read of a copy's destination before the copy completes sees."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        info = torch.iinfo(t.dtype)
        t.fill_(-1 if info.min < 0 else info.max)  # every bit set: 0xFF bytes


@dataclass(eq=False, slots=True)
class SimEvent:
    """A point on a simulated stream: ``seq``, the copy it follows (compute: ``stream`` None, always done)."""

    stream: _Stream | None
    seq: int = 0

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.completed >= self.seq


@dataclass(eq=False, slots=True)
class _Copy:
    seq: int
    dst: torch.Tensor
    src: torch.Tensor
    after: SimEvent | None
    label: str
    lane: str
    timeline: Timeline | None
    started: bool = False
    gates: int = 0
    """Copies that must complete before this one may start (see :meth:`SimulatedAsyncDevice._copy`)."""


@dataclass(eq=False, slots=True)
class _Stream:
    """One in-order copy queue."""

    owner: SimulatedAsyncDevice
    queue: deque[_Copy] = field(default_factory=deque)
    issued: int = 0
    completed: int = 0
    waiting: dict[int, list[_Copy]] = field(default_factory=dict)
    """Copies gated on this stream's copy ``seq``: each may start once its gates have completed."""


class SimulatedAsyncDevice(DeviceBackend):
    """CUDA's copy-stream semantics on the CPU, with a schedule (see the module docstring)."""

    asynchronous = True

    def __init__(self, schedule: str) -> None:
        self.device = torch.device("cpu")
        mode, _, seed = schedule.partition(":")
        if mode not in ("late", "early", "random") or (mode == "random") != bool(seed) \
                or (seed and not seed.lstrip("-").isdigit()):
            raise ValueError(f"async simulation schedule must be one of {', '.join(SCHEDULES)} "
                             f"(SEED an integer), got {schedule!r}")
        self.async_sim = schedule
        self.mode = mode
        self._rng = random.Random(int(seed)) if seed else None
        self.deferred_copies = 0
        """Copies completed after the backend call that issued them."""
        self.copies = 0
        self.pageable_copies = 0
        """Copies whose host side is not a :meth:`host_buffer` (on CUDA they would not be asynchronous)."""
        self._stream = _Stream(self)
        self._issuing: _Copy | None = None
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"SimulatedAsyncDevice({self.async_sim!r}, pending={self.pending})"

    # -- the backend ---------------------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host buffer registered as pinned."""
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        storage = buffer.untyped_storage()
        _PINNED[storage.data_ptr()] = storage
        return buffer

    def is_pinned(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is (a view of) a buffer :meth:`host_buffer` gave."""
        return t.untyped_storage().data_ptr() in _PINNED

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                       lane: str = "copy: weights") -> SimEvent:
        return self._copy(dst, src, after, label, lane, host=src)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                     lane: str = "copy: cache") -> SimEvent:
        return self._copy(dst, src, after, label, lane, host=dst)

    def wait(self, event: Any) -> None:
        self._tick()
        if event is not None:
            _complete(_event(event))

    def record(self) -> SimEvent:
        self._tick()
        return SimEvent(None)  # compute is synchronous: everything issued to it has run

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        # x.cpu() on CUDA waits for the compute stream only: copies it never waited for may still run.
        self._tick()
        return super().fetch(x)

    def synchronize(self) -> None:
        self._tick()
        for backend in list(_LIVE):
            backend.drain()
        super().synchronize()

    # -- inspection ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Copies issued and not completed."""
        return len(self._stream.queue)

    def drain(self) -> None:
        """Complete every copy of this backend's stream (what a device synchronize does)."""
        if self._stream.queue:
            _complete(SimEvent(self._stream, self._stream.issued))

    # -- the simulation ------------------------------------------------------------------

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, label: str, lane: str, *,
              host: torch.Tensor) -> SimEvent:
        self._tick()
        if dst.shape != src.shape:
            raise ValueError(f"copy {label!r}: destination {tuple(dst.shape)} and source {tuple(src.shape)} differ")
        stream = self._stream
        stream.issued += 1
        copy = _Copy(stream.issued, dst, src, None if after is None else _event(after), label, lane, active_timeline())
        stream.queue.append(copy)
        self.copies += 1
        if not self.is_pinned(host):
            self.pageable_copies += 1
        # It starts (and may write its destination) once what it was issued after has happened and,
        # the stream being in order, once the earlier copies that read its destination are done.
        gates = [copy.after] if copy.after is not None and not copy.after.done else []
        readers = [c for c in stream.queue if c is not copy and _overlap(c.src, dst)]
        if readers:
            gates.append(SimEvent(stream, readers[-1].seq))
        for gate in gates:
            assert gate.stream is not None
            gate.stream.waiting.setdefault(gate.seq, []).append(copy)
        copy.gates = len(gates)
        if not gates:
            _start(copy)
        event = SimEvent(stream, copy.seq)
        if self.mode == "early":
            self._issuing = copy
            try:
                _complete(event)
            finally:
                self._issuing = None
        elif self.mode == "random":
            self._issuing = copy
            try:
                self._maybe_complete()
            finally:
                self._issuing = None
        return event

    def _tick(self) -> None:
        """A call of the backend: under ``random``, a point where some queued copies may complete."""
        if self.mode == "random":
            self._maybe_complete()

    def _maybe_complete(self) -> None:
        assert self._rng is not None
        queue = self._stream.queue
        if queue and self._rng.random() < 0.5:
            _complete(SimEvent(self._stream, queue[self._rng.randrange(len(queue))].seq))


def _event(event: Any) -> SimEvent:
    if not isinstance(event, SimEvent):
        raise TypeError(f"a simulated device's event must come from a simulated device, got {type(event).__name__}")
    return event


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share bytes (their storages' byte ranges, bounded, intersect)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or not a.numel() or not b.numel():
        return False

    def extent(t: torch.Tensor) -> tuple[int, int]:
        first = t.storage_offset() * t.element_size()
        last = first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
        return first, last

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def _start(copy: _Copy) -> None:
    """The copy may run from now on: its destination holds garbage until it completes."""
    if not copy.started:
        copy.started = True
        poison(copy.dst)


def _complete(event: SimEvent) -> None:
    """Complete every copy of ``event``'s stream up to it, in order, and what they wait for."""
    stream = event.stream
    if stream is None:
        return
    while stream.completed < event.seq:
        copy = stream.queue[0]
        if copy.after is not None and not copy.after.done:
            _complete(copy.after)  # it cannot have run before the copy it was issued after
        _start(copy)
        if copy.timeline is None:
            copy.dst.copy_(copy.src)
        else:
            with copy.timeline.span(copy.lane, copy.label, bytes=copy.src.numel() * copy.src.element_size()):
                copy.dst.copy_(copy.src)
        stream.queue.popleft()
        stream.completed = copy.seq
        if stream.owner._issuing is not copy:
            stream.owner.deferred_copies += 1
        for waiting in stream.waiting.pop(copy.seq, ()):
            waiting.gates -= 1
            if waiting.gates == 0:
                _start(waiting)
