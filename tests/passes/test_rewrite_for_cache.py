"""The cache pass replaces each layer's attention step, in place, by load -> recompute -> attend
-> store over the hybrid cache, opens the step once before the first cache op and commits it
once after the last result; the schedule it was given is left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import capture
from models import prompts, tiny_model

from hscompile.config import HybridServeConfig
from hscompile.ir.fx import fake_value
from hscompile.ir.schedule import step_info
from hscompile.passes.analyze import analyze
from hscompile.passes.estimate_activations import estimate_activations
from hscompile.passes.partition import GRAPH_NAME, INPUT_NAMES, partition, stub_cache_updates
from hscompile.passes.place import place
from hscompile.passes.rewrite_for_cache import rewrite_for_cache

hs = torch.ops.hybridserve
PER_LAYER = [hs.load_kv.default, hs.load_act.default, hs.recompute_kv.default, hs.cache_attention.default,
             hs.store_cache.default]
CACHE_OPS = {*PER_LAYER, hs.cache_step.default, hs.cache_commit.default}
LAYERS = 3


def _rewritten(family):
    gm, example_inputs = capture(tiny_model(family, layers=LAYERS, use_cache=True), prompts(2, 7))
    plan = analyze(gm)
    config = HybridServeConfig.from_options({"device": "cpu", "lowering": "eager"})
    policy = place(plan, estimate_activations(gm, plan), example_inputs, config)
    schedule = partition(stub_cache_updates(gm, plan), plan, generation=True)
    before = [(n.op, n.target, n.name) for n in schedule.graph.nodes]
    cached = rewrite_for_cache(schedule, plan, policy)
    assert [(n.op, n.target, n.name) for n in schedule.graph.nodes] == before  # the input is unchanged
    return plan, schedule, cached


def _names(args):
    return [a.name if isinstance(a, torch.fx.Node) else a for a in args]


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def rewritten(request):
    torch._dynamo.reset()
    return _rewritten(request.param)


def test_no_plain_attention_is_left_and_the_input_had_no_cache_op(rewritten):
    _, schedule, cached = rewritten
    assert len(_calls(schedule, hs.attention.default)) == LAYERS
    assert not any(n.target in CACHE_OPS for n in schedule.graph.nodes)
    assert _calls(cached, hs.attention.default) == []
    assert cached is not schedule
    cached.graph.lint()


def test_each_layer_loads_recomputes_attends_and_stores_in_that_order_where_its_attention_was(rewritten):
    _, _, cached = rewritten
    nodes = list(cached.graph.nodes)
    for layer in range(LAYERS):
        ops = [n.target for n in nodes if n.target in PER_LAYER and n.args[0] == layer]
        assert ops == PER_LAYER, f"layer {layer}"
        # Between the layer's attention input and output partitions, with the step kinds recorded.
        start = next(i for i, n in enumerate(nodes) if (s := step_info(n)) and (s.kind, s.layer) == ("attn_in", layer))
        end = next(i for i, n in enumerate(nodes) if (s := step_info(n)) and (s.kind, s.layer) == ("attn_out", layer))
        placed = [i for i, n in enumerate(nodes) if n.target in PER_LAYER and n.args[0] == layer]
        assert all(start < i < end for i in placed)
        kinds = [step_info(nodes[i]).kind for i in placed]
        assert kinds == ["load_kv", "load_act", "recompute", "attention", "store"]
        assert {step_info(nodes[i]).layer for i in placed} == {layer}


def test_the_attention_output_feeds_what_the_plain_attention_fed(rewritten):
    _, schedule, cached = rewritten
    for old, new in zip(_calls(schedule, hs.attention.default), _calls(cached, hs.cache_attention.default)):
        assert [u.name for u in old.users] == [u.name for u in new.users]
        # Query, new key and value, mask, scale and causality are passed through.
        assert _names(old.args[:3]) == _names(new.args[1:4]) and _names(old.args[3:]) == _names(new.args[6:])


def test_recompute_reads_the_layers_own_weight_placeholders_and_store_reads_its_input(rewritten):
    plan, _, cached = rewritten
    by_layer = {n.args[0]: n for n in _calls(cached, hs.recompute_kv.default)}
    stores = {n.args[0]: n for n in _calls(cached, hs.store_cache.default)}
    for layer in plan.layers:
        _, act, weights, rotary = by_layer[layer.index].args
        assert act.target is hs.load_act.default and act.args[0] == layer.index
        assert all(w.op == "placeholder" for w in weights)
        assert [w.meta[GRAPH_NAME] for w in weights] == list(layer.recompute.weights)
        expected_rotary = list(plan.positions.weights) if plan.positions is not None else []
        assert [w.meta[GRAPH_NAME] for w in rotary] == expected_rotary
        hidden = stores[layer.index].args[3]
        call = next(n for n in cached.graph.nodes if (s := step_info(n)) and (s.kind, s.layer) == ("attn_in", layer.index))
        assert hidden is call.args[call.meta[INPUT_NAMES].index(layer.hidden_input)]
        positions = stores[layer.index].args[4]
        if plan.positions is None:
            assert positions is None
        else:
            assert positions.meta[GRAPH_NAME] == plan.positions.positions


def test_the_step_opens_once_before_the_first_cache_op_and_commits_once_after_every_result(rewritten):
    _, _, cached = rewritten
    nodes = list(cached.graph.nodes)
    (begin,) = _calls(cached, hs.cache_step.default)
    (commit,) = _calls(cached, hs.cache_commit.default)
    first_cache_op = min(i for i, n in enumerate(nodes) if n.target in PER_LAYER)
    assert nodes.index(begin) < first_cache_op
    assert nodes[-2] is commit and nodes[-1].op == "output"
    # The step starts from the first layer's input; the past made inside the graph is no input.
    store0 = next(n for n in _calls(cached, hs.store_cache.default) if n.args[0] == 0)
    assert begin.args == (store0.args[3], None)
    results = [n for n in nodes[-1].all_input_nodes if isinstance(fake_value(n), torch.Tensor)]
    assert commit.args[0] == results and results
