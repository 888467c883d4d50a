from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import capture
from models import FAMILIES, GQA_FAMILIES, TinyDecoder, WrappedDecoder, prompts, tiny_model

from hscompile.errors import UnsupportedModelError
from hscompile.ir.fx import fake_value, normalize_module_path
from hscompile.passes.analyze import analyze


def _plan(model, *args, **kwargs):
    gm, example_inputs = capture(model, *args, **kwargs)
    return gm, example_inputs, analyze(gm)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_weights_and_attention_match_the_config(family):
    model = tiny_model(family, layers=3)
    gm, _, plan = _plan(model, prompts())
    config = model.config
    assert plan.num_layers == 3
    assert [layer.index for layer in plan.layers] == [0, 1, 2]
    assert plan.hidden_size == 64
    for layer in plan.layers:
        site = layer.attention
        assert site.num_heads == 4 and site.head_dim == 16
        expected_kv = config.num_key_value_heads if family in GQA_FAMILIES else 4
        assert site.num_kv_heads == expected_kv
        assert site.kv_values_per_token == 2 * expected_kv * 16
        assert layer.module_path.endswith(f".{layer.index}")
        # The K a KV block stores is before GQA replication: (batch, kv_heads, seq, head_dim).
        key = fake_value(plan.node(gm, site.key))
        assert tuple(key.shape) == (3, expected_kv, 11, 16)
    # Local weight names are the same in every layer, and the layer's module owns them.
    names = [tuple(w.local_name for w in layer.weights) for layer in plan.layers]
    assert names[0] == names[1] == names[2]
    model_params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for layer in plan.layers:
        assert layer.module_path in modules
        for weight in layer.weights:
            assert weight.qualname == f"{layer.module_path}.{weight.local_name}"
            assert tuple(model_params[weight.qualname].shape) == weight.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_counted_once_including_tied_heads(family):
    model = tiny_model(family)
    _, example_inputs, plan = _plan(model, prompts())
    unique = {id(p): p for p in model.parameters()}
    assert plan.weight_bytes - sum(w.nbytes for w in plan.global_weights if w.kind == "buffer") == sum(
        p.numel() * p.element_size() for p in unique.values()
    )
    for weight in (*plan.global_weights, *(w for layer in plan.layers for w in layer.weights)):
        assert example_inputs[weight.input_index].shape == weight.shape
    if family in ("opt", "gpt2"):  # the LM head is the embedding matrix
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert not any("lm_head" in w.qualname for w in plan.global_weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_chain_through_their_hidden_state(family):
    gm, _, plan = _plan(tiny_model(family, layers=3), prompts())
    for previous, layer in zip(plan.layers, plan.layers[1:]):
        assert layer.hidden_input == previous.output
    first = fake_value(plan.node(gm, plan.layers[0].hidden_input))
    assert tuple(first.shape) == (3, 11, 64)
    assert plan.pre_nodes and plan.post_nodes


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_slice_reads_only_the_checkpoint_norm_kv_weights_and_rotary(family):
    _, _, plan = _plan(tiny_model(family), prompts())
    for layer in plan.layers:
        piece = layer.recompute
        qualnames = {w.node: w.local_name for w in layer.weights}
        read = {qualnames[w] for w in piece.weights}
        assert piece.hidden_input == layer.hidden_input
        assert not any(name.startswith(("mlp", "fc", "o_proj", "self_attn.o_proj", "self_attn.out_proj")) for name in read)
        assert not any("post_attention" in name or "final_layer_norm" in name or "ln_2" in name for name in read)
        if family in ("llama", "mistral", "qwen2", "opt"):  # separate projections: q_proj is not needed
            assert not any("q_proj" in name for name in read)
            assert any("k_proj" in name for name in read) and any("v_proj" in name for name in read)
        assert layer.attention.sdpa not in piece.nodes
        if family in GQA_FAMILIES:  # rotary: cos/sin come from before the layers
            assert len(piece.external_inputs) == 2
        else:  # learned absolute positions are already in the checkpoint
            assert piece.external_inputs == ()


def test_use_cache_graphs_return_kv_as_extra_outputs():
    _, _, plan = _plan(tiny_model("llama", use_cache=True), prompts())
    assert all(len(layer.extra_outputs) == 2 for layer in plan.layers)


def test_analysis_is_pure_and_the_plan_frozen():
    gm, _, _ = _plan(tiny_model("llama"), prompts())
    before = gm.code
    plan = analyze(gm)
    assert gm.code == before
    assert analyze(gm) == plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers[0].index = 5  # type: ignore[misc]


def test_a_decoder_nobody_named_is_understood():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    _, _, plan = _plan(model, prompts(2, 9))
    assert plan.layer_container == "blocks" and plan.num_layers == 3
    assert plan.layers[0].module_type == "Block"
    site = plan.layers[1].attention
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.is_causal) == (3, 3, 16, True)
    read = {w.local_name for w in plan.layers[1].weights if w.node in plan.layers[1].recompute.weights}
    assert read == {"norm1.weight", "norm1.bias", "wk.weight", "wk.bias", "wv.weight", "wv.bias"}
    assert {w.qualname for w in plan.global_weights} == {
        "embed.weight", "pos", "head_norm.weight", "head_norm.bias", "head.weight"}


@pytest.mark.parametrize("cls", [TinyDecoder, WrappedDecoder])
def test_names_are_the_models_own_whatever_frame_dynamo_starts_from(cls):
    # A decorator `def wrapper(*args, **kwargs)` around forward (transformers >= 5.24) makes the
    # model dynamo's L['args'][0] instead of L['self']; the names must not change with it.
    torch.manual_seed(0)
    model = cls().eval()
    _, _, plan = _plan(model, prompts(2, 9))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert [layer.module_path for layer in plan.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    for layer in plan.layers:
        assert layer.module_path in modules
        for weight in layer.weights:
            assert tuple(params[weight.qualname].shape) == weight.shape
    assert {w.qualname for w in plan.global_weights} == {
        "embed.weight", "pos", "head_norm.weight", "head_norm.bias", "head.weight"}


@pytest.mark.parametrize(
    "raw",
    [
        "L['self'].model.layers.0.self_attn",
        "L['args'][0].model.layers.0.self_attn",
        "L['kwargs']['self'].model.layers.0.self_attn",
        "L['self']._modules['model']._modules['layers']._modules['0']._modules['self_attn']",
        "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['self_attn']",
        "G['net']._modules['model'].layers.0.self_attn",
        "self.model.layers.0.self_attn",
    ],
)
def test_module_paths_drop_the_root_however_dynamo_reached_the_model(raw):
    assert normalize_module_path(raw) == "model.layers.0.self_attn"


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


class _DoubleAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x).view(1, -1, 2, 8).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(x.shape)
        return x + F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(x.shape)


class _TwoAttentions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DoubleAttention() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_no_repeated_layers_is_reported():
    gm, _ = capture(_NoLayers(), torch.randn(1, 5, 16))
    with pytest.raises(UnsupportedModelError, match="no repeated decoder layers found under a ModuleList"):
        analyze(gm)


def test_two_attentions_per_layer_is_reported():
    gm, _ = capture(_TwoAttentions(), torch.randn(1, 5, 16))
    with pytest.raises(UnsupportedModelError, match=r"layers\.0 calls attention 2 times"):
        analyze(gm)


def test_eager_attention_gets_a_hint_to_use_sdpa():
    model = tiny_model("llama", attn_implementation="eager")
    model.config._attn_implementation = "eager"
    gm, _ = capture(model, prompts())
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        analyze(gm)


def test_training_mode_is_refused():
    # Not OPT: in transformers 5.17 its decoder draws LayerDrop (`if torch.rand([]) < layerdrop`)
    # whenever it is training (5.23 skips it when layerdrop == 0), a data-dependent branch that
    # fullgraph capture refuses.
    model = tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    gm, _ = capture(model, prompts())
    with pytest.raises(UnsupportedModelError, match=r"model\.eval\(\)"):
        analyze(gm)
