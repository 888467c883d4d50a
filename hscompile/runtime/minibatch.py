"""Mini-batches: one step of a batch run layer by layer, each layer serving every mini-batch.

A step of a large batch does not run as one piece. Its sequences are split into mini-batches
(:func:`~hscompile.planner.minibatch.form_minibatches`), and :class:`MiniBatchRunner` executes the schedule so that

* every weight operation (``prefetch_weights``, ``wait_weights``, the slot views) runs **once**
  per step: a streamed layer's weights cross the link once and serve every mini-batch;
* the compute of a layer (its partitions and cache steps) runs once **per mini-batch**, one
  mini-batch after the other, so a layer's cache staging holds one mini-batch at a time and,
  on CUDA, the next mini-batch's cache copy overlaps this one's compute
  (:class:`~hscompile.runtime.cache.CacheRuntime`);
* ``release_weights`` and ``cache_commit`` run once, after every mini-batch is done.

How it splits (:func:`batch_split`, computed once per schedule): a node is *batched* if it
depends on a batched input, else *shared*. The batched inputs are the placeholders whose first
dimension is a batch symbol of the graph (the size placeholders equal to one are given the
mini-batch's size), and the cache loads, which read the running mini-batch's plan. The nodes
are cut into *segments* at the run-once barriers and where the batched work moves on to the next
layer; a segment runs mini-batch by mini-batch, its shared nodes on the first pass only, so every
shared effect keeps its order relative to the other shared effects and the barriers. A graph
whose batch is not symbolic (compiled for one batch size), whose batch symbol also sizes another
dimension, or whose batched outputs do not lead with the batch, is not split: it runs whole, and
:attr:`BatchSplit.reason` says why.

Which sequences form the mini-batches, and in what order, is the planner's
(:func:`hscompile.planner.minibatch.form_minibatches`).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import ops
from ..ir.fx import fake_value
from ..ir.schedule import step_info
from .timeline import Timeline

__all__ = ["BatchSplit", "MiniBatchRunner", "batch_split"]


_PER_MINIBATCH = frozenset({ops.load_kv._opoverload, ops.load_act._opoverload})
"""Ops without batched inputs that still act on the running mini-batch (its cache plan)."""

_NO_SPAN = contextlib.nullcontext()
"""Stands in for a timeline span when nothing is recorded (reusable: it holds no state)."""

_BARRIERS = frozenset({ops.release_weights._opoverload, ops.cache_commit._opoverload})
"""Batched nodes that run once per step, after every mini-batch of the segment before them."""


@dataclass(frozen=True, slots=True)
class BatchSplit:
    """Which placeholders a schedule splits by mini-batch (see the module docstring)."""

    batch_inputs: tuple[int, ...] = ()
    """Indices of tensor placeholders split along dim 0."""
    size_inputs: tuple[int, ...] = ()
    """Indices of size placeholders that equal the batch (given the mini-batch's size)."""
    reason: str | None = "not analysed"
    """Why the schedule runs whole; None when it can be split."""

    @property
    def splittable(self) -> bool:
        return self.reason is None


def _symbol(value: object) -> Any:
    """The sympy symbol a size is, or None for a number or a compound expression."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return expr if expr.is_Symbol else None
    return None


def batch_split(schedule: fx.GraphModule) -> BatchSplit:
    """See the module docstring. Pure: reads the placeholders' and outputs' fake values."""
    placeholders = [n for n in schedule.graph.nodes if n.op == "placeholder"]
    fakes = [fake_value(n) for n in placeholders]
    batch_symbols: set[Any] = set()
    batch_inputs: list[int] = []
    for index, fake in enumerate(fakes):
        if isinstance(fake, torch.Tensor) and fake.dim() >= 1 and not isinstance(fake, torch.nn.Parameter):
            symbol = _symbol(fake.shape[0])
            if symbol is not None:
                batch_symbols.add(symbol)
                batch_inputs.append(index)
    if not batch_symbols:
        return BatchSplit(reason="the graph was compiled for one batch size (its batch is not symbolic)")
    for fake in fakes:
        if isinstance(fake, torch.Tensor):
            for size in fake.shape[1:]:
                if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & batch_symbols:
                    return BatchSplit(reason=f"a batch symbol also sizes another dimension ({fake.shape})")
    size_inputs: list[int] = []
    for index, fake in enumerate(fakes):
        if isinstance(fake, torch.SymInt) and fake.node.expr.free_symbols & batch_symbols:
            if _symbol(fake) not in batch_symbols:
                return BatchSplit(reason=f"a size input is an expression of the batch ({fake.node.expr})")
            size_inputs.append(index)
    batched = _batched_nodes(schedule, {placeholders[i] for i in batch_inputs} | {placeholders[i] for i in size_inputs})
    output = next(n for n in schedule.graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        if node in batched:
            fake = fake_value(node)
            if not isinstance(fake, torch.Tensor) or fake.dim() == 0 or _symbol(fake.shape[0]) not in batch_symbols:
                return BatchSplit(reason=f"output {node.name} does not lead with the batch")
    return BatchSplit(tuple(batch_inputs), tuple(size_inputs), None)


def _batched_nodes(schedule: fx.GraphModule, roots: set[fx.Node]) -> set[fx.Node]:
    batched = set(roots)
    for node in schedule.graph.nodes:
        if node.op != "placeholder" and (any(a in batched for a in node.all_input_nodes) or node.target in _PER_MINIBATCH):
            batched.add(node)
    return batched


class MiniBatchRunner:
    """Runs a schedule over mini-batches of rows (see the module docstring)."""

    def __init__(self, schedule: fx.GraphModule, split: BatchSplit, kernels: dict[Any, Any] | None = None) -> None:
        assert split.splittable, split.reason
        self.schedule = schedule
        self.split = split
        self._kernels = kernels or {}
        """Runtime ops called directly (:func:`hscompile.ops.bound_kernels`) instead of dispatched."""
        nodes = list(schedule.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        roots = {self._placeholders[i] for i in split.batch_inputs + split.size_inputs}
        self._batched = _batched_nodes(schedule, roots)
        self._output = nodes[-1]
        body = [n for n in nodes if n.op not in ("placeholder", "output")]
        # Segments end at barriers and where batched work moves to the next layer (the cache
        # loads run layer by layer, every mini-batch within a layer): [(nodes, barrier or None)].
        self._segments: list[tuple[list[fx.Node], fx.Node | None]] = []
        current: list[fx.Node] = []
        layer = None
        for node in body:
            if node.op == "call_function" and node.target in _BARRIERS:
                self._segments.append((current, node))
                current = []
                continue
            step = getattr(step_info(node), "layer", None)
            if node in self._batched and step is not None:
                if layer is not None and step != layer and current:
                    self._segments.append((current, None))
                    current = []
                layer = step
            current.append(node)
        self._segments.append((current, None))
        self._modules = {n.target: schedule.get_submodule(n.target) for n in body if n.op == "call_module"}
        self._free_at, self._free_after = self._lifetimes()

    def _lifetimes(self) -> tuple[list[list[list[fx.Node]]], list[list[fx.Node]]]:
        """When each value dies, so a call holds what a layer needs and not every layer's values
        (the generated code of a GraphModule frees the same way).

        ``free_at[s][p]``: batched values whose last user is node ``p`` of segment ``s``: dropped
        from a mini-batch's values once that mini-batch has run it. ``free_after[s]``: values
        last used by segment ``s``'s barrier, and shared values last used in segment ``s``:
        dropped once every mini-batch has run the segment. Values the output needs are kept."""
        where: dict[fx.Node, tuple[int, int]] = {}
        for s, (segment, barrier) in enumerate(self._segments):
            for p, node in enumerate(segment):
                where[node] = (s, p)
            if barrier is not None:
                where[barrier] = (s, len(segment))
        free_at: list[list[list[fx.Node]]] = [[[] for _ in segment] for segment, _ in self._segments]
        free_after: list[list[fx.Node]] = [[] for _ in self._segments]
        for node in [*self._placeholders, *where]:
            if any(user.op == "output" for user in node.users):
                continue
            uses = [where[user] for user in node.users if user in where]
            if node in where:
                uses.append(where[node])  # unused: dropped right after it runs
            if not uses:
                continue
            s, p = max(uses)
            if node in self._batched and p < len(self._segments[s][0]):
                free_at[s][p].append(node)
            else:
                free_after[s].append(node)
        return free_at, free_after

    def __call__(self, args: Sequence[Any], rows: Sequence[Sequence[int]],
                 select: Callable[[int], None], *, upload: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 timeline: Timeline | None = None, stream: Any = None) -> Any:
        """Run the schedule on ``args`` for the mini-batches ``rows`` (row indices of the batch).

        ``select(i)`` is called before mini-batch ``i`` runs (the cache runtime switches plans).
        ``upload`` puts the row indices on the device (one copy, no host wait).
        With a ``timeline``, each step's span is recorded with its mini-batch (compute spans
        timed on ``stream`` where that is a CUDA stream)."""
        batch = sum(len(r) for r in rows)
        shared: dict[fx.Node, Any] = {}
        envs: list[dict[fx.Node, Any]] = [{} for _ in rows]
        order = upload(torch.tensor([i for r in rows for i in r], dtype=torch.long))
        ends = list(itertools.accumulate(len(r) for r in rows))
        indices = [order[end - len(r):end] for r, end in zip(rows, ends, strict=True)]
        batch_inputs, size_inputs = set(self.split.batch_inputs), set(self.split.size_inputs)
        for position, (node, value) in enumerate(zip(self._placeholders, args, strict=True)):
            if position in batch_inputs:
                if value.shape[0] != batch:
                    raise RuntimeError(f"input {node.name} has {value.shape[0]} rows, the mini-batches {batch}")
                for env, index in zip(envs, indices):
                    env[node] = value.index_select(0, index)
            elif position in size_inputs:
                for env, r in zip(envs, rows):
                    env[node] = len(r)
            else:
                shared[node] = value
        for (segment, barrier), free_at, free_after in zip(self._segments, self._free_at, self._free_after):
            for i, env in enumerate(envs):
                select(i)
                for node, dead in zip(segment, free_at):
                    if node in self._batched:
                        lookup = lambda n, env=env: env[n] if n in env else shared[n]  # noqa: E731
                        with timeline.step(node, i, stream) if timeline is not None else _NO_SPAN:
                            env[node] = self._run(node, lookup)
                    elif i == 0:
                        with timeline.step(node, None, stream) if timeline is not None else _NO_SPAN:
                            shared[node] = self._run(node, shared.__getitem__)
                    for value in dead:
                        del env[value]
            if barrier is not None:
                # Run once; what it waits for is every mini-batch's values (it returns nothing).
                after = [[env[n] if n in env else shared[n] for n in barrier.all_input_nodes] for env in envs]
                self._run_barrier(barrier, after)
                del after
            for value in free_after:
                for env in envs:
                    env.pop(value, None)
                shared.pop(value, None)
        return self._outputs(envs, shared, order, batch)

    def _run(self, node: fx.Node, lookup: Callable[[fx.Node], Any]) -> Any:
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        if node.op == "call_module":
            return self._modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return self._kernels.get(node.target, node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.schedule)
        raise RuntimeError(f"cannot run node {node.format_node()}")

    def _run_barrier(self, node: fx.Node, after: list[list[Any]]) -> None:
        run = self._kernels.get(node.target, node.target)
        tensors = [t for values in after for t in values if isinstance(t, torch.Tensor)]
        if node.target is ops.release_weights._opoverload:
            run(node.args[0], tensors)
        else:  # cache_commit
            run(tensors)

    def _outputs(self, envs, shared, order, batch):
        def gather(node: fx.Node) -> Any:
            if node not in self._batched:
                return shared[node]
            pieces = [env[node] for env in envs]
            out = pieces[0].new_empty((batch, *pieces[0].shape[1:]))
            out.index_copy_(0, order, torch.cat(pieces))
            return out

        return fx.node.map_arg(self._output.args[0], gather)
