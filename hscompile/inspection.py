"""``hscompile.inspect``: look at what the backend built for a model.

Everything shown is read from the objects the executor runs (the lowered schedule, the
plan, the policy, the runtime's counters); nothing is recomputed for display.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .backend import CompiledModel, compiled_models
from .config import HybridServeConfig, format_bytes
from .passes.partition import Partition, step_info
from .passes.plan import ModelPlan
from .policy import Policy

__all__ = ["Inspection", "inspect"]


@dataclass(frozen=True)
class Inspection:
    """What the hybridserve backend built for one captured graph; ``print()`` it for a summary."""

    graph: fx.GraphModule
    """The schedule, as run: partitions (``call_module``) and ``torch.ops.hybridserve.*`` steps."""
    plan: ModelPlan
    """The analysis of the captured graph (``.layers``, ``.global_weights``, ...)."""
    policy: Policy
    """Placement and caching decisions."""
    stats: dict[str, Any]
    """Counters: compile time, weight bytes, calls, ... (a snapshot taken by ``inspect``)."""
    config: HybridServeConfig
    compilations: int
    """How many graphs the backend compiled for this model (recompiles, graph breaks)."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Panel(Group(*self._renderables()), title="hscompile", expand=False)

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=120, color_system=None, force_terminal=False).print(self)
        return buffer.getvalue()

    # -- pieces --------------------------------------------------------------------------

    def _renderables(self) -> Iterator[Any]:
        plan, first = self.plan, self.plan.layers[0]
        site = first.attention
        yield Text(
            f"{plan.num_layers} x {first.module_type} under {plan.layer_container}; hidden {plan.hidden_size}, "
            f"{site.num_heads} heads / {site.num_kv_heads} kv heads x {site.head_dim}; {str(plan.dtype).removeprefix('torch.')}; "
            f"weights {format_bytes(plan.weight_bytes)} ({format_bytes(plan.layer_weight_bytes)} in layers)"
        )
        yield self._layers_table()
        yield self._partitions_table()
        yield self._schedule_text()
        yield self._policy_table()
        yield self._stats_table()

    def _layers_table(self) -> Table:
        table = Table(title="Layers (plan)", title_justify="left")
        for column in ("layer", "weights", "checkpoint (hidden input)", "attention", "K/V", "recompute slice"):
            table.add_column(column)
        layers = self.plan.layers
        shown = list(layers) if len(layers) <= 6 else [*layers[:3], None, *layers[-2:]]
        for layer in shown:
            if layer is None:
                table.add_row("...", "", "", "", "", "")
                continue
            site, piece = layer.attention, layer.recompute
            table.add_row(
                layer.module_path,
                f"{len(layer.weights)} tensors, {format_bytes(layer.weight_bytes)}",
                layer.hidden_input,
                site.sdpa,
                f"{site.key}, {site.value}",
                f"{len(piece.nodes)} nodes; reads {len(piece.weights)} weights"
                + (f" + {', '.join(piece.external_inputs)}" if piece.external_inputs else ""),
            )
        return table

    def _partitions_table(self) -> Table:
        table = Table(title="Partitions (lowered once each)", title_justify="left")
        for column in ("partition", "kind", "used by", "nodes", "lowering", "compile s"):
            table.add_column(column)
        compiled = self.stats.get("compile_seconds_by_partition", {})
        for name, module in self.graph.named_children():
            if not isinstance(module, Partition):
                continue
            nodes = sum(1 for n in module.graph_module.graph.nodes if n.op not in ("placeholder", "output"))
            used = f"layers {_ranges(module.layers)}" if module.layers else "once"
            seconds = compiled.get(name)
            table.add_row(name, module.kind, used, str(nodes), module.lowering, f"{seconds:.2f}" if seconds is not None else "-")
        return table

    def _schedule_text(self) -> Text:
        lines: list[str] = []
        current: int | None = None
        steps: list[str] = []
        for node in self.graph.graph.nodes:
            info = step_info(node)
            if info is None:
                continue
            label = str(node.target) if node.op == "call_module" else _op_name(node)
            if info.layer != current and steps:
                lines.append(_step_line(current, steps))
                steps = []
            current = info.layer
            steps.append(label)
        if steps:
            lines.append(_step_line(current, steps))
        if len(lines) > 9:
            lines = [*lines[:5], f"  ... {len(lines) - 8} more ...", *lines[-3:]]
        return Text("Schedule (inspect(...).graph):\n" + "\n".join(lines))

    def _policy_table(self) -> Table:
        table = Table(title="Policy", title_justify="left", show_header=False)
        policy = self.policy
        table.add_row("device", policy.device)
        table.add_row("resident layers", _ranges(policy.resident_layers) or "none")
        table.add_row("streamed layers", _ranges(policy.streamed_layers) or "none")
        table.add_row("prefetch depth", str(policy.prefetch_depth))
        table.add_row("act ratio", "no cache" if policy.act_ratio is None else f"{policy.act_ratio:.2f}")
        table.add_row("block size", f"{policy.block_size} tokens")
        table.add_row("why", policy.reason)
        return table

    def _stats_table(self) -> Table:
        table = Table(title="Stats", title_justify="left", show_header=False)
        for key, value in self.stats.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
            elif key.endswith("_bytes"):
                value = f"{value} ({format_bytes(value)})"
            table.add_row(key, _fmt(value))
        return table


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _op_name(node: fx.Node) -> str:
    name = str(node.target)
    return name.removeprefix("hybridserve.").removesuffix(".default")


def _step_line(layer: int | None, steps: list[str]) -> str:
    prefix = f"  layer {layer}: " if layer is not None else "  "
    return prefix + " -> ".join(steps)


def _ranges(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(parts)


def _module_of(obj: object) -> torch.nn.Module | None:
    if isinstance(obj, torch._dynamo.eval_frame.OptimizedModule):
        return obj._orig_mod
    if isinstance(obj, torch.nn.Module):
        return obj
    original = getattr(obj, "_torchdynamo_orig_callable", None)
    owner = getattr(original, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def inspect(obj: object) -> Inspection:
    """Inspect what the hybridserve backend compiled.

    ``obj`` is what ``torch.compile(model, backend="hybridserve")`` returned, a model
    compiled in place with ``model.compile(backend="hybridserve")``, a function compiled
    from a model's bound method, or a :class:`~hscompile.backend.CompiledModel`. Compilation
    is lazy: call the compiled model once before inspecting it. When dynamo compiled
    several graphs (new shapes, graph breaks), the newest is shown.
    """
    if isinstance(obj, CompiledModel):
        found = [obj]
    else:
        module = _module_of(obj)
        if module is None:
            raise TypeError(
                f"hscompile.inspect expects a model compiled with backend='hybridserve' (or what torch.compile "
                f"returned for it); got {type(obj).__name__}"
            )
        found = compiled_models(module)
        if not found:
            raise ValueError(
                "no hybridserve compilation found for this model: compile it with torch.compile(model, "
                "backend='hybridserve') or model.compile(backend='hybridserve'), then call it once (compilation "
                "happens on the first call)"
            )
    compiled = found[-1]
    stats = compiled.stats()
    stats["compile_seconds_by_partition"] = dict(compiled.lowering.compiled)
    return Inspection(
        graph=compiled.schedule,
        plan=compiled.plan,
        policy=compiled.policy,
        stats=stats,
        config=compiled.config,
        compilations=len(found),
    )
