"""Quantize pass: the compute that reads a quantized weight receives its parts and dequantizes them.

Precondition: ``schedule`` comes from :func:`~hscompile.passes.partition.partition` (and
:func:`~hscompile.passes.rewrite_for_cache.rewrite_for_cache` for generation); ``policy.weight_format``
says how the layers' projections are stored (:func:`~hscompile.ir.layout.group_layouts` names
them: the entries of a layer's layout that carry a ``part``).

Postcondition: when the policy has no weight format, ``schedule`` itself. Otherwise a new
schedule in which

* each quantized weight placeholder ``w`` is followed by one ``weight_part(w, part)`` node per
  part of its format (``values``, ``scales`` and for int4 ``zeros``): what the offload pass
  replaces by views of the layer's packed buffer, as it replaces ``w`` itself otherwise;
* every partition that read ``w`` takes those parts in its place (consecutive arguments) and
  starts with the dequantization of :func:`hscompile.ops.quant.dequantize_parts`, traced into
  its graph, so the lowering fuses it with the compute and the full-precision weight exists only
  inside the partition; a partition shared by several layers is rewritten once;
* every list argument that held ``w`` (the weights of ``recompute_kv``) holds its parts, which
  the recompute program built with the same format (:func:`dequantize_inputs`) expects.

A quantized weight used anywhere else is an error. ``schedule`` is unchanged.

Before (a layer)::

    layer_attn_in = self.layer_attn_in(h, w_norm, w_q, w_k, w_v, cos, sin)

After (int8)::

    w_q_values = weight_part(w_q, 'values'); w_q_scales = weight_part(w_q, 'scales'); ...
    layer_attn_in = self.layer_attn_in(h, w_norm, w_q_values, w_q_scales, w_k_values, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx

from ..ir.fx import fake_value, structural_key
from ..ir.layout import group_layouts
from ..ir.plan import ModelPlan
from ..ir.policy import Policy
from ..ir.quant import QuantScheme, weight_part
from ..ops.quant import dequantize_parts
from .partition import GRAPH_NAME, Partition

__all__ = ["dequantize_inputs", "quantize_weights", "quantized_weights"]

_Format = tuple[QuantScheme, tuple[int, ...], torch.dtype]
"""How one weight is stored: its scheme, and its own shape and dtype."""


def quantized_weights(plan: ModelPlan, scheme: QuantScheme | None) -> dict[str, _Format]:
    """Placeholder name -> format of every weight ``scheme`` stores quantized (the layouts decide)."""
    if scheme is None:
        return {}
    refs = {w.node: w for w in plan.weights}
    found = {}
    for layout in group_layouts(plan, scheme).values():
        for packed in layout.weights:
            if packed.part is not None:
                found[packed.node] = (scheme, refs[packed.node].shape, refs[packed.node].dtype)
    return found


def _fragment(form: _Format) -> fx.GraphModule:
    """``dequantize_parts`` for one weight format, traced to ATen ops on meta tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    scheme, shape, dtype = form
    parts = [torch.empty(scheme.part_shape(p, shape), dtype=scheme.part_dtype(p, dtype), device="meta")
             for p in scheme.parts]
    return make_fx(lambda *xs: dequantize_parts(dtype, *xs))(*parts)


def dequantize_inputs(gm: fx.GraphModule, formats: Mapping[int, _Format], *, class_name: str | None = None) -> fx.GraphModule:
    """A copy of ``gm`` whose input ``i`` (for each ``i`` in ``formats``) is replaced by that
    weight's parts, as consecutive inputs, dequantized at the start of the graph.

    The new placeholders carry fake values (the replaced input's fake mode and device), so the
    copy can be lowered on its own; everything else is copied as it is."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    pending: list[tuple[fx.Node, _Format, list[fx.Node]]] = []
    for i, node in enumerate(placeholders):
        if i not in formats:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        scheme, shape, dtype = formats[i]
        fake = fake_value(node)
        parts = []
        for part in scheme.parts:
            new = graph.placeholder(f"{node.name}_{part}")
            if isinstance(fake, torch.Tensor):
                with fake.fake_mode:  # type: ignore[attr-defined]
                    new.meta["example_value"] = torch.empty(
                        scheme.part_shape(part, shape), dtype=scheme.part_dtype(part, dtype), device=fake.device)
            parts.append(new)
        pending.append((node, formats[i], parts))
    fragments: dict[_Format, fx.GraphModule] = {}
    for node, form, parts in pending:
        if form not in fragments:
            fragments[form] = _fragment(form)
        fragment = fragments[form]
        inputs = [n for n in fragment.graph.nodes if n.op == "placeholder"]
        env[node] = graph.graph_copy(fragment.graph, dict(zip(inputs, parts)))
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and "val" in node.meta and node.meta["val"].device.type == "meta":
            del node.meta["val"]  # traced on meta tensors: not this graph's values
    return fx.GraphModule(gm, graph, class_name=class_name or type(gm).__name__)


def quantize_weights(schedule: fx.GraphModule, plan: ModelPlan, policy: Policy) -> fx.GraphModule:
    """See the module docstring."""
    formats = quantized_weights(plan, policy.weight_format)
    if not formats:
        return schedule
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    parts_of: dict[fx.Node, list[fx.Node]] = {}
    """Old weight placeholder -> its part nodes in the new graph."""
    old_nodes = list(schedule.graph.nodes)
    for node in old_nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    for node in old_nodes:
        form = formats.get(node.meta.get(GRAPH_NAME, node.name)) if node.op == "placeholder" else None
        if form is not None:
            parts_of[node] = []
            for part in form[0].parts:
                parts_of[node].append(graph.create_node("call_function", weight_part, (env[node], part),
                                                        name=f"{node.name}_{part}"))

    root = torch.nn.Module()
    rewritten: dict[str, tuple[int, ...]] = {}
    for name, module in schedule.named_children():
        root.add_module(name, module)

    def expand(args: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for arg in args:
            if isinstance(arg, fx.Node) and arg in parts_of:
                out.extend(parts_of[arg])
            elif isinstance(arg, fx.Node):
                out.append(env[arg])
            elif isinstance(arg, (list, tuple)):
                out.append(type(arg)(expand(arg)))
            else:
                out.append(arg)
        return out

    for node in old_nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            used = [a for a in node.all_input_nodes if a in parts_of]
            if used:
                raise _stray(used[0], "the graph's output")
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        if node.op == "call_module" and isinstance(getattr(schedule, str(node.target)), Partition):
            positions = tuple(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in parts_of)
            if positions:
                name = str(node.target)
                if name not in rewritten:
                    part = getattr(schedule, name)
                    quantized = {i: formats[node.args[i].meta.get(GRAPH_NAME, node.args[i].name)] for i in positions}
                    gm = dequantize_inputs(part.graph_module, quantized)
                    root.add_module(name, Partition(part.kind, gm, structural_key(gm), part.layers))
                    rewritten[name] = positions
                elif rewritten[name] != positions:
                    raise AssertionError(f"partition {name} is called with quantized weights at different positions")
                env[node] = _copy_with(graph, node, expand(node.args), env)
                continue
        elif any(a in parts_of for a in node.all_input_nodes):
            if node.op == "call_function" and all(not (isinstance(a, fx.Node) and a in parts_of) for a in node.args):
                # Only inside a list (recompute_kv's weights): parts in the weight's place.
                env[node] = _copy_with(graph, node, expand(node.args), env)
                continue
            raise _stray(next(a for a in node.all_input_nodes if a in parts_of), f"{node.op} {node.target}")
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, graph, class_name=type(schedule).__name__)


def _copy_with(graph: fx.Graph, node: fx.Node, args: list[Any], env: dict[fx.Node, fx.Node]) -> fx.Node:
    kwargs = fx.map_arg(dict(node.kwargs), lambda n: env[n])
    new = graph.create_node(node.op, node.target, tuple(args), kwargs, name=node.name)
    new.meta = dict(node.meta)
    return new


def _stray(weight: fx.Node, user: str) -> RuntimeError:
    return RuntimeError(f"quantized weight {weight.name} is read by {user}, not by a partition or a weight list: "
                        "it would have to be dequantized there; use weight_quant='none' for this model")
