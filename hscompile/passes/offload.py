"""Offload pass: make weight movement explicit in the schedule.

Precondition: ``schedule = partition(graph, plan)``; ``policy = place(...)``.

Postcondition: a new schedule in which

* every layer the policy streams is fetched through the slot ring: at the start of the call
  ``prefetch_weights`` of the first ``prefetch_depth`` streamed layers; before streamed layer
  ``i`` computes, ``prefetch_weights`` of streamed layer ``i + prefetch_depth`` and then
  ``wait_weights`` of layer ``i``; after its last partition, ``release_weights`` of layer
  ``i``, which takes that partition's outputs as arguments so it depends on every use;
* every group the policy copies into a resident device buffer (when the weights live on the
  host) is read through ``wait_weights`` of its resident buffer;
* the partitions read weights as ``as_strided`` views of the group buffer ``wait_weights``
  returns (the packing of :mod:`hscompile.ir.layout`), never the host placeholders; the parts
  of a quantized weight (the quantize pass's ``weight_part`` nodes) likewise;
* when compute runs on another device than the model was traced on, user inputs pass through
  ``to_device``, outputs through ``to_host``, and the partitions' device constants
  (``arange(..., device=...)``, ``.to(device)``) name the compute device.

Weights used in place (already on the compute device) keep flowing from the placeholders.
``schedule`` is unchanged.

Before (a layer)::

    layer_attn_in = self.layer_attn_in(h, w_norm, w_q, w_k, w_v, cos, sin)

After (streamed, depth 1)::

    prefetch_weights(3, 1245184)
    wait_weights = wait_weights(2, [w_norm, w_q, ...], device(type='cuda'), 1245184)
    view_dtype = aten.view.dtype(wait_weights, torch.float16)
    as_strided = aten.as_strided(view_dtype, [4096], [1], 0) ...
    layer_attn_in = self.layer_attn_in(h, as_strided, as_strided_1, ...)
    ...
    release_weights(2, [getitem_9])
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .. import ops
from ..ir.fx import fake_value, structural_key
from ..ir.layout import GLOBAL_GROUP, GroupLayout, group_layouts
from ..ir.plan import ModelPlan
from ..ir.policy import Policy
from ..ir.quant import weight_part
from ..ir.schedule import set_step, step_info
from .partition import GRAPH_NAME, Partition

__all__ = ["offload", "retarget_graph"]

_aten = torch.ops.aten


def _replace_device(value: Any, source: torch.device, target: torch.device, *, strings: bool) -> Any:
    if isinstance(value, torch.device):
        return target if value == source else value
    if strings and isinstance(value, str):
        try:
            return str(target) if torch.device(value) == source else value
        except RuntimeError:
            return value
    if isinstance(value, tuple):
        return tuple(_replace_device(v, source, target, strings=strings) for v in value)
    if isinstance(value, list):
        return [_replace_device(v, source, target, strings=strings) for v in value]
    if isinstance(value, dict):
        return {k: _replace_device(v, source, target, strings=strings or k == "device") for k, v in value.items()}
    return value


def retarget_graph(gm: fx.GraphModule, source: torch.device, target: torch.device) -> fx.GraphModule:
    """A copy of ``gm`` whose device constants and tensor attributes name ``target`` instead of ``source``.

    Strings are rewritten only where they name a device: a ``device=`` keyword, or the
    arguments of ``.to(...)``.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root = torch.nn.Module()
    for node in graph.nodes:
        strings = node.op == "call_method" and node.target == "to"
        node.args = _replace_device(node.args, source, target, strings=strings)
        node.kwargs = _replace_device(dict(node.kwargs), source, target, strings=strings)
        if node.op == "get_attr":
            value: Any = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                value = value.to(target)
            setattr(root, str(node.target).replace(".", "_"), value)
            node.target = str(node.target).replace(".", "_")
    return fx.GraphModule(root, graph, class_name=type(gm).__name__)


class _Builder:
    """Copies the schedule node by node, inserting the steps of the policy."""

    def __init__(self, schedule: fx.GraphModule, plan: ModelPlan, policy: Policy) -> None:
        self.schedule = schedule
        self.policy = policy
        self.layouts: dict[int, GroupLayout] = group_layouts(plan, policy.weight_format)
        self.device = torch.device(policy.device)
        self.trace_device = torch.device(policy.weights_device)
        self.retarget = self.device != self.trace_device
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        # Keyed by the captured graph's placeholder names (the plan's names).
        self.placeholders: dict[str, fx.Node] = {}
        """Captured-graph name -> new placeholder (the host weight, an argument of wait_weights)."""
        self.old_placeholders: dict[str, fx.Node] = {}
        self.parts: dict[tuple[str, str], fx.Node] = {}
        """(captured-graph name, part) -> the quantize pass's ``weight_part`` node."""
        self.weight_nodes = plan.weight_nodes
        self.pending_release: list[tuple[int, fx.Node]] = []

    def _emit(self, target: Any, args: tuple[Any, ...], kind: str, group: int | None) -> fx.Node:
        node = self.graph.call_function(target, args)
        set_step(node, kind, group)  # type: ignore[arg-type]
        return node

    def prefetch(self, group: int) -> None:
        self._emit(ops.prefetch_weights._opoverload, (group, self.layouts[group].nbytes), "prefetch", group)

    def wait(self, group: int) -> None:
        layout = self.layouts[group]
        hosts = [self.placeholders[node] for node in dict.fromkeys(p.node for p in layout.weights)]
        flat = self._emit(ops.wait_weights._opoverload, (group, hosts, self.device, layout.nbytes), "wait", group)
        typed: dict[torch.dtype, fx.Node] = {}
        for packed in layout.weights:
            if packed.dtype not in typed:
                typed[packed.dtype] = self.graph.call_function(_aten.view.dtype, (flat, packed.dtype))
            view = self.graph.call_function(
                _aten.as_strided.default, (typed[packed.dtype], list(packed.shape), list(packed.stride), packed.element_offset)
            )
            if packed.part is None:
                self.env[self.old_placeholders[packed.node]] = view
            else:
                self.env[self.parts[packed.node, packed.part]] = view

    def flush_releases(self) -> None:
        for group, call in self.pending_release:
            after = [self.env[user] for user in call.users if user.op == "call_function" and user.target is operator.getitem]
            self._emit(ops.release_weights._opoverload, (group, after or [self.env[call]]), "release", group)
        self.pending_release.clear()

    def build(self) -> fx.Graph:
        policy = self.policy
        streamed = list(policy.streamed_layers)
        position = {layer: i for i, layer in enumerate(streamed)}
        copied = set(policy.copied_groups)
        depth = policy.prefetch_depth

        transfers = []
        for node in self.schedule.graph.nodes:
            if node.op == "call_function" and node.target is weight_part:
                weight, part = node.args
                self.parts[weight.meta.get(GRAPH_NAME, weight.name), part] = node
            if node.op != "placeholder":
                continue
            new = self.graph.placeholder(node.name)
            new.meta = dict(node.meta)
            name = node.meta.get(GRAPH_NAME, node.name)
            self.env[node] = self.placeholders[name] = new
            self.old_placeholders[name] = node
            if self.retarget and name not in self.weight_nodes and isinstance(fake_value(node), torch.Tensor):
                transfers.append(node)
        # Start the first copies before anything else, so they overlap all the work below.
        for layer in streamed[:depth]:
            self.prefetch(layer)
        for node in transfers:
            self.env[node] = self._emit(ops.to_device._opoverload, (self.env[node], self.device), "to_device", None)
        if GLOBAL_GROUP in copied:
            self.wait(GLOBAL_GROUP)

        for node in self.schedule.graph.nodes:
            if node.op == "placeholder" or node.target is weight_part:
                continue  # a part is a view of its layer's buffer, made by ``wait``
            info = step_info(node)
            if node.op == "output":
                self.flush_releases()
                self._output(node)
                continue
            if info is not None:
                self.flush_releases()
            if info is not None and info.kind == "attn_in":
                layer = info.layer
                if layer in position:
                    ahead = position[layer] + depth
                    if ahead < len(streamed):
                        self.prefetch(streamed[ahead])
                    self.wait(layer)  # type: ignore[arg-type]
                elif layer in copied:
                    self.wait(layer)  # type: ignore[arg-type]
            new = self.graph.node_copy(node, lambda arg: self.env[arg])
            self.env[node] = new
            if info is not None and info.kind == "attn_out" and info.layer in position:
                self.pending_release.append((info.layer, node))  # type: ignore[arg-type]
        return self.graph

    def _output(self, node: fx.Node) -> None:
        def back(arg: fx.Node) -> fx.Node:
            value = self.env[arg]
            if self.retarget and isinstance(fake_value(arg), torch.Tensor):
                return self._emit(ops.to_host._opoverload, (value, self.trace_device), "to_host", None)
            return value

        self.graph.output(fx.map_arg(node.args[0], back))


def offload(schedule: fx.GraphModule, plan: ModelPlan, policy: Policy) -> fx.GraphModule:
    """See the module docstring."""
    builder = _Builder(schedule, plan, policy)
    graph = builder.build()
    root = torch.nn.Module()
    for name, module in schedule.named_children():
        if isinstance(module, Partition) and builder.retarget:
            moved = retarget_graph(module.graph_module, builder.trace_device, builder.device)
            module = Partition(module.kind, moved, structural_key(moved), module.layers)
        root.add_module(name, module)
    return fx.GraphModule(root, graph, class_name=type(schedule).__name__)
