"""A simulated asynchronous device: the CPU, with CUDA's stream, event and allocator semantics.

**A test tool.** ``HSCOMPILE_ASYNC_SIM=late|early|random:SEED`` with ``device="cpu"`` makes
:func:`~hscompile.runtime.device.device_backend` return a :class:`SimulatedAsyncDevice` instead of
the synchronous :class:`~hscompile.runtime.device.CpuDevice`. It reports ``asynchronous = True`` and
``pins_host = True``, so the runtime takes its CUDA paths (loads issued ahead into a second buffer,
stores on the copy stream, events between the streams), and it keeps those paths honest on any
machine.

**Copies.** Every copy is queued, in issue order, on the one copy stream of its backend instance
(the cache runtime and each compiled graph's weight runtime have their own backend, hence their own
stream, as on CUDA) and returns an event (:class:`SimEvent`). A copy *completes* (its destination is
written, from its source as the source is *then*) only when the semantics force it: compute waits
on its event (:meth:`~SimulatedAsyncDevice.wait`) or on a later copy of the same stream (a stream
runs in order), or the host synchronizes the device (:meth:`~SimulatedAsyncDevice.synchronize`). The
schedule says when, within that: ``late`` as late as allowed, ``early`` at once (what the
synchronous ``CpuDevice`` does), ``random:SEED`` at any legal point, chosen at each call of the
backend by a generator seeded with ``SEED``. From its start until it completes, a copy's
destination is **poisoned**: NaN for floating tensors, all bits set for integer ones (0xFF bytes,
which read as NaN through any float view, so an int8 cache row or a packed weight group is NaN once
dequantized: each travels in one copy with its float scales).

**The allocator.** A queued copy holds its buffers by weak reference only, as CUDA's caching
allocator does (it knows nothing of the copy stream unless ``record_stream`` is called): when the
runtime drops the last reference to a buffer a copy still reads or writes, the memory would go
back to the compute stream's free list and be handed out again while the copy runs. The simulator
raises :class:`AsyncHazard` naming the copy, at the next backend call or when the copy completes.

**Happens-before.** Compute's clock advances at each :meth:`~SimulatedAsyncDevice.record`; a copy
stream knows the newest compute event any of its copies was issued after (a vector clock of two
entries: compute knows the copy streams through the copies it waited for, which complete then).
Inside a tracked call (below) the simulator sees every torch call the runtime and an eager graph
make, and remembers the compute clock of the last access to each device buffer, its allocation
included; a copy whose device side compute touched after the copy stream's newest event (memory
just allocated, or a buffer compute still reads) is an :class:`AsyncHazard`. So is any access of
compute or host to the destination of a copy not yet completed, and a write to the source of one.
Accesses inside Inductor's kernels are invisible to it (the poison still shows them): the eager
lowering is the one that shows every access.

**Host syncs.** :meth:`~SimulatedAsyncDevice.tracking` (entered by the generator around a call and by
the executor around a graph call) watches the torch calls made meanwhile and tags each tensor as
*host* (built from Python data or host tensors without a ``device``, fetched, a pool) or *device*
(everything else: parameters, activations, buffers made with ``device=``), as a CUDA run would
place them. What would make the host wait for the device on CUDA counts in ``host_syncs`` and is
named in :attr:`~SimulatedAsyncDevice.sync_sites` (file:line of the caller): ``.item()``,
``.tolist()``, ``bool()``/``int()``/``float()``, ``nonzero`` and other ops with data-dependent
shapes on device tensors; ``torch.tensor(..., device=...)``; ``.to``/``.copy_`` between host and
device unless from pinned memory with ``non_blocking=True``; an op that mixes host and device
tensors (on CUDA an implicit copy, or an error). A non-blocking copy into pageable host memory is an
:class:`AsyncHazard` (CUDA would run it synchronously, or the host would read it too early). A host
read of a host buffer a copy to the host wrote needs a host wait after that copy (``fetch`` after
compute waited for it, or ``synchronize``): reading it before is an :class:`AsyncHazard`.

**Pinned memory.** :meth:`~SimulatedAsyncDevice.host_buffer` and
:meth:`~SimulatedAsyncDevice.host_tensor` register their storage as pinned; ``pageable_copies``
counts copies whose host side is not; :meth:`~SimulatedAsyncDevice.host_bytes` rounds an allocation
up to a power of two, as torch's pinned (caching host) allocator does.

Counters: ``async_sim`` (the schedule's name, None on a real device), ``deferred_copies`` (copies
completed after the backend call that issued them: 0 under ``early``), ``copies``,
``pageable_copies``, ``host_syncs``, ``sync_sites``.

The simulated device is one per process, as a GPU is: the backends share its compute clock, its
pinned registry and its tags (``_WORLD``), so that a synchronize drains every stream and a buffer
pinned by one graph's weight store is pinned for the next graph's. Not modelled: a clock of
simulated time (issue 25, item 4).
"""

from __future__ import annotations

import contextlib
import random
import sys
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .device_base import DeviceBackend, pinned_bytes
from .timeline import Timeline, active_timeline

__all__ = ["SCHEDULES", "AsyncHazard", "SimEvent", "SimulatedAsyncDevice", "poison"]

SCHEDULES = ("late", "early", "random:SEED")
"""The schedules ``HSCOMPILE_ASYNC_SIM`` accepts."""


class AsyncHazard(RuntimeError):
    """An ordering bug the simulated asynchronous device caught (it would be a race on CUDA)."""


def poison(t: torch.Tensor) -> None:
    """Fill ``t`` with what a read of a copy's destination before the copy completes sees."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        info = torch.iinfo(t.dtype)
        t.fill_(-1 if info.min < 0 else info.max)  # every bit set: 0xFF bytes


# -- tensors as weak references to bytes ------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Bytes:
    """A view's bytes, held weakly: its storage, the byte range it spans, and how to rebuild it."""

    storage: weakref.ref[torch.UntypedStorage]
    ptr: int
    first: int
    last: int
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> _Bytes:
        storage = t.untyped_storage()
        first, last = _extent(t)
        return cls(weakref.ref(storage), storage.data_ptr(), first, last, t.dtype, t.storage_offset(),
                   tuple(t.shape), tuple(t.stride()))

    def tensor(self) -> torch.Tensor | None:
        storage = self.storage()
        if storage is None:
            return None
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.size, self.stride)

    def overlaps(self, ptr: int, first: int, last: int) -> bool:
        return ptr == self.ptr and first < self.last and self.first < last and self.storage() is not None


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``t`` may touch in its storage (empty for an empty tensor)."""
    if not t.numel():
        return 0, 0
    first = t.storage_offset() * t.element_size()
    last = first + (sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
    return first, last


class _Storages:
    """Storages by address, weakly (an address reused by a new storage is not the old one's)."""

    def __init__(self) -> None:
        self._refs: dict[int, tuple[weakref.ref[torch.UntypedStorage], Any]] = {}

    def set(self, t: torch.Tensor, value: Any = True) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr():
            self._refs[storage.data_ptr()] = (weakref.ref(storage), value)
            if len(self._refs) > 4096:
                self._refs = {k: v for k, v in self._refs.items() if v[0]() is not None}

    def get(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        entry = self._refs.get(storage.data_ptr())
        if entry is None or entry[0]() is not storage:
            return None
        return entry[1]

    def __contains__(self, t: torch.Tensor) -> bool:
        return self.get(t) is not None


# -- streams, events, copies ---------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class SimEvent:
    """A point on a simulated stream: ``seq``, the copy it follows; on compute (``stream`` None),
    ``clock``, the compute clock it was recorded at (compute is synchronous: always done)."""

    stream: _Stream | None
    seq: int = 0
    clock: int = 0

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.completed >= self.seq


@dataclass(eq=False, slots=True)
class _Copy:
    seq: int
    dst: _Bytes
    src: _Bytes
    after: SimEvent | None
    label: str
    lane: str
    to_host: bool
    timeline: Timeline | None
    nbytes: int
    started: bool = False
    gates: int = 0
    """Copies that must complete before this one may start (see :meth:`SimulatedAsyncDevice._copy`)."""

    broken: bool = False
    """A buffer of it was freed while it was pending (reported once; it then writes nothing)."""

    def freed(self) -> str | None:
        """Which of its buffers was freed, if one was."""
        if self.dst.storage() is None:
            return "dst"
        return "src" if self.src.storage() is None else None

    def view(self, which: str) -> torch.Tensor:
        t = (self.dst if which == "dst" else self.src).tensor()
        if t is None:
            self.broken = True
            raise AsyncHazard(
                f"the {'destination' if which == 'dst' else 'source'} of the copy {self.label!r} was freed while the "
                "copy was pending: on CUDA its memory goes back to the allocator and may be handed out (and "
                "rewritten) while the copy runs. Wait for the copy's event before dropping the buffer")
        return t


@dataclass(eq=False, slots=True)
class _Stream:
    """One in-order copy queue."""

    owner: SimulatedAsyncDevice
    queue: deque[_Copy] = field(default_factory=deque)
    issued: int = 0
    completed: int = 0
    known: int = 0
    """The newest compute clock this stream was ordered after (by a copy's ``after`` event)."""
    waited: int = 0
    """The newest copy compute waited for: what the host sees at its next ``fetch``."""
    settled: int = 0
    """Copies up to here are visible to the host (a host wait followed their completion)."""
    unsettled: list[_Copy] = field(default_factory=list)
    """Completed copies to the host the host may not read yet."""
    waiting: dict[int, list[_Copy]] = field(default_factory=dict)
    """Copies gated on this stream's copy ``seq``: each may start once its gates have completed."""


# -- the device (one per process) -----------------------------------------------------------------


class _World:
    """What the simulated backends of the process share: they are one device (see the module docstring)."""

    def __init__(self) -> None:
        self.backends: weakref.WeakSet[SimulatedAsyncDevice] = weakref.WeakSet()
        self.pinned = _Storages()
        self.host = _Storages()
        """Host tensors, as tagged inside tracked calls (untagged: device)."""
        self.touched = _Storages()
        """Device storages: the compute clock of the last compute access (allocation included)."""
        self.clock = 0
        self.inside = 0
        """Nonzero while the simulator itself works (its fills and copies are not the runtime's)."""
        self.tracking: _Tracking | None = None
        self.caller: SimulatedAsyncDevice | None = None
        """The backend whose method runs now (a hazard found in another's copy is reported to that one)."""

    def streams(self) -> list[_Stream]:
        return [b._stream for b in list(self.backends)]

    @contextlib.contextmanager
    def internal(self) -> Iterator[None]:
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def host_sync(self, *, everything: bool) -> None:
        """The host waited for compute (``fetch``) or for the whole device (``synchronize``)."""
        for stream in self.streams():
            if everything:
                _complete(SimEvent(stream, stream.issued))
                stream.settled = stream.issued
            else:
                stream.settled = max(stream.settled, stream.waited)
            stream.unsettled = [c for c in stream.unsettled if c.seq > stream.settled]

    def check_access(self, tensor: torch.Tensor, *, write: bool, what: str) -> None:
        """``tensor`` is read (or written) by compute or the host now: not while a copy still writes it,
        nor (written) while one still reads it, nor (read, on the host) before a host wait saw it written."""
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if not ptr or not tensor.numel():
            return
        first, last = _extent(tensor)
        for stream in self.streams():
            for copy in stream.queue:
                if copy.dst.overlaps(ptr, first, last):
                    raise AsyncHazard(f"{what} the destination of the copy {copy.label!r} before waiting for it: on "
                                      "CUDA it may read garbage. Wait for the copy's event first")
                if write and copy.src.overlaps(ptr, first, last):
                    raise AsyncHazard(f"{what} overwrites the source of the copy {copy.label!r} before it ran: on "
                                      "CUDA the copy may read the new data. Wait for its event before reusing the buffer")
            for copy in stream.unsettled:
                if copy.dst.overlaps(ptr, first, last):
                    raise AsyncHazard(f"{what} the host buffer the copy {copy.label!r} wrote before a host wait "
                                      "covered it (fetch after compute waited for it, or synchronize): on CUDA the "
                                      "host may read it before the copy ran")


_WORLD = _World()
"""The simulated device (see :class:`_World`)."""


class SimulatedAsyncDevice(DeviceBackend):
    """CUDA's copy-stream semantics on the CPU, with a schedule (see the module docstring)."""

    asynchronous = True
    pins_host = True
    host_threads = False

    def __init__(self, schedule: str) -> None:
        self.device = torch.device("cpu")
        self.reschedule(schedule)
        self.deferred_copies = 0
        """Copies completed after the backend call that issued them."""
        self.copies = 0
        self.pageable_copies = 0
        """Copies whose host side is not pinned (on CUDA they would not be asynchronous)."""
        self.sync_sites: Counter[str] = Counter()
        """Host syncs the tracking found outside ``fetch``/``synchronize``: ``what at file:line`` -> count."""
        self.host_cache_releases = 0
        """Times the pinned allocator's cache was emptied (pools of a new size replaced others)."""
        self.unreported: list[AsyncHazard] = []
        """Hazards in this backend's copies found while another backend completed them (a synchronize)."""
        self._stream = _Stream(self)
        self._issuing: _Copy | None = None
        _WORLD.backends.add(self)

    def reschedule(self, schedule: str) -> None:
        """Complete copies by ``schedule`` from now on (a test sweeping seeds keeps its compiled graphs)."""
        mode, _, seed = schedule.partition(":")
        if mode not in ("late", "early", "random") or (mode == "random") != bool(seed) \
                or (seed and not seed.lstrip("-").isdigit()):
            raise ValueError(f"async simulation schedule must be one of {', '.join(SCHEDULES)} "
                             f"(SEED an integer), got {schedule!r}")
        self.async_sim = schedule
        self.mode = mode
        self._rng = random.Random(int(seed)) if seed else None

    def __repr__(self) -> str:
        return f"SimulatedAsyncDevice({self.async_sim!r}, pending={self.pending})"

    # -- the backend ---------------------------------------------------------------------

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host buffer registered as pinned."""
        return self.host_tensor((nbytes,), torch.uint8)

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with _WORLD.internal():
            t = torch.empty(shape, dtype=dtype)
        _WORLD.pinned.set(t)
        _WORLD.host.set(t)
        return t

    def host_bytes(self, nbytes: int) -> int:
        return pinned_bytes(nbytes)

    def release_host_cache(self) -> None:
        self.host_cache_releases += 1

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        with _WORLD.internal():
            t = torch.empty(nbytes, dtype=torch.uint8)
        _WORLD.touched.set(t, _WORLD.clock)
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is (a view of) a pinned buffer."""
        return t in _WORLD.pinned

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                       lane: str = "copy: weights") -> SimEvent:
        return self._copy(dst, src, after, label, lane, to_host=False)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                     lane: str = "copy: cache") -> SimEvent:
        return self._copy(dst, src, after, label, lane, to_host=True)

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        # On CUDA: pinned, then non-blocking on the compute stream (in order with compute, no host
        # wait). Here a copy now, which makes it a device tensor.
        self._tick()
        with _WORLD.internal():
            out = x.clone()
        _WORLD.touched.set(out, _WORLD.clock)
        return out

    def wait(self, event: Any) -> None:
        self._tick()
        if event is not None:
            event = _event(event)
            _complete(event)
            if event.stream is not None:
                event.stream.waited = max(event.stream.waited, event.seq)

    def record(self) -> SimEvent:
        self._tick()
        _WORLD.clock += 1
        return SimEvent(None, clock=_WORLD.clock)

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        # The host waits for the compute stream: copies compute never waited for may still run.
        self._tick()
        self.host_syncs += 1
        _WORLD.host_sync(everything=False)
        if x in _WORLD.host:
            return x
        with _WORLD.internal():
            out = x.clone()
        _WORLD.host.set(out)
        return out

    def synchronize(self) -> None:
        self._tick()
        self.host_syncs += 1
        _WORLD.host_sync(everything=True)

    def host_wait(self, event: Any) -> None:
        self._tick()
        if event is not None:
            _complete(_event(event))

    def check_host_write(self, t: torch.Tensor, *, what: str) -> None:
        self._tick()
        _WORLD.check_access(t, write=True, what=what)

    def tracking(self, *host: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Watch the torch calls made inside the block (see the module docstring); ``host``: tensors
        made outside it that are host tensors (the caller's inputs)."""
        for t in host:
            if isinstance(t, torch.Tensor):
                _WORLD.host.set(t)
        if _WORLD.tracking is not None:
            return contextlib.nullcontext()
        return _Tracking(self)

    def untracked(self) -> contextlib.AbstractContextManager[None]:
        """Stop watching inside the block (dynamo traces there: a mode would be part of its guards)."""
        tracking = _WORLD.tracking
        if tracking is None:
            return contextlib.nullcontext()
        return _Paused(tracking)

    # -- inspection ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Copies issued and not completed."""
        return len(self._stream.queue)

    def drain(self) -> None:
        """Complete every copy of this backend's stream."""
        if self._stream.queue:
            _complete(SimEvent(self._stream, self._stream.issued))

    # -- the simulation ------------------------------------------------------------------

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, label: str, lane: str, *,
              to_host: bool) -> SimEvent:
        self._tick()
        if dst.shape != src.shape:
            raise ValueError(f"copy {label!r}: destination {tuple(dst.shape)} and source {tuple(src.shape)} differ")
        stream = self._stream
        after = None if after is None else _event(after)
        host, device = (dst, src) if to_host else (src, dst)
        if not self.is_pinned(host):
            self.pageable_copies += 1
        if after is not None and after.stream is None:
            stream.known = max(stream.known, after.clock)
        touched = _WORLD.touched.get(device)
        if touched is not None and touched >= stream.known:
            raise AsyncHazard(
                f"the copy {label!r} uses device memory compute allocated or used after the copy stream's last event "
                "from compute: on CUDA the copy may run while compute still uses that memory (or before the "
                "allocator's previous user of it is done). Issue the copy after an event recorded since")
        stream.issued += 1
        copy = _Copy(stream.issued, _Bytes.of(dst), _Bytes.of(src), after, label, lane, to_host, active_timeline(),
                     src.numel() * src.element_size())
        stream.queue.append(copy)
        self.copies += 1
        # It starts (and may write its destination) once what it was issued after has happened and,
        # the stream being in order, once the earlier copies that read its destination are done.
        gates = [after] if after is not None and not after.done else []
        readers = [c for c in stream.queue if c is not copy and c.src.overlaps(copy.dst.ptr, copy.dst.first, copy.dst.last)]
        if readers:
            gates.append(SimEvent(stream, readers[-1].seq))
        for gate in gates:
            assert gate.stream is not None
            gate.stream.waiting.setdefault(gate.seq, []).append(copy)
        copy.gates = len(gates)
        if not gates:
            _start(copy)
        event = SimEvent(stream, copy.seq)
        if self.mode in ("early", "random"):
            self._issuing = copy
            try:
                _complete(event) if self.mode == "early" else self._maybe_complete()
            finally:
                self._issuing = None
        return event

    def _tick(self) -> None:
        """A call of the backend: a freed buffer shows; under ``random`` some queued copies may complete."""
        _WORLD.caller = self
        if self.unreported:
            raise self.unreported.pop(0)
        for copy in self._stream.queue:
            which = None if copy.broken else copy.freed()
            if which is not None:
                copy.view(which)  # raises, naming it
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


def _start(copy: _Copy) -> None:
    """The copy may run from now on: its destination holds garbage until it completes."""
    if not copy.started and copy.freed() is None:
        copy.started = True
        with _WORLD.internal():
            poison(copy.view("dst"))


def _complete(event: SimEvent) -> None:
    """Complete every copy of ``event``'s stream up to it, in order, and what they wait for."""
    stream = event.stream
    if stream is None:
        return
    while stream.completed < event.seq:
        copy = stream.queue[0]
        if copy.after is not None and not copy.after.done:
            _complete(copy.after)  # it cannot have run before the copy it was issued after
        which = copy.freed()
        stream.queue.popleft()
        if which is None:
            _start(copy)
            dst, src = copy.view("dst"), copy.view("src")
            with _WORLD.internal():
                if copy.timeline is None:
                    dst.copy_(src)
                else:
                    with copy.timeline.span(copy.lane, copy.label, bytes=copy.nbytes):
                        dst.copy_(src)
        stream.completed = copy.seq
        if copy.to_host:
            stream.unsettled.append(copy)
        if stream.owner._issuing is not copy:
            stream.owner.deferred_copies += 1
        for waiting in stream.waiting.pop(copy.seq, ()):
            waiting.gates -= 1
            if waiting.gates == 0:
                _start(waiting)
        if which is not None and not copy.broken:
            try:
                copy.view(which)  # raises, naming it (once: it is done now, having written nothing)
            except AsyncHazard as hazard:
                if _WORLD.caller is stream.owner:
                    raise
                stream.owner.unreported.append(hazard)  # its own backend raises it at its next call


# -- tracking the torch calls of a step -----------------------------------------------------------

_SYNCING = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero",
                      "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose"})
"""Calls that read a device tensor's values (or shape-from-data) on the host."""
_FACTORIES = frozenset({"empty", "zeros", "ones", "full", "arange", "range", "linspace", "eye", "rand", "randn",
                        "randint", "empty_strided", "tensor", "as_tensor", "from_numpy"})
_METADATA = frozenset({"view", "view_as", "narrow", "select", "unsqueeze", "squeeze", "expand", "expand_as",
                       "transpose", "permute", "t", "detach", "chunk", "split", "unbind", "as_strided", "movedim",
                       "swapaxes", "unflatten", "__get__", "__set__", "size", "stride", "dim", "numel",
                       "storage_offset", "untyped_storage", "element_size", "data_ptr", "is_floating_point",
                       "is_complex", "is_contiguous", "is_pinned", "__len__", "__repr__", "__format__", "__hash__",
                       "__eq__", "requires_grad_", "dim_order", "get_device", "set_", "type", "__iter__"})
"""Calls that touch no tensor data (views, shapes); ``set_`` rebinds a view, as the simulator does."""


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.endswith(("simulated.py", "overrides.py", "_tensor.py", "contextlib.py"))
                or "/torch/" in path):
            return f"{'/'.join(path.split('/')[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class _Tracking(TorchFunctionMode):
    """The torch calls of a tracked block: host syncs, accesses, tags (see the module docstring)."""

    def __init__(self, backend: SimulatedAsyncDevice) -> None:
        super().__init__()
        self.backend = backend

    def __enter__(self) -> _Tracking:
        _WORLD.tracking = self
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _WORLD.tracking = None
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _WORLD.inside:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "").split(".")[0]  # an OpOverload's: "view.dtype"
        if name in _METADATA or (name == "__getitem__" and not _tensors(args[1:])):
            out = func(*args, **kwargs)
            if args and isinstance(args[0], torch.Tensor) and args[0] in _WORLD.host:
                for t in _tensors(out):  # a view, or (indexing with a list) a host copy
                    _WORLD.host.set(t)
            return out
        tensors = _tensors((args, kwargs))
        host = [t for t in tensors if t in _WORLD.host]
        device = [t for t in tensors if t not in _WORLD.host and t.dim() > 0]
        target = _to_device(args, kwargs) if name == "to" else None  # None: no device named
        self._sync(name, args, kwargs, host, device, target)
        written = _written(name, args, kwargs)
        for t in tensors:
            _WORLD.check_access(t, write=any(t is w for w in written), what=f"{name} at {_caller()}")
        crossing = (name == "cpu" and bool(device)) or (bool(host) and target is not None)
        if crossing:
            # A copy between host and device, as on CUDA (here the same memory would come back, and
            # tagging it would retag the tensor it came from).
            with _WORLD.internal():
                out = func(*args, **kwargs).clone()
        else:
            out = func(*args, **kwargs)
        outputs = _tensors(out)
        as_host = (bool(tensors) and not device and all(t in _WORLD.host or t.dim() == 0 for t in tensors)) \
            or (not tensors and name in _FACTORIES and kwargs.get("device") is None)
        if name == "cpu":
            as_host = True
        elif host and target is not None:
            as_host = False  # the host tensor's copy on the device
        # (``.to(device)`` of a device tensor stays on the device: the simulated device is "cpu", so a
        # graph's ``.to(device="cpu")`` names the device; a copy to the host must say ``.cpu()`` or fetch.)
        for t in outputs:
            if as_host:
                _WORLD.host.set(t)
            elif t not in _WORLD.host:
                _WORLD.touched.set(t, _WORLD.clock)
        for t in device:
            _WORLD.touched.set(t, _WORLD.clock)
        return out

    def _sync(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], host: list[torch.Tensor],
              device: list[torch.Tensor], target: torch.device | None) -> None:
        """Count (and name) the call if it makes the host wait for the device on CUDA (``target``:
        the device a ``to`` names)."""
        backend = self.backend
        what: str | None = None
        if name in _SYNCING and args and isinstance(args[0], torch.Tensor) and args[0] not in _WORLD.host:
            what = f"Tensor.{name}"
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            what = f"torch.{name}(device=...)"
        elif name == "cpu" and args and isinstance(args[0], torch.Tensor):
            if args[0] not in _WORLD.host:
                what = "Tensor.cpu of a device tensor"
        elif name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            source = args[0]
            non_blocking = bool(kwargs.get("non_blocking") or (name == "to" and len(args) > 2 and args[2] is True))
            if target is not None or name == "cuda":
                if source in _WORLD.host:
                    if not (non_blocking and source in _WORLD.pinned):
                        what = f"Tensor.{name} of a {'host' if source not in _WORLD.pinned else 'pinned'} tensor " \
                               "to the device (pageable or blocking)"
        elif name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            dst, src = args[0], args[1]
            non_blocking = bool(kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True))
            if (dst in _WORLD.host) != (src in _WORLD.host) and src.dim() > 0:
                if dst in _WORLD.host and non_blocking and dst not in _WORLD.pinned:
                    raise AsyncHazard(f"a non-blocking copy into pageable host memory at {_caller()}: CUDA runs it "
                                      "synchronously. Copy into pinned memory")
                if not (non_blocking and (dst if dst in _WORLD.host else src) in _WORLD.pinned):
                    what = "Tensor.copy_ between host and device"
        elif host and device and name not in ("to", "cpu", "cuda", "copy_"):
            what = f"{name} of host and device tensors"
        if what is not None:
            backend.host_syncs += 1
            backend.sync_sites[f"{what} at {_caller()}"] += 1


class _Paused:
    def __init__(self, tracking: _Tracking) -> None:
        self.tracking = tracking

    def __enter__(self) -> None:
        self.tracking.__exit__(None, None, None)  # off the mode stack: dynamo sees none

    def __exit__(self, *exc: Any) -> None:
        self.tracking.__enter__()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _written(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[torch.Tensor]:
    out = kwargs.get("out")
    written = _tensors(out) if out is not None else []
    if args and isinstance(args[0], torch.Tensor) and (name == "__setitem__" or
                                                       (name.endswith("_") and not name.startswith("__"))):
        written.append(args[0])
    return written


def _to_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    """The device a ``Tensor.to`` call names (None: a dtype change only)."""
    try:
        device, _, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    except (TypeError, RuntimeError):
        return None
    return device
