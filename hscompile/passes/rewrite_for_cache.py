"""Cache pass: make each layer's attention read and extend the hybrid KV/ACT cache.

Precondition: ``schedule = partition(graph, plan)`` of a graph captured for generation (its
attention covers the new tokens only); ``policy`` names the compute device.

Postcondition: a new schedule in which every ``hybridserve.attention`` step of layer ``l`` is
replaced, in place, by::

    cache_step(hidden_input_of_layer_0, past_key_of_layer_0)   # once, before the first layer's cache ops
    past_kv    = load_kv(l, device)                     # K/V of past tokens in KV blocks
    past_act   = load_act(l, device)                    # checkpoints of past tokens in ACT blocks
    recomputed = recompute_kv(l, past_act, [norm, k_proj, v_proj weights...], [rotary buffers...])
    out        = cache_attention(l, q, k, v, past_kv, recomputed, mask, scale, is_causal)
    store_cache(l, k, v, hidden_input_of_l, positions)  # new tokens -> KV or ACT blocks
    ...
    cache_commit([outputs...])                           # once, after everything: new tokens join the past

The weights ``recompute_kv`` reads are the schedule's weight placeholders, so the offload
pass that runs next turns them into device buffers like any other use. ``schedule`` is
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .. import ops
from ..ir.fx import fake_value
from ..ir.plan import ModelPlan
from ..ir.policy import Policy
from ..ir.schedule import StepKind, set_step, step_info
from .partition import GRAPH_NAME, INPUT_NAMES

__all__ = ["rewrite_for_cache"]


def rewrite_for_cache(schedule: fx.GraphModule, plan: ModelPlan, policy: Policy) -> fx.GraphModule:
    """See the module docstring."""
    graph = fx.Graph()
    output = graph.graph_copy(schedule.graph, {})
    graph.output(output)
    device = torch.device(policy.device)

    by_graph_name: dict[str, fx.Node] = {}
    attn_in: dict[int, fx.Node] = {}
    for node in graph.nodes:
        if GRAPH_NAME in node.meta:
            by_graph_name[node.meta[GRAPH_NAME]] = node
        info = step_info(node)
        if info is not None and info.kind == "attn_in":
            attn_in[info.layer] = node  # type: ignore[index]
    positions = by_graph_name[plan.positions.positions] if plan.positions is not None else None
    rotary = [by_graph_name[w] for w in plan.positions.weights] if plan.positions is not None else []

    for node in list(graph.nodes):
        info = step_info(node)
        if info is None or info.kind != "attention":
            continue
        layer = plan.layers[info.layer]  # type: ignore[index]
        call = attn_in[layer.index]
        hidden = call.args[call.meta[INPUT_NAMES].index(layer.hidden_input)]
        weights = [by_graph_name[w] for w in layer.recompute.weights]
        query, key, value, mask, scale, is_causal = node.args  # key/value: the new tokens' (generation partition)

        with graph.inserting_before(node):
            past_kv = _step(graph, ops.load_kv, (layer.index, device), "load_kv")
            past_act = _step(graph, ops.load_act, (layer.index, device), "load_act")
            recomputed = _step(graph, ops.recompute_kv, (layer.index, past_act, weights, rotary), "recompute")
            attended = _step(
                graph,
                ops.cache_attention,
                (layer.index, query, key, value, past_kv, recomputed, mask, scale, is_causal),
                "attention",
            )
            _step(graph, ops.store_cache, (layer.index, key, value, hidden, positions), "store")
        node.replace_all_uses_with(attended)
        graph.erase_node(node)

    # Open the step before the first cache op, commit it after the last result.
    first = plan.layers[0]
    first_call = attn_in[first.index]
    hidden0 = first_call.args[first_call.meta[INPUT_NAMES].index(first.hidden_input)]
    # A past that is a graph input carries the cache's length; one made in the graph (transformers'
    # first step) is empty.
    past0 = by_graph_name.get(first.attention.past_key) if first.attention.past_key else None
    if past0 is not None and past0.op != "placeholder":
        past0 = None
    opening = next(n for n in graph.nodes if step_info(n) is not None and step_info(n).kind == "load_kv")
    with graph.inserting_before(opening):
        begin = graph.call_function(ops.cache_step._opoverload, (hidden0, past0))
        set_step(begin, "cache_step", None)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        results = [n for n in out.all_input_nodes if isinstance(fake_value(n), torch.Tensor)]
        commit = graph.call_function(ops.cache_commit._opoverload, (results,))
        set_step(commit, "cache_commit", None)
    return fx.GraphModule(schedule, graph, class_name=type(schedule).__name__)


def _step(graph: fx.Graph, op: Any, args: tuple[Any, ...], kind: StepKind) -> fx.Node:
    """A call of the cache op ``op`` serving layer ``args[0]``, recorded as a ``kind`` step."""
    new = graph.call_function(op._opoverload, args)
    set_step(new, kind, args[0])
    return new
