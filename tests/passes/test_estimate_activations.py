"""The activation estimate is the peak of live non-weight bytes in execution order: weights and
views are free, a value is freed after its last use, and with dynamic shapes the estimate is a
function of the size inputs."""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
from conftest import capture
from models import prompts, tiny_model

from hscompile.passes.analyze import analyze
from hscompile.passes.estimate_activations import estimate_activations

ROW = 4 * 8 * 4  # bytes of a float32 (4, 8) tensor


def _graph(build) -> fx.GraphModule:
    """A hand-built graph: ``build(graph, value)`` adds nodes, ``value(node, *shape)`` records the
    node's fake value (meta tensors, as dynamo's would be)."""
    graph = fx.Graph()

    def value(node: fx.Node, *shape: int) -> fx.Node:
        node.meta["val"] = torch.empty(shape, device="meta")
        return node

    graph.output(build(graph, value))
    return fx.GraphModule(torch.nn.Module(), graph)


def _plan(*weights: str) -> SimpleNamespace:
    # The pass reads only the plan's weight names.
    return SimpleNamespace(weight_nodes=frozenset(weights))


def _chain(graph, value, length):
    x = value(graph.placeholder("x"), 4, 8)
    for _ in range(length):
        x = value(graph.call_function(torch.relu, (x,)), 4, 8)
    return x


@pytest.mark.parametrize("length", [1, 2, 5])
def test_a_chain_of_elementwise_ops_holds_two_values_at_once_whatever_its_length(length):
    gm = _graph(lambda g, v: _chain(g, v, length))
    estimate = estimate_activations(gm, _plan())
    assert estimate.hint == 2 * ROW
    assert estimate.symbols == ()


def test_weights_are_not_activations():
    def build(graph, value):
        x = value(graph.placeholder("x"), 4, 8)
        w = value(graph.placeholder("w"), 8, 1000)
        return value(graph.call_function(torch.matmul, (x, w)), 4, 1000)

    gm = _graph(build)
    with_weight = estimate_activations(gm, _plan("w")).hint
    assert with_weight == ROW + 4 * 1000 * 4  # the input and the product, not the (8, 1000) weight
    assert estimate_activations(gm, _plan()).hint == with_weight + 8 * 1000 * 4


def test_a_value_stays_live_until_its_last_use():
    def build(graph, value):
        x = value(graph.placeholder("x"), 4, 8)
        a = value(graph.call_function(torch.relu, (x,)), 4, 8)
        b = value(graph.call_function(torch.relu, (a,)), 4, 8)
        c = value(graph.call_function(torch.relu, (b,)), 4, 8)
        return value(graph.call_function(operator.add, (a, c)), 4, 8)  # a is read again at the end

    # At c: a, b and c are live (x was freed after a; b is freed after c).
    assert estimate_activations(_graph(build), _plan()).hint == 3 * ROW


def test_views_are_free_and_tensor_indexing_is_a_copy():
    def build(graph, value, index_by_tensor):
        x = value(graph.placeholder("x"), 4, 8)
        rows = value(graph.placeholder("rows"), 100) if index_by_tensor else slice(0, 2)
        y = value(graph.call_method("transpose", (x, 0, 1)), 8, 4)
        z = value(graph.call_function(operator.getitem, (y, rows)), 100 if index_by_tensor else 2, 4)
        return value(graph.call_function(torch.relu, (z,)), 100 if index_by_tensor else 2, 4)

    sliced = estimate_activations(_graph(lambda g, v: build(g, v, False)), _plan()).hint
    gathered = estimate_activations(_graph(lambda g, v: build(g, v, True)), _plan()).hint
    assert sliced == ROW  # the transpose and the slice add nothing to x
    assert gathered >= 100 * 4 * 4 + 100 * 4  # the gathered rows are a new tensor, beside the index


def test_a_value_nothing_reads_is_live_only_at_its_own_step():
    def build(graph, value):
        x = value(graph.placeholder("x"), 4, 8)
        value(graph.call_function(torch.exp, (x,)), 400, 8)  # big, unused
        return value(graph.call_function(torch.relu, (x,)), 4, 8)

    assert estimate_activations(_graph(build), _plan()).hint == ROW + 400 * 8 * 4


def test_the_estimate_grows_with_the_batch_and_its_hint_is_the_captured_size():
    model = tiny_model("llama", layers=2)
    torch._dynamo.mark_dynamic(ids := prompts(3, 9), 0)
    gm, example_inputs = capture(model, ids)
    estimate = estimate_activations(gm, analyze(gm))
    assert len(estimate.symbols) >= 1
    position, symbol = estimate.symbols[0]
    assert int(example_inputs[position]) == 3
    assert estimate.hint == estimate.evaluate_sizes({symbol: 3}) > 0
    assert estimate.evaluate_sizes({symbol: 6}) > estimate.evaluate_sizes({symbol: 3})
    # A size missing from the mapping falls back to the captured one.
    assert estimate.evaluate_sizes({}) == estimate.hint


def test_the_estimate_of_a_static_graph_covers_its_output_logits():
    model = tiny_model("llama", layers=2)
    ids = prompts(2, 7)
    gm, _ = capture(model, ids)
    plan = analyze(gm)
    estimate = estimate_activations(gm, plan)
    logits = 2 * 7 * model.config.vocab_size * 4
    assert estimate.symbols == ()
    assert estimate.hint >= logits
    # Weights are excluded: far less than the model's bytes would add.
    assert estimate.hint < logits + plan.weight_bytes
