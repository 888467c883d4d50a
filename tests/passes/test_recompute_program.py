"""The recompute slice reproduces, from the activation checkpoint alone, exactly the K and V
each layer feeds to attention."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
from conftest import capture
from models import FAMILIES, TinyDecoder, prompts, tiny_model

from hscompile.passes.analyze import analyze
from hscompile.passes.recompute_program import build_recompute_module


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _check_every_layer(model, *args):
    gm, example_inputs = capture(model, *args)
    plan = analyze(gm)
    wanted = set()
    for layer in plan.layers:
        piece = layer.recompute
        wanted |= {piece.hidden_input, piece.key, piece.value, *piece.weights, *piece.external_inputs}
    recorder = _Recorder(gm, wanted)
    with torch.no_grad():
        recorder.run(*example_inputs)
    values = recorder.values
    for layer in plan.layers:
        piece = layer.recompute
        module = build_recompute_module(gm, layer)
        with torch.no_grad():
            key, value = module(values[piece.hidden_input], *(values[w] for w in piece.weights),
                                *(values[x] for x in piece.external_inputs))
        assert torch.equal(key, values[piece.key]), f"layer {layer.index}: K differs"
        assert torch.equal(value, values[piece.value]), f"layer {layer.index}: V differs"
        assert key.shape[1] == layer.attention.num_kv_heads
        # The slice is much smaller than the layer: no attention, no output projection, no MLP.
        compute = [n for n in module.graph.nodes if n.op not in ("placeholder", "output")]
        assert len(compute) < len(layer.nodes) // 2
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_reproduces_kv_bit_exactly(family):
    plan = _check_every_layer(tiny_model(family, layers=3), prompts(3, 13))
    assert plan.num_layers == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_slice_reproduces_kv_with_the_hf_cache_enabled(family):
    _check_every_layer(tiny_model(family, use_cache=True), prompts(2, 7))


def test_slice_of_a_decoder_nobody_named():
    torch.manual_seed(0)
    _check_every_layer(TinyDecoder().eval(), prompts(2, 9))


def test_llama_slice_is_the_23_node_norm_projection_rotary_chain():
    gm, _ = capture(tiny_model("llama", use_cache=False), prompts())
    plan = analyze(gm)
    piece = plan.layers[1].recompute
    assert len(piece.nodes) == 23  # measured on transformers 5.x (see DESIGN.md)
    module = build_recompute_module(gm, plan.layers[1])
    targets = {str(n.target) for n in module.graph.nodes if n.op != "placeholder"}
    assert "<built-in function linear>" in targets
    assert not any("scaled_dot_product" in t for t in targets)
