"""Repeated layers traced once: the generator marks them as nested compile regions, and the
backend inlines the region calls into the flat graph every pass was written for."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import CaptureBackend
from models import FAMILIES, prompts, tiny_model
from torch import nn

import hscompile
from hscompile.generation import regions
from hscompile.generation.regions import LayerRegions, repeated_layers
from hscompile.ir.fx import module_paths
from hscompile.passes.analyze import analyze
from hscompile.passes.inline_regions import has_regions, inline_regions, region_calls

# These tests are about what dynamo traces: no graph saved by an earlier test may stand in for it.
pytestmark = pytest.mark.usefixtures("fresh_graph_cache")


def _entry(model, input_ids, attention_mask, position_ids):
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=1)


def _capture(model, regions: bool, ids: torch.Tensor):
    """The graph dynamo captures from a generator-style call, with or without layer regions."""
    torch._dynamo.reset()
    backend = CaptureBackend()
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    for tensor in (ids, mask, positions):
        for dim in (0, 1):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    marked = LayerRegions(model)
    with torch.no_grad(), (marked.applied() if regions else contextlib.nullcontext()):
        out = torch.compile(_entry, backend=backend, fullgraph=True)(model, ids, mask, positions)
    return backend.graphs[0], out


def _ops(gm) -> list[tuple[str, str, list[str]]]:
    return [(n.op, str(n.target), module_paths(n)[-1:]) for n in gm.graph.nodes if n.op != "placeholder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_inlined_regions_give_the_graph_dynamo_captures_without_them(family):
    model, ids = tiny_model(family, layers=3), prompts(2, 5)
    flat, expected = _capture(model, False, ids)
    marked, out = _capture(model, True, ids)
    assert has_regions(marked) and not has_regions(flat)
    bodies, calls = region_calls(marked)
    assert (bodies, calls) == (1, 3), "dynamo traced one layer and stamped it out for the other two"
    inlined = inline_regions(marked)
    assert not has_regions(inlined)
    assert _ops(inlined) == _ops(flat), "same ops, in the same order, owned by the same modules"
    assert torch.equal(out.logits, expected.logits)
    assert _summary(analyze(inlined)) == _summary(analyze(flat))


def _summary(plan):
    """The plan without node names (copies of a region body are named anew)."""
    def weights(refs):
        return tuple((w.qualname, w.kind, w.shape, w.dtype) for w in refs)

    return (plan.layer_container, weights(plan.global_weights), len(plan.pre_nodes), len(plan.post_nodes),
            tuple((layer.module_path, layer.module_type, len(layer.nodes), weights(layer.weights),
                   layer.attention.num_heads, layer.attention.num_kv_heads, layer.attention.is_causal,
                   layer.attention.scale, len(layer.recompute.nodes), len(layer.recompute.external_inputs))
                  for layer in plan.layers))


def test_tracing_a_deeper_model_traces_no_more_layers():
    ids = prompts(2, 5)
    for layers in (2, 6):
        graph, _ = _capture(tiny_model("llama", layers=layers), True, ids)
        assert region_calls(graph) == (1, layers)


def test_a_flat_graph_is_returned_as_it_is():
    graph, _ = _capture(tiny_model("gpt2", layers=2), False, prompts(2, 5))
    assert inline_regions(graph) is graph


def test_repeated_layers_are_found_by_structure():
    model = tiny_model("llama", layers=3)
    assert repeated_layers(model) == [model.model.layers]

    class Uneven(nn.Module):  # one class, different shapes: not one structure
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 8)])

    assert repeated_layers(Uneven()) == []
    hooked = tiny_model("llama", layers=2)
    hooked.model.layers[1].forward = lambda *a, **k: None  # a hook library's wrapper: left alone
    assert repeated_layers(hooked) == []


def test_regions_are_bound_only_inside_the_generators_calls():
    model = tiny_model("llama", layers=2)
    regions = LayerRegions(model)
    assert len(regions) == 2
    with regions.applied():
        assert all("forward" in vars(layer) for layer in model.model.layers)
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    with torch.no_grad():  # outside torch.compile a region is the plain forward
        ids = prompts(1, 4)
        with regions.applied():
            inside = model(ids).logits
        assert torch.equal(inside, model(ids).logits)


def test_a_layer_that_computes_differently_gets_a_body_of_its_own():
    model = tiny_model("llama", layers=3)
    model.model.layers[1].self_attn.scaling *= 0.5  # same parameters, another attention scale
    ids = prompts(2, 5)
    flat, expected = _capture(model, False, ids)
    marked, out = _capture(model, True, ids)
    bodies, calls = region_calls(marked)
    assert 3 - calls + bodies == 2, "dynamo's reuse guards made it trace layer 1 apart (inline or as a body)"
    assert torch.equal(out.logits, expected.logits)
    assert _ops(inline_regions(marked)) == _ops(flat)
    torch._dynamo.reset()
    reference = _greedy(model, ids)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
    assert torch.equal(generator.generate(ids, max_new_tokens=3), reference)
    assert [r.traced_layers for r in generator.graphs.records] == [2, 2]


def _greedy(model, ids):
    """transformers' greedy tokens: what every generator below must give."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)


def _pack_layers(model) -> None:
    """Each layer's weights as views of one buffer, as hscompile's loader lays a layer out."""
    for layer in model.model.layers:
        owned = [(module, name, p) for module in layer.modules() for name, p in module.named_parameters(recurse=False)]
        flat = torch.cat([p.detach().reshape(-1) for _, _, p in owned])
        at = 0
        for module, name, p in owned:
            module._parameters[name] = nn.Parameter(flat[at:at + p.numel()].view(p.shape), requires_grad=False)
            at += p.numel()


def test_packed_layer_weights_are_traced_as_one_region():
    model = tiny_model("llama", layers=3)
    _pack_layers(model)
    ids = prompts(2, 5)
    reference = _greedy(model, ids)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
    assert torch.equal(generator.generate(ids, max_new_tokens=3), reference)
    assert [r.traced_layers for r in generator.graphs.records] == [1, 1]


def test_layers_dynamo_cannot_trace_as_a_region_are_traced_one_by_one(monkeypatch, caplog):
    # As on a torch whose regions refuse aliased inputs: the packed weights make the region fail.
    monkeypatch.setattr(regions, "_aliased_inputs_allowed", lambda variable: contextlib.nullcontext())
    model = tiny_model("llama", layers=3)
    _pack_layers(model)
    ids = prompts(2, 5)
    reference = _greedy(model, ids)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
    with caplog.at_level(logging.WARNING, logger="hscompile.generation"):
        assert torch.equal(generator.generate(ids, max_new_tokens=3), reference)
    assert "tracing each layer instead" in caplog.text
    assert [r.traced_layers for r in generator.graphs.records] == [3, 3]
    assert not any("forward" in vars(layer) for layer in model.model.layers)
