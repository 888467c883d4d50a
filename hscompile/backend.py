"""The ``hybridserve`` dynamo backend.

``torch.compile(model, backend="hybridserve", options={...})`` calls
:func:`hybridserve_backend` with each graph dynamo captures. It validates the options,
runs the pass pipeline (analyze -> partition -> lower) and returns a
:class:`CompiledModel`, which dynamo then calls instead of the graph.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from .config import HybridServeConfig
from .errors import (
    ConfigError,
    HybridServeError,
    UnsupportedModelError,
    surface_through_dynamo,
)
from .ir.activation import ActivationEstimate
from .ir.cache import CacheSpec
from .ir.call import CallPlan
from .ir.fx import fake_value
from .ir.layout import DISK_SLOTS, GLOBAL_GROUP, Extent, disk_extents, group_layouts
from .ir.plan import ModelPlan
from .ir.policy import Policy
from .passes.analyze import analyze
from .passes.estimate_activations import estimate_activations
from .passes.inline_regions import inline_regions
from .passes.lower import LoweringReport, lower, lower_module
from .passes.manager import PassManager, PassSpec
from .passes.offload import offload, retarget_graph
from .passes.partition import partition, stub_cache_updates
from .passes.place import place
from .passes.quantize_weights import quantize_weights
from .passes.recompute_program import (
    RecomputeProgram,
    build_recompute_program,
    check_token_locality,
)
from .passes.rewrite_for_cache import rewrite_for_cache
from .passes.verify_schedule import ScheduleReport, verify_schedule
from .planner.cost_model import resolve_act_ratio
from .runtime.cache import CacheRuntime
from .runtime.device import DeviceBackend, device_backend
from .runtime.disk import DiskTier
from .runtime.executor import Executor, Runtime
from .runtime.weights import WeightRuntime, disk_sources

__all__ = ["BACKEND_NAME", "CompiledModel", "compile_graph", "compiled_models", "hybridserve_backend",
           "record", "register"]

BACKEND_NAME = "hybridserve"


def _verify(schedule: fx.GraphModule, policy: Policy) -> ScheduleReport:
    return verify_schedule(schedule, policy.ring_slots)


def _partition_for_generation(graph: fx.GraphModule, plan: ModelPlan) -> fx.GraphModule:
    return partition(stub_cache_updates(graph, plan), plan, generation=True)


def _recompute_program(
    graph: fx.GraphModule, plan: ModelPlan, example_inputs: Sequence[Any], config: HybridServeConfig, policy: Policy
) -> RecomputeProgram | UnsupportedModelError:
    """The graph's K/V recompute program, lowered for the compute device, checked token-local;
    or why there is none (the cache then stores this graph's tokens as K/V)."""
    try:
        return _build_program(graph, plan, example_inputs, config, policy)
    except UnsupportedModelError as why:
        return why


def _build_program(
    graph: fx.GraphModule, plan: ModelPlan, example_inputs: Sequence[Any], config: HybridServeConfig, policy: Policy
) -> RecomputeProgram:
    device, trace = torch.device(policy.device), torch.device(policy.weights_device)

    def lower_piece(module: fx.GraphModule) -> Any:
        if trace != device:
            module = retarget_graph(module, trace, device)
        return lower_module(module, config.lowering, device if trace != device else None)

    program = build_recompute_program(graph, plan, lower_piece, policy.weight_format)
    weights = {w.node: example_inputs[w.input_index] for w in (*plan.global_weights, *plan.layers[0].weights)}
    check_token_locality(build_recompute_program(graph, plan, lambda module: module, policy.weight_format), plan,
                         weights, weight_format=policy.weight_format)
    return program


def _passes(*, generation: bool, lowering: bool) -> tuple[PassSpec, ...]:
    """The pipeline: inline_regions -> analyze -> estimate_activations -> place -> partition
    [-> recompute_program -> rewrite_for_cache] -> quantize_weights -> offload -> verify_schedule
    [-> lower]. Generation graphs get the cache passes; planning skips lowering."""
    passes = [
        PassSpec("inline_regions", inline_regions, requires=("captured",), provides=("graph",)),
        PassSpec("analyze", analyze, requires=("graph",), provides=("plan",)),
        PassSpec("estimate_activations", estimate_activations, requires=("graph", "plan"), provides=("activations",)),
        PassSpec("place", place, requires=("plan", "activations", "example_inputs", "config", "cache"), provides=("policy",)),
    ]
    if generation:
        passes += [
            PassSpec("partition", _partition_for_generation, requires=("graph", "plan"), provides=("partitioned",)),
            PassSpec("recompute_program", _recompute_program,
                     requires=("graph", "plan", "example_inputs", "config", "policy"), provides=("program",)),
            PassSpec("rewrite_for_cache", rewrite_for_cache, requires=("partitioned", "plan", "policy"),
                     provides=("cached",)),
        ]
    else:
        passes.append(PassSpec("partition", partition, requires=("graph", "plan"), provides=("partitioned",)))
    passes += [
        PassSpec("quantize_weights", quantize_weights, requires=("cached" if generation else "partitioned", "plan", "policy"),
                 provides=("quantized",)),
        PassSpec("offload", offload, requires=("quantized", "plan", "policy"), provides=("schedule",)),
        PassSpec("verify_schedule", _verify, requires=("schedule", "policy"), provides=("schedule_report",)),
    ]
    if lowering:
        passes.append(PassSpec("lower", lower, requires=("schedule", "fake_inputs", "lowering"),
                               provides=("lowered", "lowering_report")))
    return tuple(passes)


PIPELINE = PassManager(_passes(generation=False, lowering=True))
"""What ``backend="hybridserve"`` runs on every captured graph."""
GENERATION_PIPELINE = PassManager(_passes(generation=True, lowering=True))
"""What :class:`hscompile.Generator` runs: the same, with each attention reading the hybrid cache."""
PLAN_ONLY = PassManager(_passes(generation=False, lowering=False))
"""Everything but lowering: what ``hscompile inspect PATH`` runs on a meta-device model."""


@dataclass(eq=False, slots=True, weakref_slot=True)
class CompiledModel:
    """Everything compiled for one captured graph. Dynamo calls it in place of the graph.

    Slotted: dynamo wraps what a backend returns with ``functools.wraps``, which copies an
    instance ``__dict__`` into the wrapper, where :meth:`release` could not reach it."""

    config: HybridServeConfig
    plan: ModelPlan
    schedule: fx.GraphModule
    """The lowered schedule; the executor runs exactly this (unlowered when only planned)."""
    policy: Policy
    schedule_report: ScheduleReport
    lowering: LoweringReport | None
    pass_seconds: dict[str, float]
    executor: Executor | None
    """None when the graph was only planned (``hscompile inspect PATH``), not compiled to run."""
    sequence: int = field(default=0)
    """Order of compilation in this process (later graphs of one model have larger numbers)."""
    _layer_bytes: int | None = field(default=None, repr=False)
    """The layers' packed bytes, once :meth:`stats` computed them (the layouts are derived, not kept)."""

    def __call__(self, *args: Any) -> Any:
        if self.executor is None:
            raise RuntimeError("this graph was planned for inspection only; compile the model to run it")
        return self.executor(*args)

    def release(self) -> None:
        """Drop what running needs (the executor: weight store, device buffers, cache runtime),
        once whoever compiled this graph is gone. Dynamo may keep the graph itself past that (its
        guards on a model's class finalize only with the class), but not those buffers."""
        self.executor = None

    @property
    def partition_calls(self) -> list[str]:
        """The partition each ``call_module`` step of the schedule runs, in order (repeats shared)."""
        return [str(n.target) for n in self.schedule.graph.nodes if n.op == "call_module"]

    def stats(self) -> dict[str, Any]:
        """Counters of this compilation and its runs (a fresh dict each call)."""
        partitions = self.partition_calls
        if self._layer_bytes is None:
            layouts = group_layouts(self.plan, self.policy.weight_format)
            self._layer_bytes = sum(layout.nbytes for group, layout in layouts.items() if group != GLOBAL_GROUP)
        stats: dict[str, Any] = {
            "layers": self.plan.num_layers,
            "resident_layers": len(self.policy.resident_layers),
            "streamed_layers": len(self.policy.streamed_layers),
            "partitions": len(set(partitions)),
            "partition_calls": len(partitions),
            "lowering": self.lowering.lowering if self.lowering else "none (planned only)",
            "compiled_artifacts": len(self.lowering.compiled) if self.lowering else 0,
            "compile_seconds": self.lowering.compile_seconds if self.lowering else 0.0,
            "pass_seconds": dict(self.pass_seconds),
            "weight_bytes": self.plan.weight_bytes,
            # What the layers take packed as the store holds them (quantized with weight_quant, aligned):
            # the bytes a streamed layer's copies move.
            "layer_weight_bytes": self._layer_bytes,
            "weight_quant": self.policy.weight_format.name if self.policy.weight_format else "none",
            "global_weight_bytes": self.plan.global_weight_bytes,
            "planned_device_bytes": self.policy.memory.total,
            "minimum_device_bytes": self.policy.minimum_device_bytes,
            "schedule_weight_bytes_per_call": self.schedule_report.weight_bytes_per_call,
        }
        if self.executor is not None:
            stats.update(self.executor.stats())
        return stats


class _CompiledRegistry:
    """Finds the compilations made for a model, from its parameters; keeps per-model state.

    ``torch.compile(..., backend="hybridserve")`` looks the backend up by name and never
    tells it which module or wrapper it compiles for, so :func:`hscompile.inspect` cannot
    walk from the model to its compiled graphs. The backend does receive the model's
    parameters (dynamo lifts them as graph inputs), so it records each compilation under
    them here, and the hybrid cache of a model driven by transformers' own generation loop
    (:meth:`session`). Everything is held weakly by the model's parameters: the registry
    keeps no model alive.
    """

    def __init__(self) -> None:
        self._by_tensor: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._sessions: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._disk: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._sequence = itertools.count(1)

    def next_sequence(self) -> int:
        return next(self._sequence)

    def record(self, compiled: CompiledModel, example_inputs: Sequence[Any]) -> None:
        ref = weakref.ref(compiled)
        for value in example_inputs:
            if isinstance(value, torch.nn.Parameter):
                self._by_tensor.setdefault(value, []).append(ref)

    def session(self, example_inputs: Sequence[Any], config: HybridServeConfig, plan: ModelPlan) -> CacheRuntime:
        """The hybrid cache of a model driven by transformers' generation loop (one per model and options)."""
        anchor = next(x for x in example_inputs if isinstance(x, torch.nn.Parameter))
        sessions = self._sessions.setdefault(anchor, {})
        key = repr(sorted(config.to_options().items()))
        if key not in sessions:
            spec = CacheSpec.from_plan(plan, config.cache.block_size, config.quant.cache_quant)
            sessions[key] = CacheRuntime(device=config.device, host_budget=config.memory.host_memory)
            sessions[key].use(CallPlan.fixed(resolve_act_ratio(config, spec)))
        return sessions[key]

    def disk_tier(self, example_inputs: Sequence[Any], extents: dict[int, tuple[Extent, ...]],
                  backend: DeviceBackend) -> DiskTier:
        """The disk tier of a model with layers on disk: one for all its graphs, so host memory holds
        its staging slots once (kept with the model's parameters, as :meth:`session` is)."""
        anchor = next(x for x in example_inputs if isinstance(x, torch.nn.Parameter))
        tier = self._disk.get(anchor)
        if tier is None or tier.extents != extents:
            tier = self._disk[anchor] = DiskTier(extents, backend, slots=DISK_SLOTS)
        return tier

    def lookup(self, tensors: Sequence[torch.Tensor]) -> list[CompiledModel]:
        found: dict[int, CompiledModel] = {}
        for tensor in tensors:
            for ref in self._by_tensor.get(tensor, ()):
                compiled = ref()
                if compiled is not None:
                    found[id(compiled)] = compiled
        return sorted(found.values(), key=lambda c: c.sequence)


# The one piece of process state: see _CompiledRegistry for why it must exist.
_REGISTRY = _CompiledRegistry()


def compiled_models(model: torch.nn.Module) -> list[CompiledModel]:
    """Compilations the hybridserve backend made for ``model``'s graphs, oldest first."""
    return _REGISTRY.lookup(list(model.parameters()))


def record(compiled: CompiledModel, example_inputs: Sequence[Any]) -> None:
    """Remember ``compiled`` under the parameters among ``example_inputs`` (for :func:`compiled_models`)."""
    _REGISTRY.record(compiled, example_inputs)


def _config_from(kwargs: dict[str, Any]) -> HybridServeConfig:
    unexpected = sorted(set(kwargs) - {"options", "mode"})
    if unexpected:
        raise ConfigError(f"unexpected backend argument(s) {', '.join(unexpected)}; pass settings as options={{...}}")
    mode = kwargs.get("mode")
    if mode not in (None, "default"):
        raise ConfigError(
            f"mode={mode!r} is not supported by backend 'hybridserve' (only 'default'); configure it with options={{...}}"
        )
    return HybridServeConfig.from_options(kwargs.get("options"))


def _runtime(
    plan: ModelPlan,
    policy: Policy,
    activations: ActivationEstimate,
    example_inputs: Sequence[Any],
    cache: CacheRuntime | None,
) -> Runtime:
    backend = device_backend(torch.device(policy.device))
    weights = {w.node: example_inputs[w.input_index] for w in plan.weights}
    layouts = group_layouts(plan, policy.weight_format)
    stored = disk_sources(policy, layouts, weights)
    extents = {group: disk_extents([(path, at, nbytes) for _, nbytes, path, at in parts])
               for group, parts in stored.items()}
    disk = _REGISTRY.disk_tier(example_inputs, extents, backend) if extents else None
    weight_runtime = WeightRuntime(policy, layouts, weights, backend, disk, stored)
    in_place = (
        plan.global_weight_bytes + sum(plan.layers[i].weight_bytes for i in policy.resident_layers)
        if policy.weights_in_place
        else 0
    )
    return Runtime(policy, backend, weight_runtime, activations, in_place, cache)


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: HybridServeConfig,
    *,
    plan_only: bool = False,
    cache: CacheRuntime | None = None,
    call: CallPlan | None = None,
    strict_cache: bool = True,
    plan: ModelPlan | None = None,
) -> CompiledModel:
    """Run the pipeline on one dynamo graph and build what dynamo will call.

    ``plan_only`` stops before lowering and builds no runtime: nothing is compiled, allocated
    or copied (used to inspect models on the meta device). ``cache`` makes it a generation
    graph whose attention reads and extends the hybrid cache that runtime serves, placed to leave
    room for the cache staging of ``call``, the plan of the call that compiles it (required with
    it); with
    ``strict_cache`` a graph from which K/V cannot be recomputed is an error, without it the
    cache stores that graph's tokens as K/V only. ``plan``, when the caller already analysed
    ``gm``, is used instead of analysing it again.
    """
    if (cache is None) != (call is None):
        raise TypeError("compile_graph takes cache and call together")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sequence = _REGISTRY.next_sequence()
    inputs = {
        "captured": gm,
        "example_inputs": example_inputs,
        "fake_inputs": [fake_value(n) for n in placeholders],
        "config": config,
        "lowering": config.lowering,
        "cache": call,
    }
    if plan is not None:
        inputs["plan"] = plan
    if cache is not None and cache.program is not None and cache.program.tokens_per_call is None:
        # An earlier graph of this cache (the prefill's) left a shape-generic program, which
        # recomputes any tokens for every graph: slicing and lowering this graph's own would be
        # thrown away (the cache keeps the one that reaches furthest), at an Inductor compile each.
        inputs["program"] = cache.program
    pipeline = PLAN_ONLY if plan_only else GENERATION_PIPELINE if cache is not None else PIPELINE
    result = pipeline.run(inputs, tag=f"graph{sequence}")
    artifacts = result.artifacts
    executor = None
    if cache is not None:
        assert call is not None
        cache.configure(CacheSpec.from_plan(artifacts["plan"], config.cache.block_size, config.quant.cache_quant))
        program = artifacts["program"]
        if isinstance(program, UnsupportedModelError):
            if strict_cache and call.act_ratio > 0:
                raise program
            cache.no_program = str(program)
        else:
            cache.offer(program)
    if not plan_only:
        runtime = _runtime(
            artifacts["plan"], artifacts["policy"], artifacts["activations"], example_inputs,
            cache,
        )
        executor = Executor(artifacts["lowered"], runtime)
    return CompiledModel(
        config=config,
        plan=artifacts["plan"],
        schedule=artifacts["schedule"] if plan_only else artifacts["lowered"],
        policy=artifacts["policy"],
        schedule_report=artifacts["schedule_report"],
        lowering=None if plan_only else artifacts["lowering_report"],
        pass_seconds=result.seconds,
        executor=executor,
        sequence=sequence,
    )


def hybridserve_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> CompiledModel:
    """The dynamo backend registered as ``"hybridserve"``.

    ``kwargs`` are what ``torch.compile`` forwards: ``options`` (see
    :class:`~hscompile.config.HybridServeConfig`) and ``mode`` (only ``"default"``).

    A graph that extends a transformers cache (``model.generate`` calling a model compiled
    with this backend) is compiled with the hybrid cache: the model's attention state lives
    in hscompile's host block pools, and the cache object it returns holds placeholders.
    """
    try:
        config = _config_from(kwargs)
        cache = call = None
        gm = inline_regions(gm)
        plan = analyze(gm)
        if plan.layers[0].attention.past_key is not None:
            cache = _REGISTRY.session(example_inputs, config, plan)
            call = cache.plan
        compiled = compile_graph(gm, example_inputs, config, cache=cache, call=call, strict_cache=False,
                                 plan=plan)
    except HybridServeError as error:
        raise surface_through_dynamo(error) from None
    _REGISTRY.record(compiled, example_inputs)
    return compiled


def register() -> None:
    """Make ``backend="hybridserve"`` resolvable by dynamo.

    Harmless to call again, and a no-op when the ``torch_dynamo_backends`` entry point of
    an installed hscompile already provides the name (dynamo loads it on first lookup).
    """
    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(hybridserve_backend, name=BACKEND_NAME)
