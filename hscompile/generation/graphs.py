"""The graphs one generator compiles: the dynamo backend it compiles them with, the dynamo
settings of its calls, and the device-budget check of a call against graphs compiled earlier."""

from __future__ import annotations

import builtins
import contextlib
import logging
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from ..backend import CompiledModel, compile_graph, record
from ..config import HybridServeConfig
from ..errors import HybridServeError, surface_through_dynamo
from ..ir.call import CallPlan
from ..ir.fx import fake_value
from ..ir.policy import check_device_budget
from ..passes.inline_regions import inline_regions, region_calls
from ..runtime.cache import CacheRuntime
from .captures import CaptureStore, SavedGraph

__all__ = ["CompileRecord", "GeneratorGraphs", "entry_point", "step_activations", "tracing_settings"]

_LOG = logging.getLogger("hscompile.generation")
"""Compilations are reported here (INFO); ``hscompile generate`` shows them as they happen."""


@dataclass(frozen=True, slots=True)
class CompileRecord:
    """Where the time of one graph's compilation went."""

    graph: int
    """The graph's compilation number in this process (:attr:`CompiledModel.sequence`)."""
    kind: str
    """``"prefill"`` or ``"decode"``."""
    layers: int
    traced_layers: int
    """Layers dynamo traced: 1 when every layer is a call of one region body, ``layers`` when it
    traced each (this torch has no regions, or the layers are not one structure)."""
    partitions: int
    """Distinct partitions lowered (identical layers share one)."""
    passes: float
    """Seconds in hscompile's passes (analysis, placement, partitioning, ...)."""
    lowering: float
    """Seconds lowering the partitions (Inductor, or nothing for eager)."""
    cache_hits: int
    """Partitions Inductor's FX graph cache served instead of compiling."""
    trace: float = 0.0
    """Seconds dynamo spent capturing the graph (set once the call that compiled it returns), or
    reading it from a saved capture."""
    saved: str | None = None
    """The file of the saved capture the graph was built from (None: dynamo captured it)."""

    def line(self) -> str:
        return (f"compiled the {self.kind} graph: {self.layers} layers ({self.traced_layers} traced), "
                f"{self.partitions} distinct partitions; "
                f"trace {self.trace:.1f} s, passes {self.passes:.1f} s, lowering {self.lowering:.1f} s"
                f" ({self.cache_hits} from Inductor's cache)"
                + (f" (captured earlier: {self.saved})" if self.saved else ""))


class GeneratorGraphs:
    """The dynamo backend of one generator (every graph is compiled with the cache pass) and the
    graphs it compiled, oldest first."""

    def __init__(self, config: HybridServeConfig, cache: CacheRuntime) -> None:
        self.config = config
        self.cache = cache
        self.plan: CallPlan | None = None
        """The plan of the call in progress: a graph compiled during it is placed for it (set by
        the generator with :meth:`use` before the call's first step)."""
        self.compiled: list[CompiledModel] = []
        self.records: list[CompileRecord] = []
        """One per compiled graph, oldest first (:meth:`traced` adds the trace time)."""
        self.store: CaptureStore | None = None
        """Where the graphs dynamo captures are saved, and saved ones found (None: nowhere)."""
        # When these graphs' owner goes, so do their buffers, whatever dynamo still holds.
        weakref.finalize(self, _release, self.compiled)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_: Any) -> CompiledModel:
        bodies, calls = region_calls(gm)
        flat = inline_regions(gm)
        compiled = self._compile(flat, example_inputs)
        self.records[-1] = replace(self.records[-1], traced_layers=compiled.plan.num_layers - calls + bodies)
        if self.store is not None:
            # After compiling: the shape environment then holds every guard the passes added too.
            self.store.save(flat, example_inputs)
        return compiled

    def compile_saved(self, entry: SavedGraph, graph: fx.GraphModule, example_inputs: list[Any],
                      loading: float) -> CompiledModel:
        """Compile a graph an earlier capture saved (``loading``: the seconds reading it took)."""
        compiled = self._compile(graph, example_inputs)
        self.records[-1] = replace(self.records[-1], traced_layers=0, trace=loading, saved=entry.path.name)
        _LOG.info(self.records[-1].line())
        return compiled

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> CompiledModel:
        """Compile ``gm`` and record it (as if dynamo traced every layer: the callers say otherwise)."""
        assert self.plan is not None, "generation graphs are compiled inside a planned call"
        kind = "prefill" if self.cache.request is not None and self.cache.request.admit is not None else "decode"
        hits = _cache_hits()
        try:
            compiled = compile_graph(gm, example_inputs, self.config, cache=self.cache, call=self.plan)
        except HybridServeError as error:
            raise surface_through_dynamo(error) from None
        record(compiled, example_inputs)
        self.compiled.append(compiled)
        layers = compiled.plan.num_layers
        self.records.append(CompileRecord(
            graph=compiled.sequence, kind=kind, layers=layers, traced_layers=layers,
            partitions=len(set(compiled.partition_calls)),
            passes=sum(s for name, s in compiled.pass_seconds.items() if name != "lower"),
            lowering=compiled.pass_seconds.get("lower", 0.0), cache_hits=_cache_hits() - hits))
        return compiled

    def use(self, plan: CallPlan) -> None:
        """Place the graphs compiled from now on for ``plan``."""
        self.plan = plan

    def traced(self, since: int, seconds: float) -> None:
        """Give the graphs compiled since record ``since`` the call's ``seconds`` that neither the
        backend nor the run took: dynamo's capture."""
        new = self.records[since:]
        if not new:
            return
        share = max(seconds - sum(r.passes + r.lowering for r in new), 0.0) / len(new)
        self.records[since:] = [replace(r, trace=share) for r in new]
        for entry in self.records[since:]:
            _LOG.info(entry.line())

    def backend(self) -> Callable[..., CompiledModel]:
        """What to give ``torch.compile``: a weak handle on these graphs. Dynamo keeps every
        backend it was given until ``torch._dynamo.reset()``; the handle is all it keeps, so a
        dropped generator's graphs (and the host buffers they hold) are freed."""
        graphs = weakref.ref(self)

        def compile_with_cache(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> CompiledModel:
            owner = graphs()
            assert owner is not None, "the generator that owns this backend is gone"
            return owner(gm, example_inputs, **kwargs)

        return compile_with_cache

    def check_budget(self, steps: Sequence[tuple[int, int, bool]], staging: int) -> None:
        """Refuse, before any work, a call that a graph compiled earlier could not run within the
        budget. ``steps`` are the call's step shapes ``(batch, tokens, decode)``; a graph is checked
        only against the steps dynamo would route to it (:func:`step_activations`), with the
        activations of that shape and, for decode steps, the call's longest cache ``staging``."""
        for compiled in self.compiled:
            if compiled.executor is None or compiled.policy.device_budget is None:
                continue
            for batch, tokens, decode in steps:
                activations = step_activations(compiled, batch, tokens)
                if activations is None:
                    continue
                device = torch.device(compiled.policy.device).type
                memory = compiled.policy.memory.for_call(device, activations=activations,
                                                         cache_staging=staging if decode else 0)
                check_device_budget(
                    memory, compiled.policy.device_budget,
                    what=f"this generation's {'decode' if decode else 'prefill'} step of {batch} x {tokens} tokens",
                    advice="generate fewer tokens or sequences at once, or use a new hscompile.Generator with a "
                           "larger budget")


def _cache_hits() -> int:
    """Inductor FX graph cache hits so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _release(compiled: list[CompiledModel]) -> None:
    for graph in compiled:
        graph.release()


def _run_model(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, use_cache: bool, logits_to_keep: int) -> Any:
    # Named arguments, not **inputs: dynamo names the graph's placeholders after them.
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                 logits_to_keep=logits_to_keep)


def entry_point(name: str) -> Callable[..., Any]:
    """A function ``(model, input_ids, ...) -> model(input_ids=..., ...)`` with a code object of its own.

    Dynamo keeps what it compiles on the code object of the frame it starts from. Compiling
    ``model`` itself would start from its class's ``forward``, shared by every instance: each
    generator would add graphs there until dynamo's recompile limit fails every model of the class,
    and those entries would keep dropped models' graphs. Starting each generator from its own
    code object keeps its graphs on it, counted apart, and freed with the generator. The function
    also gets globals of its own: dynamo stores each compiled graph in the globals of the frame it
    compiled, so shared module globals would keep every generator's graphs alive. ``name`` names
    the code object (tracebacks and dynamo's logs show it)."""
    fresh = _run_model.__code__.replace(co_name=name)
    scope = {"__builtins__": builtins, "__name__": __name__}
    return types.FunctionType(fresh, scope, name)


def tracing_settings() -> contextlib.AbstractContextManager:
    """Dynamo settings for the generator's own calls.

    Floats such as attention's scale stay constants (dynamo would lift one that differs between
    two models of the same class as a run-time input), and each generator may add its graphs to
    the model class's code without hitting the recompile limit that several generators (or other
    compilations of that class) in one process would reach together.
    """
    config = torch._dynamo.config
    stack = contextlib.ExitStack()
    # Distinct symbols for distinct dimensions (no duck sizing), so a batch that happens to equal
    # the prompt length keeps its own symbol and the step can still run as mini-batches.
    from torch.fx.experimental import _config as shapes

    if hasattr(shapes, "use_duck_shape"):
        stack.enter_context(shapes.patch(use_duck_shape=False))
    settings: dict[str, object] = {}
    if hasattr(config, "specialize_float"):
        settings["specialize_float"] = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            settings[name] = max(getattr(config, name), 64)
            break
    if settings:
        stack.enter_context(config.patch(**settings))
    return stack


def step_activations(compiled: CompiledModel, batch: int, tokens: int) -> int | None:
    """Activation bytes of ``compiled`` for a step of ``batch`` x ``tokens``, or None when dynamo
    would not route such a step to it.

    The generator's inputs (ids, mask, positions) are all ``(batch, tokens)``: a static size of
    the graph must equal the step's, and a symbolic one serves any size but 0 and 1 (which dynamo
    specialises). Other guards are not modelled: a step this accepts may still get a new graph,
    whose placement then checks the budget itself.
    """
    sizes: dict[Any, int] = {}
    for node in compiled.schedule.graph.nodes:
        if node.op != "placeholder":
            continue
        value = fake_value(node)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
            continue
        for size, wanted in zip(value.shape, (batch, tokens), strict=True):
            if isinstance(size, int):
                if size != wanted:
                    return None
            elif wanted < 2 or sizes.setdefault(size.node.expr, wanted) != wanted:
                return None
    assert compiled.executor is not None
    return compiled.executor.runtime.activations.evaluate_sizes(sizes)
