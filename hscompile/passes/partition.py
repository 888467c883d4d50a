"""Partition pass: cut the graph at the layers and at attention, and build the schedule.

Precondition: ``plan = analyze(gm)``.

Postcondition: a new GraphModule, the *schedule*, with the same placeholders and outputs
as ``gm``. Its compute nodes are:

* ``call_module`` of a :class:`Partition`: ``pre`` (embeddings, positions, rotary tables,
  masks), per layer ``layer_attn_in`` (input norm, q/k/v projections, rotary) and
  ``layer_attn_out`` (output projection, residual, MLP), and ``post`` (final norm, head);
* ``call_function`` of ``torch.ops.hybridserve.attention`` between a layer's two partitions,
  taking K/V *before* GQA head replication (what a KV cache block holds);
* ``getitem`` to unpack partition outputs.

Grad-mode switches (``torch._C._set_grad_enabled``) are dropped: compiled models are
inference-only and the executor owns grad mode.

Structurally identical partitions (same ops, same argument structure, same input shapes,
strides and dtypes; see :func:`~hscompile.ir.fx.structural_key`) are one
:class:`Partition` module shared by all the layers that call it, so they are lowered once.
Every step node carries ``meta[STEP_META]``, a :class:`StepInfo`. ``gm`` is unchanged.

Before::

    embed -> [layer 0: norm, qkv, rotary, sdpa, o_proj, +, mlp, +] -> [layer 1 ...] -> norm -> lm_head

After::

    pre(...) -> layer_attn_in(h0, w0...) -> hybridserve.attention(q, k, v, mask) -> layer_attn_out(...)
             -> layer_attn_in(h1, w1...) -> hybridserve.attention(...)        -> layer_attn_out(...) -> post(...)
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.hybridserve)
from ..ir.fx import backward_slice, extract_subgraph, fake_value, placeholder_source, slice_inputs, structural_key
from ..ir.plan import ModelPlan
from ..ir.schedule import StepKind, set_step

__all__ = ["GRAPH_NAME", "INPUT_NAMES", "Partition", "partition", "stub_cache_updates"]


def stub_cache_updates(gm: fx.GraphModule, plan: ModelPlan) -> fx.GraphModule:
    """Replace each transformers cache update ``cat([past, new], dim=-2)`` by ``hybridserve.cache_stub``.

    Precondition: ``plan = analyze(gm)``. Postcondition: a copy of ``gm`` in which those nodes
    (same names, same fake values) produce a tensor of the concatenation's shape that holds no
    memory; whatever the model does with it (returns it to its cache object, slices it for a
    sliding window) still holds, at no cost. The hybrid cache keeps the real state, and
    attention reads the new tokens' K/V (``AttentionSite.new_key``). ``gm`` is unchanged, and
    returned as it is when no attention extends a cache (the generator's own graphs).
    """
    if all(layer.attention.past_key is None for layer in plan.layers):
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    by_name = {n.name: n for n in graph.nodes}
    for layer in plan.layers:
        site = layer.attention
        if site.past_key is None:
            continue
        for full, past, new in ((site.key, site.past_key, site.new_key), (site.value, site.past_value, site.new_value)):
            node = by_name[full]
            node.target = torch.ops.hybridserve.cache_stub.default
            node.args, node.kwargs = (by_name[past], by_name[new]), {}
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


class Partition(torch.nn.Module):
    """A piece of the model graph that runs as one unit, possibly shared by several layers.

    ``graph_module`` is the FX graph of the piece (what ``inspect`` shows); ``runner`` is
    what actually runs: the graph module itself, or the artifact lowering made from it.
    """

    def __init__(
        self,
        kind: StepKind,
        graph_module: fx.GraphModule,
        key: str,
        layers: tuple[int, ...] = (),
        runner: Callable[..., Any] | None = None,
        lowering: str = "none",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.graph_module = graph_module
        self.key = key
        self.layers = layers
        self.lowering = lowering
        self._runner = runner

    def with_runner(self, runner: Callable[..., Any], lowering: str) -> Partition:
        """A copy of this partition that runs ``runner`` instead of the FX graph."""
        return Partition(self.kind, self.graph_module, self.key, self.layers, runner, lowering)

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if self._runner is None:
            return self.graph_module(*args)
        return tuple(self._runner(*args))

    def extra_repr(self) -> str:
        layers = f", layers={list(self.layers)}" if self.layers else ""
        return f"kind={self.kind!r}, key={self.key!r}, lowering={self.lowering!r}{layers}"


@dataclass(slots=True)
class _Piece:
    kind: StepKind
    layer: int | None
    nodes: list[fx.Node]


# Global grad-mode switches recorded by dynamo (transformers computes rotary tables under
# torch.no_grad()). The executor runs the whole schedule under no_grad; a switch left in a
# partition would turn grad mode back on for everything after it.
_GRAD_MODE_SWITCHES: frozenset[object] = frozenset({torch._C._set_grad_enabled})


def _pieces(gm: fx.GraphModule, plan: ModelPlan, generation: bool) -> list[_Piece]:
    by_name = {n.name: n for n in gm.graph.nodes}
    pieces = [_Piece("pre", None, [by_name[n] for n in plan.pre_nodes])]
    for layer in plan.layers:
        members = {by_name[n] for n in layer.nodes}
        site = layer.attention
        sdpa = by_name[site.sdpa]
        dropped = {by_name[n] for n in site.repeat_nodes} | {sdpa}
        key, value = (site.new_key, site.new_value) if generation else (site.key, site.value)
        seeds = [by_name[site.query], by_name[key], by_name[value]]
        if site.attn_mask is not None and by_name[site.attn_mask] in members:
            seeds.append(by_name[site.attn_mask])
        attn_in = backward_slice(seeds, inside=(members - dropped).__contains__)
        in_set = set(attn_in)
        attn_out = [n for n in gm.graph.nodes if n in members and n not in in_set and n not in dropped]
        pieces += [
            _Piece("attn_in", layer.index, attn_in),
            _Piece("attention", layer.index, [sdpa]),
            _Piece("attn_out", layer.index, attn_out),
        ]
    pieces.append(_Piece("post", None, [by_name[n] for n in plan.post_nodes]))
    for piece in pieces:
        piece.nodes = [n for n in piece.nodes if not (n.op == "call_function" and n.target in _GRAD_MODE_SWITCHES)]
    return pieces


def _is_tensor_valued(node: fx.Node) -> bool:
    return isinstance(fake_value(node), torch.Tensor)


def _rematerialize_sizes(pieces: list[_Piece]) -> None:
    """Make each piece compute the non-tensor values it reads (sizes, shape tuples) itself.

    With dynamic shapes, values like ``hidden.size()`` or ``(batch, -1, heads, dim)`` flow
    between parts of the model; a compiled partition can only exchange tensors and
    symbolic ints. Such values are cheap Python arithmetic over tensor sizes, so every
    consumer recomputes them from the tensors (or size placeholders) they come from.
    """
    for piece in pieces:
        if piece.kind == "attention" or not piece.nodes:
            continue
        members = set(piece.nodes)
        borrowed = [
            n for n in slice_inputs(piece.nodes) if n.op != "placeholder" and not _is_tensor_valued(n)
        ]
        if not borrowed:
            continue
        extra = backward_slice(borrowed, inside=lambda n: n.op != "placeholder" and not _is_tensor_valued(n))
        members.update(extra)
        graph_order = next(iter(members)).graph.nodes
        piece.nodes = [n for n in graph_order if n in members]


INPUT_NAMES = "hybridserve_input_names"
"""Meta key of a partition call: the captured-graph names of the values it receives, in order."""

GRAPH_NAME = "hybridserve_graph_name"
"""Meta key of a schedule placeholder or partition output: the name of the captured graph's node
it stands for (the name the plan uses). Schedule placeholders get readable names instead."""


def _readable_name(node: fx.Node) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` for weights, ``attention_mask`` for inputs."""
    source = placeholder_source(node)
    if source.kind in ("parameter", "buffer"):
        text = source.qualname
    elif source.kind == "input":
        text = re.sub(r"^kwargs\['([^']*)'\]$", r"\1", source.qualname)
        text = re.sub(r"^args\[(\d+)\]$", r"arg\1", text)
    else:
        return node.name
    name = re.sub(r"\W+", "_", text).strip("_")
    return name if name and not name[0].isdigit() else f"_{name}"


def _reads(piece: _Piece, plan: ModelPlan, by_name: dict[str, fx.Node], generation: bool) -> list[fx.Node]:
    """The values a piece reads from outside itself."""
    if piece.kind == "attention":
        site = plan.layers[piece.layer].attention  # type: ignore[index]
        key, value = (site.new_key, site.new_value) if generation else (site.key, site.value)
        names = [site.query, key, value] + ([site.attn_mask] if site.attn_mask else [])
        return [by_name[n] for n in names]
    return slice_inputs(piece.nodes)


def partition(gm: fx.GraphModule, plan: ModelPlan, generation: bool = False) -> fx.GraphModule:
    """Build the schedule GraphModule (see the module docstring).

    ``generation`` prepares a graph for the cache pass: attention steps take the new tokens'
    K/V (run :func:`stub_cache_updates` first on graphs that extend a transformers cache).
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(_readable_name(node))
            env[node].meta = dict(node.meta)
            env[node].meta[GRAPH_NAME] = node.name

    root = torch.nn.Module()
    by_key: dict[str, tuple[str, StepKind, fx.GraphModule, list[int]]] = {}
    names_used: dict[str, int] = {}
    pieces = _pieces(gm, plan, generation)
    _rematerialize_sizes(pieces)
    # A piece outputs the values some other piece reads and does not compute itself, and
    # the values the graph returns.
    needed: set[fx.Node] = set()
    for piece in pieces:
        needed.update(_reads(piece, plan, by_name, generation))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    needed.update(output.all_input_nodes)
    if plan.positions is not None:  # the cache stores each token's position (see passes/rewrite_for_cache.py)
        needed.add(by_name[plan.positions.positions])

    for piece in pieces:
        if piece.kind == "attention":
            layer = plan.layers[piece.layer]  # type: ignore[index]
            site = layer.attention
            mask = env[by_name[site.attn_mask]] if site.attn_mask is not None else None
            key, value = (site.new_key, site.new_value) if generation else (site.key, site.value)
            call = graph.call_function(
                torch.ops.hybridserve.attention.default,
                (env[by_name[site.query]], env[by_name[key]], env[by_name[value]], mask, site.scale, site.is_causal),
            )
            set_step(call, "attention", piece.layer)
            env[piece.nodes[0]] = call
            continue
        if not piece.nodes:
            continue
        inputs = slice_inputs(piece.nodes)
        outputs = [n for n in piece.nodes if n in needed and n not in env]
        sub = extract_subgraph(gm, piece.nodes, inputs, outputs, class_name=f"Partition_{piece.kind}")
        key = structural_key(sub)
        if key not in by_key:
            base = piece.kind if piece.kind in ("pre", "post") else f"layer_{piece.kind}"
            count = names_used.get(base, 0)
            names_used[base] = count + 1
            by_key[key] = (base if count == 0 else f"{base}_{count}", piece.kind, sub, [])
        name, _, _, layers = by_key[key]
        if piece.layer is not None:
            layers.append(piece.layer)
        call = graph.call_module(name, tuple(env[i] for i in inputs))
        set_step(call, piece.kind, piece.layer)
        call.meta[INPUT_NAMES] = tuple(i.name for i in inputs)
        for j, out in enumerate(outputs):
            item = graph.call_function(operator.getitem, (call, j))
            item.meta = {k: v for k, v in out.meta.items() if k in ("val", "example_value")}
            item.meta[GRAPH_NAME] = out.name
            env[out] = item

    graph.output(fx.map_arg(output.args[0], lambda n: env[n]))
    for key, (name, kind, sub, layers) in by_key.items():
        root.add_module(name, Partition(kind, sub, key, tuple(layers)))
    return fx.GraphModule(root, graph, class_name="HybridServeSchedule")
