"""``hscompile.inspect``: look at what the backend built for a model.

Everything shown is read from the objects the executor runs (the lowered schedule, the
plan, the policy, the runtime's counters); nothing is recomputed for display.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from torch import fx

from .backend import CompiledModel, compiled_models
from .config import HybridServeConfig, format_bytes
from .ir.call import CallPlan
from .ir.layout import GLOBAL_GROUP, group_layouts
from .ir.plan import ModelPlan
from .ir.policy import Policy
from .ir.schedule import StepInfo, step_info
from .passes.partition import Partition

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
    call: CallPlan | None = None
    """A :class:`~hscompile.Generator`'s last call's plan (waves, blocks on disk); None otherwise."""

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
        scheme = self.policy.weight_format
        if scheme is not None:
            layouts = group_layouts(plan, scheme)
            packed = sum(layouts[layer.index].nbytes for layer in plan.layers)
            parts = "values, scales and zero points" if scheme.asymmetric else "values and scales"
            yield Text(
                f"weight_quant={scheme.name} (groups of {scheme.group_size}): the layers' projections are stored and "
                f"moved as {parts}, {format_bytes(packed)} packed ({packed / plan.layer_weight_bytes:.2f}x), and "
                f"dequantized on the device inside the compute; norms, biases, embeddings and the head stay "
                f"{str(plan.dtype).removeprefix('torch.')}"
            )
        yield self._layers_table()
        yield self._partitions_table()
        yield self._schedule_text()
        yield self._policy_table()
        yield self._stats_table()

    def _placement(self) -> dict[int, str]:
        policy = self.policy
        streamed = list(policy.streamed_layers)
        where: dict[int, str] = {}
        for layer in policy.resident_layers:
            where[layer] = "resident" + (" (in place)" if policy.weights_in_place else " (copied once)")
        for i, layer in enumerate(streamed):
            issued = "at start" if i < policy.prefetch_depth else f"before layer {streamed[i - policy.prefetch_depth]}"
            source = ", read from disk" if layer in policy.disk_layers else ""
            where[layer] = f"streamed: slot {i % policy.ring_slots}, prefetched {issued}{source}"
        return where

    def _layers_table(self) -> Table:
        table = Table(title="Layers (plan and placement)", title_justify="left")
        for column in ("layer", "weights", "placement", "checkpoint (hidden input)", "K/V cached", "recompute slice"):
            table.add_column(column)
        layers = self.plan.layers
        placement = self._placement()
        shown = list(layers) if len(layers) <= 8 else [*layers[:4], None, *layers[-3:]]
        for layer in shown:
            if layer is None:
                table.add_row("...", "", "", "", "", "")
                continue
            site, piece = layer.attention, layer.recompute
            table.add_row(
                layer.module_path,
                f"{len(layer.weights)} tensors, {format_bytes(layer.weight_bytes)}",
                placement[layer.index],
                layer.hidden_input,
                f"{site.num_kv_heads} heads x {site.head_dim}",
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
        steps = [(node, info) for node in self.graph.graph.nodes if (info := step_info(node)) is not None]
        compute = {"pre", "attn_in", "attention", "attn_out", "post"}

        def segment(info: StepInfo) -> str:
            if info.kind in ("pre", "post"):
                return info.kind
            return f"layer {info.layer}"

        segments: list[tuple[str, list[str]]] = []
        first_compute = next((i for i, (_, info) in enumerate(steps) if info.kind in compute), len(steps))
        for i, (node, info) in enumerate(steps):
            if info.kind in compute:
                key = segment(info)
            elif i < first_compute:
                key = "start"
            elif info.kind == "to_host":
                key = "end"
            elif info.kind == "release":  # closes the compute before it
                key = next(segment(x) for _, x in reversed(steps[:i]) if x.kind in compute)
            else:  # prefetch / wait open the compute after them
                key = next((segment(x) for _, x in steps[i + 1:] if x.kind in compute), "end")
            if not segments or segments[-1][0] != key:
                segments.append((key, []))
            segments[-1][1].append(_step_label(node, info))
        return Text("Schedule (inspect(...).graph; runs of layers with the same steps, layer ids relative):\n"
                    + "\n".join(_collapse(segments)))

    def _policy_table(self) -> Table:
        table = Table(title="Policy", title_justify="left", show_header=False)
        policy = self.policy
        weights = "not loaded: planned on the meta device" if policy.weights_device == "meta" else f"on {policy.weights_device}"
        table.add_row("device", f"{policy.device} (weights {weights})")
        budget = "none" if policy.device_budget is None else format_bytes(policy.device_budget)
        memory = policy.memory
        table.add_row(
            "device memory",
            f"budget {budget}; planned {format_bytes(memory.total)} = {memory.describe()}"
            f"; minimum {format_bytes(policy.minimum_device_bytes)}",
        )
        table.add_row("resident layers", _ranges(policy.resident_layers) or "none")
        table.add_row("streamed layers", _ranges(policy.streamed_layers) or "none")
        if policy.disk_layers:
            table.add_row("disk layers", f"{_ranges(policy.disk_layers)}: read from the checkpoint's files at every step "
                                         f"through {policy.disk_slots} host slots x {format_bytes(policy.disk_slot_bytes)}")
        if policy.streamed_layers:
            ring = f"{policy.ring_slots} slots x {format_bytes(policy.slot_bytes)}, prefetch depth {policy.prefetch_depth}"
            table.add_row("ring", ring)
        table.add_row("act ratio", "no cache" if policy.act_ratio is None else f"{policy.act_ratio:.2f}")
        if policy.act_ratio is not None:
            table.add_row("mini-batches", f"{policy.minibatches} per step (each layer's weights serve them all)")
        if policy.predicted is not None:
            p = policy.predicted
            table.add_row(
                "predicted",
                f"longest decode step {p.seconds * 1e3:.2f} ms, bound by {p.bound}: compute {p.compute * 1e3:.2f} + cache "
                f"{p.cache * 1e3:.2f} + recompute {p.recompute * 1e3:.2f} + waiting on the link {p.exposed_link * 1e3:.2f} ms "
                f"(weight copies {p.weight_link * 1e3:.2f} ms in all)",
            )
        table.add_row("block size", f"{policy.block_size} tokens")
        if self.call is not None:
            table.add_row("last call", _describe_call(self.call))
        table.add_row("why", policy.reason)
        return table

    def _stats_table(self) -> Table:
        table = Table(title="Stats", title_justify="left", show_header=False)
        for key, value in self.stats.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
            elif key.endswith(("_bytes", "_budget", "_per_call")) and isinstance(value, int):
                value = f"{value} ({format_bytes(value)})"
            table.add_row(key, _fmt(value))
        return table


def _relative(labels: list[str], layer: int) -> str:
    def offset(match: re.Match[str]) -> str:
        delta = int(match.group(1)) - layer
        return "L" if delta == 0 else f"L{delta:+d}"

    return " -> ".join(re.sub(r"L(\d+)", offset, label) for label in labels)


def _collapse(segments: list[tuple[str, list[str]]]) -> list[str]:
    """Merge consecutive layer segments whose steps match once layer ids are made relative."""
    lines: list[str] = []
    run: tuple[int, int, str] | None = None  # first layer, last layer, relative pattern
    for key, labels in segments:
        layer = int(key.split()[1]) if key.startswith("layer ") else None
        pattern = _relative(labels, layer) if layer is not None else None
        if run is not None and layer == run[1] + 1 and pattern == run[2]:
            run = (run[0], layer, run[2])
            continue
        if run is not None:
            lines.append(_run_line(run))
            run = None
        if layer is not None:
            run = (layer, layer, pattern)  # type: ignore[assignment]
        else:
            lines.append(f"  {key}: " + " -> ".join(labels))
    if run is not None:
        lines.append(_run_line(run))
    return lines


def _run_line(run: tuple[int, int, str]) -> str:
    first, last, pattern = run
    return f"  layer {first}: {pattern}" if first == last else f"  layers {first}-{last}: {pattern}"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _step_label(node: fx.Node, info: StepInfo) -> str:
    if node.op == "call_module":
        return str(node.target).removeprefix("layer_")
    if info.kind in ("prefetch", "wait", "release"):
        group = "globals" if info.layer == GLOBAL_GROUP else f"L{info.layer}"
        size = f", {format_bytes(node.args[1])}" if info.kind == "prefetch" else ""
        return f"{info.kind}({group}{size})"
    if info.kind in ("to_device", "to_host"):
        return f"{info.kind}({node.args[0]})"
    return info.kind


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
    several graphs (new shapes, graph breaks), the newest is shown. A
    :class:`~hscompile.Generator` shows the newest graph it compiled.
    """
    from .generation import Generator

    if isinstance(obj, Generator):
        found = obj.compiled_graphs
        if not found:
            raise TypeError("this Generator has compiled no graph yet: generate once before inspecting it")
    elif isinstance(obj, CompiledModel):
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
    stats["compile_seconds_by_partition"] = dict(compiled.lowering.compiled) if compiled.lowering else {}
    return Inspection(
        graph=compiled.schedule,
        plan=compiled.plan,
        policy=compiled.policy,
        stats=stats,
        config=compiled.config,
        compilations=len(found),
        call=obj.plan if isinstance(obj, Generator) else None,
    )


def _describe_call(call: CallPlan) -> str:
    """The waves of a call, and where its cache blocks went."""
    sizes = [len(w) for w in call.waves]
    text = f"{sum(sizes)} sequences in {len(sizes)} wave{'s' if len(sizes) != 1 else ''}"
    spill = call.spill
    if spill is None:
        return text
    text += (f"; cache blocks on disk: {spill.disk_blocks[0]} KV + {spill.disk_blocks[1]} ACT "
             f"({format_bytes(spill.disk_bytes)}) in {spill.directory}, the host pools keep {spill.host_blocks[0]} KV + "
             f"{spill.host_blocks[1]} ACT")
    if spill.seconds is not None and spill.waves_seconds is not None:
        text += (f"; predicted {spill.seconds:.3g} s against {spill.waves_seconds:.3g} s in {spill.waves} waves "
                 "(disk_cache='auto')")
    elif spill.waves == 0:
        text += "; not one sequence fits host_memory alone"
    else:
        text += f" instead of {spill.waves} waves (disk_cache='on')"
    return text
