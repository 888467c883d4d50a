"""Lowering pass: compile each distinct partition of a schedule once.

Precondition: ``schedule`` comes from :func:`~hscompile.passes.partition.partition`;
``fake_inputs`` are fake values for its placeholders (dynamo's example values).

Postcondition: a new schedule GraphModule with the same graph, whose :class:`Partition`
modules run a lowered artifact: Inductor's compiled code (``lowering="inductor"``) or the
FX graph itself (``"eager"``). Partitions shared by several layers are compiled once and
the artifact is shared; :class:`LoweringReport` says what was compiled and how long it
took. ``schedule`` is unchanged.

Inductor needs example inputs for each partition. They come from running the schedule on
fake tensors (the schedule's own fake-mode interpretation, as vLLM's piecewise backend
does): each partition sees exactly the shapes, strides and devices it will see at run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode

from .partition import Partition

__all__ = ["LoweringReport", "lower", "lower_module"]


@dataclass(slots=True)
class LoweringReport:
    """What lowering did."""

    lowering: str
    compiled: dict[str, float] = field(default_factory=dict)
    """Partition name -> seconds spent compiling it (once per distinct partition)."""

    @property
    def compile_seconds(self) -> float:
        return sum(self.compiled.values())


def _inductor_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx

    # Inductor may rewrite the graph it is given; the schedule keeps the original for inspection.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return compile_fx(fx.GraphModule(gm, graph), list(example_inputs))


def lower(schedule: fx.GraphModule, fake_inputs: Sequence[Any], lowering: str) -> tuple[fx.GraphModule, LoweringReport]:
    """Lower every distinct partition of ``schedule`` (see the module docstring)."""
    report = LoweringReport(lowering)
    partitions: dict[str, Partition] = {
        name: module for name, module in schedule.named_children() if isinstance(module, Partition)
    }
    if lowering == "eager":
        lowered = {name: p.with_runner(p.graph_module, "eager") for name, p in partitions.items()}
    elif lowering == "inductor":
        examples = _partition_examples(schedule, fake_inputs)
        lowered = {}
        for name, part in partitions.items():
            start = time.perf_counter()
            with torch.no_grad():
                runner = _inductor_compile(part.graph_module, examples[name])
            report.compiled[name] = time.perf_counter() - start
            lowered[name] = part.with_runner(runner, "inductor")
    else:
        raise ValueError(f"unknown lowering {lowering!r}; expected 'inductor' or 'eager'")

    root = torch.nn.Module()
    for name, module in schedule.named_children():
        root.add_module(name, lowered.get(name, module))
    new = fx.GraphModule(root, schedule.graph, class_name=type(schedule).__name__)
    return new, report


class _ExampleRecorder(fx.Interpreter):
    """Runs a schedule on fake tensors and records the arguments of each partition's first call.

    A partition called again with arguments of the same metadata (every layer after the first,
    usually) gives the outputs of the call that had them without being run again: on fake
    tensors a partition's outputs depend on nothing else, and running each layer's partitions
    made this pass grow with depth. Layers read their weights at different offsets of one
    buffer, so offsets are left out of that metadata, except those of the arguments the
    partition's outputs are views of (they carry the offset on)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.examples: dict[str, tuple[Any, ...]] = {}
        self._outputs: dict[tuple[object, ...], Any] = {}
        self._viewed: dict[str, tuple[int, ...]] = {}
        """Partition -> the positions of the arguments its outputs are views of (at its first call)."""

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = str(target)
        self.examples.setdefault(name, args)
        values = (*args, *kwargs.values())
        key = self._key(name, values)
        if key is not None and key in self._outputs:
            return self._outputs[key]
        out = super().call_module(target, args, kwargs)
        viewed = _viewed_arguments(out, values)
        if self._viewed.setdefault(name, viewed) == viewed:
            self._outputs[self._key(name, values)] = out
        return out

    def _key(self, name: str, values: tuple[Any, ...]) -> tuple[object, ...] | None:
        if name not in self._viewed:
            return None
        offsets = tuple(values[i].storage_offset() for i in self._viewed[name])
        return (name, tuple(_metadata(v) for v in values), offsets)


def _metadata(value: Any) -> str:
    """What a partition's fake-mode outputs depend on in one of its arguments (offsets aside)."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}:{value.device}:{tuple(value.shape)}:{value.stride()}"
    return f"{type(value).__name__}:{value!r}"


def _viewed_arguments(outputs: Any, inputs: Sequence[Any]) -> tuple[int, ...]:
    """Positions of the tensors among ``inputs`` that a tensor among ``outputs`` shares storage with."""
    from torch.multiprocessing.reductions import StorageWeakRef

    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    produced = {StorageWeakRef(v.untyped_storage()) for v in flat if isinstance(v, torch.Tensor)}
    return tuple(i for i, v in enumerate(inputs)
                 if isinstance(v, torch.Tensor) and StorageWeakRef(v.untyped_storage()) in produced)


def _remake(fake_inputs: Sequence[Any], device: torch.device | None = None) -> tuple[Any, list[Any]]:
    # Inside a dynamo backend the ambient fake mode is a fresh one made for the backend (it
    # shares the ShapeEnv, so symbolic sizes carry over); Inductor insists that its example
    # inputs belong to it. Re-make each input in that mode from its recorded metadata.
    fake_mode = detect_fake_mode() or detect_fake_mode(list(fake_inputs))
    if fake_mode is None:
        raise RuntimeError("lowering needs fake example inputs (dynamo's example values); found none")
    with fake_mode:
        inputs = [
            torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device or x.device)
            if isinstance(x, torch.Tensor)
            else x
            for x in fake_inputs
        ]
    return fake_mode, inputs


def _partition_examples(schedule: fx.GraphModule, fake_inputs: Sequence[Any]) -> dict[str, tuple[Any, ...]]:
    fake_mode, inputs = _remake(fake_inputs)
    recorder = _ExampleRecorder(schedule)
    # The python dispatcher routes composite ops (linear -> matmul, ...) through their SymInt-aware
    # Python decompositions, as dynamo's own fake propagation does. Without it torch 2.11 runs
    # the C++ composite kernels, which call sizes()/numel() on symbolic tensors: that specializes
    # a dynamic dimension (a guard on the batch) or raises "Cannot call numel() on tensor with
    # symbolic sizes/strides".
    with fake_mode, torch.no_grad(), enable_python_dispatcher():
        recorder.run(*inputs)
    return recorder.examples


def lower_module(gm: fx.GraphModule, lowering: str, device: torch.device | None = None) -> Callable[..., Any]:
    """Lower a standalone piece (its placeholders carry fake values) with ``lowering``.

    ``device`` re-makes the example inputs on another device (the piece's graph must already
    be retargeted to it). Must run inside a dynamo backend call for ``"inductor"``.
    """
    if lowering == "eager":
        return gm
    fakes = [n.meta.get("val", n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder"]
    _, inputs = _remake(fakes, device)
    with torch.no_grad():
        return _inductor_compile(gm, inputs)
