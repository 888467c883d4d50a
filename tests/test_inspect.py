from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from models import prompts, tiny_model

import hscompile
from hscompile.passes.partition import Partition


def _compiled(family="llama", layers=3):
    model = tiny_model(family, layers=layers, use_cache=False)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    with torch.no_grad():
        compiled(prompts())
    return model, compiled


def test_inspection_exposes_graph_plan_policy_and_stats():
    _, compiled = _compiled()
    info = hscompile.inspect(compiled)
    assert isinstance(info.graph, fx.GraphModule)
    assert len(info.plan.layers) == 3
    assert info.policy.resident_layers == (0, 1, 2)
    assert info.stats["layers"] == 3 and info.stats["calls"] == 1
    assert info.stats["weight_bytes"] == info.plan.weight_bytes
    # The graph is the one the executor runs, not a copy made for display.
    assert any(isinstance(m, Partition) for m in info.graph.children())
    ops = [n.target for n in info.graph.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.hybridserve.attention.default) == 3


def test_print_renders_a_readable_summary():
    _, compiled = _compiled()
    text = str(hscompile.inspect(compiled))
    for needle in ("LlamaDecoderLayer", "model.layers.2", "layer_attn_in", "layers 0-2", "attention", "Policy", "weight_bytes"):
        assert needle in text, needle


def test_model_compiled_in_place_and_bound_method_are_accepted():
    model = tiny_model("opt")
    model.compile(backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    with torch.no_grad():
        model(prompts())
    assert hscompile.inspect(model).plan.num_layers == 2

    other = tiny_model("gpt2")
    forward = torch.compile(other.forward, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    with torch.no_grad():
        forward(prompts())
    assert hscompile.inspect(forward).plan.layer_container == "transformer.h"


def test_counters_are_live_and_snapshots_are_not():
    model, compiled = _compiled()
    first = hscompile.inspect(compiled)
    with torch.no_grad():
        compiled(prompts())
    assert first.stats["calls"] == 1
    assert hscompile.inspect(compiled).stats["calls"] == 2
    assert hscompile.inspect(model).stats["calls"] == 2  # the original module finds the same compilation


def test_before_the_first_call_says_to_call_it():
    compiled = torch.compile(tiny_model("llama"), backend="hybridserve", options={"device": "cpu"})
    with pytest.raises(ValueError, match="call it once"):
        hscompile.inspect(compiled)


def test_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="backend='hybridserve'"):
        hscompile.inspect(42)
