from __future__ import annotations

import pytest
import torch
from conftest import capture
from models import FAMILIES, GQA_FAMILIES, prompts, tiny_model

from hscompile.ir.fx import fake_value, structural_key
from hscompile.ir.schedule import step_info
from hscompile.passes.analyze import analyze
from hscompile.passes.lower import lower
from hscompile.passes.partition import Partition, partition


def _schedule(model, ids):
    gm, example_inputs = capture(model, ids)
    plan = analyze(gm)
    return gm, example_inputs, plan, partition(gm, plan)


def _steps(schedule):
    return [(info.kind, info.layer) for n in schedule.graph.nodes if (info := step_info(n)) is not None]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_layer_is_attn_in_then_attention_then_attn_out(family):
    _, _, _, schedule = _schedule(tiny_model(family, layers=3), prompts())
    expected = [("pre", None)]
    for i in range(3):
        expected += [("attn_in", i), ("attention", i), ("attn_out", i)]
    expected.append(("post", None))
    assert _steps(schedule) == expected


@pytest.mark.parametrize("layers", [2, 6])
def test_identical_layers_share_one_partition_whatever_the_depth(layers):
    _, _, _, schedule = _schedule(tiny_model("llama", layers=layers), prompts())
    parts = {name: m for name, m in schedule.named_children() if isinstance(m, Partition)}
    assert sorted(parts) == ["layer_attn_in", "layer_attn_out", "post", "pre"]
    assert parts["layer_attn_in"].layers == tuple(range(layers))
    calls = [str(n.target) for n in schedule.graph.nodes if n.op == "call_module"]
    assert calls.count("layer_attn_in") == layers


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_attention_receives_kv_before_gqa_replication(family):
    _, example_inputs, plan, schedule = _schedule(tiny_model(family), prompts())
    site = plan.layers[0].attention
    seen = []

    def spy(q, k, v, mask, scale, is_causal):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return torch.ops.hybridserve.attention.default(q, k, v, mask, scale, is_causal)

    for node in schedule.graph.nodes:
        if node.target is torch.ops.hybridserve.attention.default:
            node.target = spy
    schedule.recompile()
    with torch.no_grad():
        schedule(*example_inputs)
    assert seen == [(site.num_heads, site.num_kv_heads, site.num_kv_heads)] * plan.num_layers
    # repeat_kv's nodes are gone from the partitions.
    all_nodes = {n.name for _, m in schedule.named_children() for n in m.graph_module.graph.nodes}
    assert not set(site.repeat_nodes) & all_nodes


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_schedule_matches_the_graph_bit_for_bit(family):
    gm, example_inputs, _, schedule = _schedule(tiny_model(family, layers=3), prompts())
    with torch.no_grad():
        expected = gm(*example_inputs)
        got = schedule(*example_inputs)
    assert torch.equal(got[0], expected[0])


def test_structural_key_ignores_names_but_not_shapes():
    model = tiny_model("llama", layers=2)
    _, _, _, a = _schedule(model, prompts(2, 7))
    _, _, _, b = _schedule(model, prompts(2, 9))
    assert a.layer_attn_in.key != b.layer_attn_in.key  # different sequence length
    torch._dynamo.reset()
    _, _, _, c = _schedule(tiny_model("llama", layers=2, seed=5), prompts(2, 7, seed=9))
    assert c.layer_attn_in.key == a.layer_attn_in.key  # other weights and tokens, same structure
    assert structural_key(a.layer_attn_in.graph_module) == a.layer_attn_in.key


def test_partition_does_not_touch_its_input():
    gm, _, plan, _ = _schedule(tiny_model("gpt2"), prompts())
    before = gm.code
    partition(gm, plan)
    assert gm.code == before


def test_partitions_exchange_only_tensors_and_sizes_under_dynamic_shapes():
    model = tiny_model("gpt2", layers=2)
    backend_graphs = []

    def backend(gm, example_inputs, **_):
        backend_graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(prompts(2, 7))
        compiled(prompts(3, 9))  # a second shape: dynamo recompiles with symbolic sizes
    gm = backend_graphs[-1]
    plan = analyze(gm)
    assert plan.sizes  # the graph is dynamic
    schedule = partition(gm, plan)
    for node in schedule.graph.nodes:
        if node.op == "call_function" and node.target is __import__("operator").getitem:
            value = fake_value(node)
            assert isinstance(value, (torch.Tensor, torch.SymInt, int)), (node.name, type(value))
    lowered, _ = lower(schedule, [fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"], "eager")
    assert isinstance(lowered.layer_attn_in, Partition)
