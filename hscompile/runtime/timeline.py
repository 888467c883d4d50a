"""Timelines: what a compiled model did, when, on which lane, per layer and mini-batch.

``with hscompile.record_timeline() as timeline: ...`` records every call of every
hybridserve-compiled model that runs inside the block:

* ``compute``: each schedule step that computes (a partition, attention, K/V recompute), labelled
  with its layer, its kind and its mini-batch;
* ``copy: weights`` and ``copy: cache``: each host-to-device copy, with its bytes;
* ``host``: the work the host thread does between them (gathering past tokens from the block
  pools, storing the new ones, input and output transfers);
* ``calls``: each call of a compiled graph (a prefill or a decode step).

On CUDA the compute and copy lanes are timed by events on their own streams (the compute
stream and each copy stream), so they show what ran *on the device*, overlapping where copies
overlap compute; the host lane uses the host clock, aligned with the device's by one event
recorded when the first device span starts. On the CPU every lane uses the host clock and
nothing overlaps: copies there are synchronous.

Nothing is recorded, and nothing costs more than a context-variable lookup per call, outside
the block. :meth:`Timeline.write` saves a Chrome/Perfetto trace (``ui.perfetto.dev``,
``chrome://tracing``); :meth:`Timeline.spans` gives the spans to plot or test.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..ir.schedule import step_info

__all__ = ["LANES", "Span", "Timeline", "active_timeline", "node_span", "record_timeline"]

LANES = ("calls", "compute", "copy: weights", "copy: cache", "host")
"""The lanes of a timeline, top to bottom."""

_STEP_LANES = {
    "pre": "compute", "attn_in": "compute", "attention": "compute", "attn_out": "compute", "post": "compute",
    "recompute": "compute",
    "load_kv": "host", "load_act": "host", "store": "host", "to_device": "host", "to_host": "host",
}
"""Which lane a schedule step's own time goes to, by its kind (weight steps record their copies
instead: a wait or a release takes no time of its own)."""

_ACTIVE: ContextVar[Timeline | None] = ContextVar("hscompile_timeline", default=None)


@dataclass(frozen=True, slots=True)
class Span:
    """One thing that ran: ``lane``, ``label``, start and end in milliseconds from the first span."""

    lane: str
    label: str
    start_ms: float
    end_ms: float
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms

    def overlaps(self, other: Span) -> bool:
        return self.start_ms < other.end_ms and other.start_ms < self.end_ms


@dataclass(slots=True)
class _Open:
    lane: str
    label: str
    args: dict[str, Any]
    start: Any  # host nanoseconds, or a CUDA event
    end: Any = None


class Timeline:
    """Spans recorded while :func:`record_timeline` is active (see the module docstring)."""

    def __init__(self) -> None:
        self._records: list[_Open] = []
        self._host_origin = time.perf_counter_ns()
        self._device_origin: Any = None  # (event, host ns) once a device span has started

    # -- recording -----------------------------------------------------------------------

    def _device_stamp(self, stream: Any) -> Any:
        if self._device_origin is None:
            # One event recorded with the device idle, at a known host time, aligns the two clocks.
            torch.cuda.synchronize()
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
            origin.synchronize()
            self._device_origin = (origin, time.perf_counter_ns())
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def begin(self, lane: str, label: str, *, stream: Any = None, **args: Any) -> _Open:
        """Start a span; on ``stream`` (a CUDA stream) it is timed on the device, else on the host."""
        start = self._device_stamp(stream) if stream is not None else time.perf_counter_ns()
        record = _Open(lane, label, args, start)
        self._records.append(record)
        return record

    def end(self, record: _Open, *, stream: Any = None) -> None:
        record.end = self._device_stamp(stream) if stream is not None else time.perf_counter_ns()

    @contextlib.contextmanager
    def span(self, lane: str, label: str, *, stream: Any = None, **args: Any) -> Iterator[None]:
        record = self.begin(lane, label, stream=stream, **args)
        try:
            yield
        finally:
            self.end(record, stream=stream)

    def step(self, node: fx.Node, minibatch: int | None, stream: Any) -> contextlib.AbstractContextManager[None]:
        """A span around a schedule node's run, if its kind takes one (see :func:`node_span`);
        compute spans are timed on ``stream`` where that is a CUDA stream."""
        span = node_span(node, minibatch)
        if span is None:
            return contextlib.nullcontext()
        lane, label, args = span
        return self.span(lane, label, stream=stream if lane == "compute" else None, **args)

    # -- reading -------------------------------------------------------------------------

    def _ms(self, stamp: Any) -> float:
        if isinstance(stamp, int):
            return (stamp - self._host_origin) / 1e6
        origin, host_ns = self._device_origin
        return origin.elapsed_time(stamp) + (host_ns - self._host_origin) / 1e6

    def spans(self) -> list[Span]:
        """Every finished span, in start order (waits for the device where spans were timed there)."""
        if self._device_origin is not None:
            torch.cuda.synchronize()
        spans = [Span(r.lane, r.label, self._ms(r.start), self._ms(r.end), r.args) for r in self._records
                 if r.end is not None]
        if not spans:
            return []
        zero = min(s.start_ms for s in spans)
        return sorted((Span(s.lane, s.label, s.start_ms - zero, s.end_ms - zero, s.args) for s in spans),
                      key=lambda s: s.start_ms)

    def chrome_trace(self) -> dict[str, Any]:
        """The spans as a Chrome trace-event document: one process, a thread per lane."""
        spans = self.spans()
        lanes = [lane for lane in LANES if any(s.lane == lane for s in spans)]
        lanes += sorted({s.lane for s in spans} - set(lanes))
        tid = {lane: i for i, lane in enumerate(lanes)}
        events: list[dict[str, Any]] = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "hscompile"}}]
        for lane in lanes:
            events.append({"ph": "M", "pid": 0, "tid": tid[lane], "name": "thread_name", "args": {"name": lane}})
            events.append({"ph": "M", "pid": 0, "tid": tid[lane], "name": "thread_sort_index",
                           "args": {"sort_index": tid[lane]}})
        for s in spans:
            events.append({"ph": "X", "pid": 0, "tid": tid[s.lane], "name": s.label, "ts": s.start_ms * 1e3,
                           "dur": max(s.ms, 0.0) * 1e3, "args": s.args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        """Save :meth:`chrome_trace` as JSON (open it in ui.perfetto.dev or chrome://tracing)."""
        Path(path).write_text(json.dumps(self.chrome_trace()))


@contextlib.contextmanager
def record_timeline() -> Iterator[Timeline]:
    """Record what hybridserve-compiled models do inside the block (see the module docstring)."""
    timeline = Timeline()
    token = _ACTIVE.set(timeline)
    try:
        yield timeline
    finally:
        _ACTIVE.reset(token)


def active_timeline() -> Timeline | None:
    """The timeline being recorded in this context, if any."""
    return _ACTIVE.get()


def node_span(node: fx.Node, minibatch: int | None) -> tuple[str, str, dict[str, Any]] | None:
    """``(lane, label, args)`` for a schedule node's own time, or None if it takes none worth a span."""
    info = step_info(node)
    lane = _STEP_LANES.get(getattr(info, "kind", None))  # type: ignore[arg-type]
    if lane is None:
        return None
    layer = info.layer  # type: ignore[union-attr]
    label = info.kind if layer is None else f"L{layer} {info.kind}"  # type: ignore[union-attr]
    args: dict[str, Any] = {"kind": info.kind, "layer": layer}  # type: ignore[union-attr]
    if minibatch is not None:
        label += f" mb{minibatch}"
        args["minibatch"] = minibatch
    return lane, label, args
