"""The executor: runs a lowered schedule against its runtime and keeps the counters.

:class:`Runtime` is what the ``torch.ops.hybridserve.*`` kernels act on while a call runs:
the weight runtime (store, resident buffers, slot ring), input/output transfers, and the
device-memory accounting that backs the ``device_memory`` promise. :class:`Executor` binds
it around each call of the schedule, after checking that the call fits the budget.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .. import ops
from ..config import format_bytes
from ..ir.activation import ActivationEstimate
from ..ir.policy import Policy, check_device_budget
from ..ir.schedule import MIN_ROWS
from ..ops.context import bind
from .cache import CacheRuntime
from .device import DeviceBackend
from .minibatch import BatchSplit, MiniBatchRunner, batch_split
from .timeline import Timeline, active_timeline
from .weights import WeightRuntime

__all__ = ["Executor", "Runtime"]


class Runtime:
    """Run-time state of one compiled graph (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        backend: DeviceBackend,
        weights: WeightRuntime,
        activations: ActivationEstimate,
        in_place_weight_bytes: int,
        cache: CacheRuntime | None = None,
    ) -> None:
        self.policy = policy
        self.backend = backend
        self.weights = weights
        self.activations = activations
        self.in_place_weight_bytes = in_place_weight_bytes
        self.cache = cache
        """The hybrid cache this graph's cache steps act on (generation graphs only)."""
        self.input_h2d_bytes = 0
        self.d2h_bytes = 0
        self.peak_device_bytes = 0
        self.last_activation_bytes = 0
        self.fetched_by_driver = False
        """Whether the call running now was made by a driver that fetches its outputs (the generator,
        through a step request): its outputs then come back without a wait of their own."""
        self._setup_syncs = backend.host_syncs
        """Host waits before the first call (resident weights copied once): not the steps'."""

    # -- called by the ops ---------------------------------------------------------------

    def copy_in(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.input_h2d_bytes += x.numel() * x.element_size()
        return self.backend.upload(x)

    def copy_out(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.d2h_bytes += x.numel() * x.element_size()
        if self.fetched_by_driver:
            return x  # the driver fetches it: that is the step's one wait (and mini-batches gather on the device)
        return self.backend.fetch(x)  # the caller reads it at once: this is the call's wait

    # -- accounting ----------------------------------------------------------------------

    def host_syncs(self) -> int:
        """Waits of the host on the device in this graph's calls."""
        return self.backend.host_syncs - self._setup_syncs

    def weight_device_bytes(self) -> int:
        """Device bytes held for weights: used in place, resident copies and the slot ring."""
        return self.in_place_weight_bytes + self.weights.device_bytes

    def begin_call(self, args: Sequence[Any]) -> None:
        """Check that this call fits the device budget, before anything runs."""
        activation = self.activations.evaluate(args)
        staging = self.cache.staging_bytes() if self.cache is not None else 0
        memory = self.policy.memory.for_call(self.backend.device.type, activations=activation, cache_staging=staging)
        check_device_budget(
            memory, self.policy.device_budget, what="this call",
            advice=f"the placement was planned for activations of {format_bytes(self.activations.hint)}. Use "
                   "smaller batches or a larger budget")
        self.last_activation_bytes = activation + staging
        self.fetched_by_driver = self.cache is not None and self.cache.request is not None
        self.peak_device_bytes = max(self.peak_device_bytes, memory.total)
        self.weights.reset()

    def stats(self) -> dict[str, Any]:
        weight_h2d = self.weights.weight_h2d_bytes
        return {
            "device_budget": self.policy.device_budget,
            "peak_device_bytes": self.peak_device_bytes,
            "weight_device_bytes": self.weight_device_bytes(),
            "activation_bytes_last_call": self.last_activation_bytes,
            "setup_h2d_bytes": self.weights.setup_h2d_bytes,
            "weight_h2d_bytes": weight_h2d,
            "input_h2d_bytes": self.input_h2d_bytes,
            "h2d_bytes": weight_h2d + self.input_h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "prefetches": self.weights.prefetches,
            "disk_layers": len(self.policy.disk_layers),
            **self.disk_stats(),
            **(self.cache_stats() if self.cache is not None else {}),
        }

    def disk_stats(self) -> dict[str, Any]:
        """The disk tier's counters: the model's, as one tier serves all its graphs (reads ahead included)."""
        disk = self.weights.disk
        if disk is None:
            return {"disk_read_bytes": 0, "disk_reads": 0, "disk_host_bytes": 0}
        return {"disk_read_bytes": disk.read_bytes, "disk_reads": disk.reads, "disk_host_bytes": disk.host_bytes,
                "disk_read_seconds": disk.read_seconds, "disk_wait_seconds": disk.wait_seconds}

    def cache_stats(self) -> dict[str, Any]:
        assert self.cache is not None
        return self.cache.counters.as_stats()


class Executor:
    """Runs the lowered schedule GraphModule, the very object ``inspect`` shows.

    Compiled models are inference-only: the schedule runs under ``torch.no_grad()``.
    """

    def __init__(self, schedule: fx.GraphModule, runtime: Runtime) -> None:
        self.schedule = schedule
        self.runtime = runtime
        self.calls = 0
        self.last_seconds = 0.0
        """Wall seconds of the last call."""
        self.split = batch_split(schedule) if runtime.cache is not None else BatchSplit(reason="not a generation graph")
        """Whether (and how) a step can run as mini-batches; see :mod:`hscompile.runtime.minibatch`."""
        self._runner: MiniBatchRunner | None = None
        self._kernels = ops.bound_kernels(runtime)
        self._direct = _with_kernels(schedule, self._kernels)
        """The schedule as it runs: the same graph, each runtime op a direct call of its kernel."""

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._call(*args)
        except BaseException:
            # A call that raised midway (an error, an interrupt) never releases the slots it took:
            # free them now rather than at the next call, so nothing stays held after a failure.
            self.runtime.weights.reset()
            if self.runtime.cache is not None:
                # Its step stored some layers' new tokens and not others: the batch cannot go on. End
                # it, or the next call (transformers' loop has no end_batch) takes this step's stale
                # plans for its own (CacheRuntime.step_begin) and fails or attends over stale loads.
                self.runtime.cache.end_batch()
            raise
        finally:
            self.last_seconds = time.perf_counter() - start

    def _call(self, *args: Any) -> Any:
        self.runtime.begin_call(args)
        groups = self._groups()
        timeline = active_timeline()
        stream = _compute_stream(self.runtime.backend.device) if timeline is not None else None
        with self.runtime.backend.tracking(), bind(self.runtime), torch.no_grad(), \
                self._call_span(timeline, groups, stream):
            if groups is None:
                out = self._direct(*args) if timeline is None else _Recording(self.schedule, timeline, stream).run(*args)
            else:
                cache = self.runtime.cache
                assert cache is not None
                if self._runner is None:
                    self._runner = MiniBatchRunner(self.schedule, self.split, self._kernels)
                try:
                    out = self._runner(args, groups, cache.select, upload=self.runtime.backend.upload,
                                       timeline=timeline, stream=stream)
                finally:
                    cache.select(0)
        self.calls += 1
        return out

    def _call_span(self, timeline: Timeline | None, groups: list[list[int]] | None, stream: Any) -> Any:
        """The ``calls`` span of this call: a generation step is named prefill or decode."""
        if timeline is None:
            return contextlib.nullcontext()
        cache = self.runtime.cache
        count = 1 if groups is None else len(groups)
        if cache is not None and cache.request is not None:
            step = cache.counters.steps
            label = "prefill" if cache.request.admit is not None else "decode"
        else:
            step, label = self.calls, f"call {self.calls}"
        if count > 1:
            label += f" ({count} mini-batches)"
        return timeline.span("calls", label, stream=stream, step=step, minibatches=count)

    def _groups(self) -> list[list[int]] | None:
        """The mini-batches of this call, or None to run it whole (one requested, or the graph
        cannot be split: then the request is told so)."""
        cache = self.runtime.cache
        request = cache.request if cache is not None else None
        if request is None or request.groups is None or len(request.groups) < 2:
            return None
        if not self.split.splittable or min(len(g) for g in request.groups) < MIN_ROWS:
            request.groups = None
            return None
        return request.groups

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "minibatch_split": self.split.reason or "yes", **self.runtime.stats()}


def _with_kernels(schedule: fx.GraphModule, kernels: dict[Any, Any]) -> fx.GraphModule:
    """A copy of ``schedule`` (sharing its partitions) whose runtime ops call ``kernels`` directly."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(schedule.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in kernels:
            node.target = kernels[node.target]
    return fx.GraphModule(schedule, graph, class_name=type(schedule).__name__)


def _compute_stream(device: torch.device) -> Any:
    """The stream compute spans are timed on (None: the host clock)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class _Recording(fx.Interpreter):
    """Runs a schedule whole, as its generated code would, recording each step's span."""

    def __init__(self, schedule: fx.GraphModule, timeline: Timeline, stream: Any) -> None:
        super().__init__(schedule)
        self.timeline = timeline
        self.stream = stream

    def run_node(self, n: fx.Node) -> Any:
        with self.timeline.step(n, None, self.stream):
            return super().run_node(n)
