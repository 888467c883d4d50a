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
from .errors import ConfigError, HybridServeError, surface_through_dynamo
from .passes.analyze import analyze
from .passes.graph_utils import fake_value
from .passes.lower import LoweringReport, lower
from .passes.manager import PassManager, PassSpec
from .passes.partition import partition
from .passes.placement import place
from .passes.plan import ModelPlan
from .policy import Policy
from .runtime.executor import Executor

__all__ = ["BACKEND_NAME", "CompiledModel", "compile_graph", "compiled_models", "hybridserve_backend", "register"]

BACKEND_NAME = "hybridserve"

PIPELINE = PassManager(
    (
        PassSpec("analyze", analyze, requires=("graph",), provides=("plan",)),
        PassSpec("place", place, requires=("plan", "example_inputs", "config"), provides=("policy",)),
        PassSpec("partition", partition, requires=("graph", "plan"), provides=("schedule",)),
        PassSpec("lower", lower, requires=("schedule", "fake_inputs", "lowering"), provides=("lowered", "lowering_report")),
    )
)


@dataclass(eq=False)
class CompiledModel:
    """Everything compiled for one captured graph. Dynamo calls it in place of the graph."""

    config: HybridServeConfig
    plan: ModelPlan
    schedule: fx.GraphModule
    """The lowered schedule; the executor runs exactly this."""
    policy: Policy
    lowering: LoweringReport
    pass_seconds: dict[str, float]
    executor: Executor
    sequence: int = field(default=0)
    """Order of compilation in this process (later graphs of one model have larger numbers)."""

    def __call__(self, *args: Any) -> Any:
        return self.executor(*args)

    def stats(self) -> dict[str, Any]:
        """Counters of this compilation and its runs (a fresh dict each call)."""
        partitions = [str(n.target) for n in self.schedule.graph.nodes if n.op == "call_module"]
        return {
            "layers": self.plan.num_layers,
            "partitions": len(set(partitions)),
            "partition_calls": len(partitions),
            "lowering": self.lowering.lowering,
            "compiled_artifacts": len(self.lowering.compiled),
            "compile_seconds": self.lowering.compile_seconds,
            "pass_seconds": dict(self.pass_seconds),
            "weight_bytes": self.plan.weight_bytes,
            "layer_weight_bytes": self.plan.layer_weight_bytes,
            "global_weight_bytes": self.plan.global_weight_bytes,
            **self.executor.stats(),
        }


class _CompiledRegistry:
    """Finds the compilations made for a model, from its parameters.

    ``torch.compile(..., backend="hybridserve")`` looks the backend up by name and never
    tells it which module or wrapper it compiles for, so :func:`hscompile.inspect` cannot
    walk from the model to its compiled graphs. The backend does receive the model's
    parameters (dynamo lifts them as graph inputs), so it records each compilation under
    them here. Both sides are weak: the registry keeps neither models nor compilations alive.
    """

    def __init__(self) -> None:
        self._by_tensor: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._sequence = itertools.count(1)

    def next_sequence(self) -> int:
        return next(self._sequence)

    def record(self, compiled: CompiledModel, example_inputs: Sequence[Any]) -> None:
        ref = weakref.ref(compiled)
        for value in example_inputs:
            if isinstance(value, torch.nn.Parameter):
                self._by_tensor.setdefault(value, []).append(ref)

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


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: HybridServeConfig) -> CompiledModel:
    """Run the pipeline on one dynamo graph and build what dynamo will call."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [fake_value(n) for n in placeholders]
    sequence = _REGISTRY.next_sequence()
    result = PIPELINE.run(
        {
            "graph": gm,
            "example_inputs": example_inputs,
            "fake_inputs": fake_inputs,
            "config": config,
            "lowering": config.lowering,
        },
        tag=f"graph{sequence}",
    )
    schedule = result.artifacts["lowered"]
    return CompiledModel(
        config=config,
        plan=result.artifacts["plan"],
        schedule=schedule,
        policy=result.artifacts["policy"],
        lowering=result.artifacts["lowering_report"],
        pass_seconds=result.seconds,
        executor=Executor(schedule),
        sequence=sequence,
    )


def hybridserve_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> CompiledModel:
    """The dynamo backend registered as ``"hybridserve"``.

    ``kwargs`` are what ``torch.compile`` forwards: ``options`` (see
    :class:`~hscompile.config.HybridServeConfig`) and ``mode`` (only ``"default"``).
    """
    try:
        config = _config_from(kwargs)
        compiled = compile_graph(gm, example_inputs, config)
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
