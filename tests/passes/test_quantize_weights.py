"""The quantize pass hands each quantized weight to the partitions that read it as its parts,
dequantized inside the partition: the schedule then computes what it computed with the
round-tripped weights, and nothing else reads a quantized weight."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
from conftest import capture
from models import prompts, tiny_model

from hscompile.config import HybridServeConfig
from hscompile.ir.quant import weight_part
from hscompile.ops.quant import dequantize, quantize
from hscompile.passes.analyze import analyze
from hscompile.passes.estimate_activations import estimate_activations
from hscompile.passes.partition import GRAPH_NAME, Partition, partition, stub_cache_updates
from hscompile.passes.place import place
from hscompile.passes.quantize_weights import quantize_weights, quantized_weights
from hscompile.passes.rewrite_for_cache import rewrite_for_cache

LAYERS = 3


@functools.cache
def _captured(generation):
    """One capture per kind of graph for the whole module (the passes never change it)."""
    gm, example_inputs = capture(tiny_model("llama", layers=LAYERS, use_cache=generation), prompts(2, 7))
    plan = analyze(gm)
    return gm, example_inputs, plan, estimate_activations(gm, plan)


def _setup(weight_quant, *, generation=False):
    gm, example_inputs, plan, activations = _captured(generation)
    config = HybridServeConfig.from_options({"device": "cpu", "lowering": "eager", "weight_quant": weight_quant})
    policy = place(plan, activations, example_inputs, config)
    if generation:
        schedule = rewrite_for_cache(partition(stub_cache_updates(gm, plan), plan, generation=True), plan, policy)
    else:
        schedule = partition(gm, plan)
    return plan, policy, schedule, example_inputs


class _Parts(fx.Interpreter):
    """Runs a quantized schedule with each ``weight_part`` read from the weight quantized as the
    weight store would (what the offload pass turns it into)."""

    def __init__(self, gm, scheme):
        super().__init__(gm)
        self.scheme = scheme

    def call_function(self, target, args, kwargs):
        if target is weight_part:
            weight, part = args
            return getattr(quantize(weight, self.scheme), part)
        return super().call_function(target, args, kwargs)


def _parts(node):
    return [u for u in node.users if u.op == "call_function" and u.target is weight_part]


def test_without_a_weight_format_the_schedule_is_returned_as_it_is():
    plan, policy, schedule, _ = _setup("none")
    assert policy.weight_format is None and quantized_weights(plan, None) == {}
    assert quantize_weights(schedule, plan, policy) is schedule


@pytest.mark.parametrize("weight_quant", ["int8", "int4"])
def test_each_quantized_weight_is_read_only_through_its_parts(weight_quant):
    plan, policy, schedule, _ = _setup(weight_quant)
    before = [(n.op, str(n.target), n.name) for n in schedule.graph.nodes]
    result = quantize_weights(schedule, plan, policy)
    result.graph.lint()
    assert [(n.op, str(n.target), n.name) for n in schedule.graph.nodes] == before  # the input is unchanged
    formats = quantized_weights(plan, policy.weight_format)
    assert formats  # the layers' projections
    assert not any(w.node in formats for w in plan.global_weights)  # embeddings, final norm, head stay as they are
    parts = policy.weight_format.parts
    assert parts == (("values", "scales", "zeros") if weight_quant == "int4" else ("values", "scales"))
    for node in result.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.meta.get(GRAPH_NAME, node.name)
        if name in formats:
            assert [p.args[1] for p in _parts(node)] == list(parts)
            assert set(node.users) == set(_parts(node))  # read through its parts only
        else:
            assert _parts(node) == []


def test_partitions_take_the_parts_in_the_weights_place_and_shared_ones_are_rewritten_once():
    plan, policy, schedule, _ = _setup("int8")
    result = quantize_weights(schedule, plan, policy)
    before = {name: m for name, m in schedule.named_children() if isinstance(m, Partition)}
    after = {name: m for name, m in result.named_children() if isinstance(m, Partition)}
    assert sorted(before) == sorted(after)
    assert after["layer_attn_in"].layers == tuple(range(LAYERS))  # one partition still serves every layer
    assert after["layer_attn_in"] is not before["layer_attn_in"] and after["pre"] is before["pre"]
    old_calls = [n for n in schedule.graph.nodes if n.op == "call_module"]
    new_calls = [n for n in result.graph.nodes if n.op == "call_module"]
    for old, new in zip(old_calls, new_calls):
        expected = []
        for arg in old.args:
            parts = _parts(next(n for n in result.graph.nodes if n.name == arg.name)) if arg.op == "placeholder" else []
            expected += [p.name for p in parts] or [arg.name]
        assert [a.name for a in new.args] == expected


@pytest.mark.parametrize("weight_quant", ["int8", "int4"])
def test_the_quantized_schedule_computes_what_the_round_tripped_weights_give(weight_quant):
    plan, policy, schedule, example_inputs = _setup(weight_quant)
    result = quantize_weights(schedule, plan, policy)
    formats = quantized_weights(plan, policy.weight_format)
    scheme = policy.weight_format
    round_tripped = list(example_inputs)
    for w in plan.weights:
        if w.node in formats:
            round_tripped[w.input_index] = dequantize(quantize(example_inputs[w.input_index], scheme))
    with torch.no_grad():
        expected = schedule(*round_tripped)
        got = _Parts(result, scheme).run(*example_inputs)
        plain = schedule(*example_inputs)
    assert torch.equal(got[0], expected[0])
    assert not torch.equal(got[0], plain[0])  # the weights really were quantized


def test_the_recompute_weights_become_their_parts_in_generation_graphs():
    plan, policy, schedule, _ = _setup("int8", generation=True)
    result = quantize_weights(schedule, plan, policy)
    formats = quantized_weights(plan, policy.weight_format)
    recomputes = [n for n in result.graph.nodes if n.target is torch.ops.hybridserve.recompute_kv.default]
    assert len(recomputes) == LAYERS
    for node in recomputes:
        layer = plan.layers[node.args[0]]
        expected = []
        for name in layer.recompute.weights:
            expected += [f"{name}_{p}" for p in policy.weight_format.parts] if name in formats else [name]
        assert [w.args[0].meta[GRAPH_NAME] + "_" + w.args[1] if w.target is weight_part else w.meta[GRAPH_NAME]
                for w in node.args[2]] == expected


def test_a_quantized_weight_read_outside_a_partition_is_refused():
    plan, policy, schedule, _ = _setup("int8")
    formats = quantized_weights(plan, policy.weight_format)
    weight = next(n for n in schedule.graph.nodes if n.op == "placeholder" and n.meta.get(GRAPH_NAME) in formats)
    output = next(n for n in schedule.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], weight),) if isinstance(output.args[0], tuple) else ((output.args[0], weight),)
    schedule.recompile()
    with pytest.raises(RuntimeError, match=f"quantized weight {weight.name} is read by the graph's output"):
        quantize_weights(schedule, plan, policy)
