"""Quantized weights (``weight_quant``) and cache blocks (``cache_quant``): greedy tokens equal
transformers' ``generate`` on the quantized reference, for every family, ratio and placement; the
bytes moved shrink as promised; bad settings are refused by name."""

from __future__ import annotations

import re

import pytest
import torch
from models import FAMILIES, prompts, tiny_model

import hscompile
from hscompile.errors import BudgetError, CheckpointError, ConfigError
from hscompile.ir.layout import ALIGNMENT
from hscompile.quantize import act_tokens_of, quantized_weight_names, reference, reference_cache

GROUP = 32


def _reference_tokens(model, ids, new_tokens, **quant):
    ref = reference(model, **quant)
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)


def _minimum(model, ids, options, new_tokens):
    """The smallest device budget for ``options`` and that call (everything streamed), as the
    refusal of a 1-byte one says."""
    with pytest.raises(BudgetError) as refused:
        hscompile.Generator(model, {**options, "device_memory": 1}).generate(ids, max_new_tokens=new_tokens)
    return int(re.search(r"device_memory >= (\d+)", str(refused.value)).group(1))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_quantized_tokens_equal_transformers_on_the_quantized_reference(family, scheme):
    model = tiny_model(family, layers=3, seed=3)
    ids = prompts(4, 9, seed=5)
    options = {"device": "cpu", "lowering": "eager", "weight_quant": scheme, "quant_group_size": GROUP,
               "act_ratio": 1.0, "block_size": 4}
    budget = _minimum(model, ids, options, 5)  # all-ACT stages the most
    generator = hscompile.Generator(model, {**options, "device_memory": budget})
    expected = _reference_tokens(model, ids, 5, weight_quant=scheme, quant_group_size=GROUP)
    recomputed = 0
    for ratio in (1.0, 0.0, 0.5):  # the same graphs, each ratio a call of its own
        out = generator.generate(ids, max_new_tokens=5, act_ratio=ratio)
        assert torch.equal(out, expected), ratio
        stats = generator.stats()
        assert stats["peak_device_bytes"] <= budget and stats["cache_blocks_in_use"] == 0
        assert (stats["recomputed_tokens"] > recomputed) == (ratio > 0), ratio
        recomputed = stats["recomputed_tokens"]
    prefill = generator.compiled_graphs[0].stats()  # at its minimum budget: every layer streamed
    assert prefill["streamed_layers"] == 3 and prefill["weight_quant"] == scheme


def test_quantized_mini_batches_equal_the_reference():
    model = tiny_model("mistral", layers=2, seed=8)
    ids = prompts(5, 8, seed=2)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "weight_quant": "int4",
                                            "quant_group_size": GROUP, "act_ratio": 0.5, "block_size": 4,
                                            "mini_batch_size": 2})
    out = generator.generate(ids, max_new_tokens=4)
    assert torch.equal(out, _reference_tokens(model, ids, 4, weight_quant="int4", quant_group_size=GROUP))
    assert generator.stats()["minibatches"] >= 3


def test_resident_quantized_layers_are_packed_not_used_in_place_and_match_the_reference():
    model = tiny_model("qwen2", layers=3, seed=4)
    ids = prompts(3, 6)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "weight_quant": "int4",
                                            "quant_group_size": GROUP, "act_ratio": 0.5})
    out = generator.generate(ids, max_new_tokens=4)
    assert torch.equal(out, _reference_tokens(model, ids, 4, weight_quant="int4", quant_group_size=GROUP))
    policy = generator.compiled_graphs[-1].policy
    assert not policy.weights_in_place and policy.resident_layers == (0, 1, 2)
    # The model itself is left as it was: its own weights, unquantized, still give its own tokens.
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(plain, hscompile.generate(model, ids, max_new_tokens=4,
                                                 options={"device": "cpu", "lowering": "eager"}))


@pytest.mark.inductor
def test_inductor_partitions_receive_the_parts_and_dequantize_them_exactly():
    model = tiny_model("llama", layers=2, seed=6)
    ids = prompts(2, 7)
    generator = hscompile.Generator(model, {"device": "cpu", "weight_quant": "int4", "quant_group_size": GROUP,
                                            "act_ratio": 0.5})
    out = generator.generate(ids, max_new_tokens=4)
    assert torch.equal(out, _reference_tokens(model, ids, 4, weight_quant="int4", quant_group_size=GROUP))
    compiled = generator.compiled_graphs[-1]
    attn_in = next(m for m in compiled.schedule.children() if getattr(m, "kind", None) == "attn_in")
    inputs = [n.meta["example_value"] for n in attn_in.graph_module.graph.nodes if n.op == "placeholder"]
    assert sum(1 for x in inputs if isinstance(x, torch.Tensor) and x.dtype == torch.uint8) == 3  # q, k, v values
    assert attn_in.lowering == "inductor"


def _packed(shape, item, *, bits, zeros, group=64):
    """Bytes of one weight as the store packs it, computed by hand: values, then scales (and zero points)."""
    rows, columns = shape
    values = rows * columns * bits // 8
    scales = rows * (columns // group) * item
    return _aligned(values) + _aligned(scales) * (2 if zeros else 1)


def _aligned(n):
    return -(-n // ALIGNMENT) * ALIGNMENT


def test_quantized_layers_move_at_most_055x_int8_and_030x_int4_of_the_bf16_bytes_exactly_as_packed():
    model = tiny_model("llama", layers=3, hidden=256, heads=4, kv_heads=2, intermediate_size=512,
                       dtype=torch.bfloat16)
    ids = prompts(2, 5)
    layer = model.model.layers[0]
    stats = {}
    for scheme, bits in (("none", 16), ("int8", 8), ("int4", 4)):
        options = {"device": "cpu", "lowering": "eager", "weight_quant": scheme, "act_ratio": 0}  # groups of 64
        budget = _minimum(model, ids, options, 2)
        generator = hscompile.Generator(model, {**options, "device_memory": budget})
        generator.generate(ids, max_new_tokens=2)
        stats[scheme] = s = generator.compiled_graphs[0].stats()
        assert s["streamed_layers"] == 3
        expected = 0
        for p in layer.parameters():
            if p.dim() == 2 and scheme != "none":
                expected += _packed(tuple(p.shape), 2, bits=bits, zeros=scheme == "int4")
            else:
                expected += -(-p.numel() * 2 // ALIGNMENT) * ALIGNMENT
        assert s["layer_weight_bytes"] == 3 * expected
        # Every streamed layer crosses the link once per call: the packed bytes, nothing else.
        assert s["schedule_weight_bytes_per_call"] == s["layer_weight_bytes"]
        assert s["weight_h2d_bytes"] == s["setup_h2d_bytes"] + s["calls"] * s["schedule_weight_bytes_per_call"]
    for scheme, bound in (("int8", 0.55), ("int4", 0.30)):
        for key in ("layer_weight_bytes", "schedule_weight_bytes_per_call"):
            assert stats[scheme][key] <= bound * stats["none"][key], (scheme, key)


def test_only_the_layers_projections_are_quantized():
    model = tiny_model("llama", layers=2)
    names = quantized_weight_names(model)
    assert names and all(".layers." in n and "norm" not in n for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names)
    ref = reference(model, weight_quant="int8", quant_group_size=GROUP)
    for name, p in ref.named_parameters():
        changed = not torch.equal(p, model.get_parameter(name))
        assert changed == (name in names), name


def test_the_schedule_and_inspect_say_what_is_quantized_and_what_stays_exact():
    model = tiny_model("llama", layers=3, hidden=64)
    ids = prompts(2, 5)
    options = {"device": "cpu", "lowering": "eager", "weight_quant": "int8", "quant_group_size": GROUP}
    with pytest.raises(BudgetError) as refused, torch.no_grad():
        torch.compile(model, backend="hybridserve", options={**options, "device_memory": 1})(ids)
    budget = int(re.search(r"device_memory >= (\d+)", str(refused.value)).group(1))
    compiled = torch.compile(model, backend="hybridserve", options={**options, "device_memory": budget})
    with torch.no_grad():
        compiled(ids)
    report = hscompile.inspect(compiled)
    text = re.sub(r"[│\s]+", " ", str(report))  # unwrapped
    assert "weight_quant=int8 (groups of 32)" in text and "embeddings and the head stay float32" in text
    assert "dequantized weights" in text  # the device budget holds a layer's matrices at full precision
    # Each prefetch moves the layer's packed (quantized) bytes, as the stats count them.
    prefetches = [n for n in report.graph.graph.nodes if "prefetch_weights" in str(n.target)]
    assert len(prefetches) == 3 == report.stats["streamed_layers"]
    assert sum(n.args[1] for n in prefetches) == report.stats["layer_weight_bytes"] < sum(
        p.numel() * 4 for layer in model.model.layers for p in layer.parameters()) * 0.3


@pytest.mark.parametrize(("options", "message"), [
    ({"weight_quant": "int3"}, r"option 'weight_quant': got 'int3'; expected one of 'none', 'int8', 'int4'"),
    ({"weight_quant": "int4", "quant_group_size": 7}, r"int4 packs two values a byte, so it must be even"),
    ({"weight_quant": "int8", "quant_group_size": 1}, r"option 'quant_group_size': got 1; expected an int in \[2, 65536\]"),
    ({"cache_quant": "int4"}, r"option 'cache_quant': got 'int4'; expected one of 'none', 'int8'"),
])
def test_bad_quantization_options_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        hscompile.Generator(tiny_model("llama"), {"device": "cpu", **options})


def test_a_group_size_that_does_not_divide_a_weight_names_it_and_the_sizes_that_would():
    model = tiny_model("llama", layers=2, hidden=64)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "weight_quant": "int8",
                                            "quant_group_size": 48})
    with pytest.raises(ConfigError, match=r"quant_group_size=48 does not divide the last dimension \(128\) of weight "
                                          r"'model\.layers\.0\.mlp\.down_proj\.weight' \(64, 128\); sizes that "
                                          r"divide it: 2, 4, 8, 16, 32, 64, 128"):
        generator.generate(prompts(2, 4), max_new_tokens=1)


def test_a_pre_quantized_model_or_checkpoint_is_refused(tmp_path):
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(CheckpointError, match=r"the model is already quantized \(gptq\).*weight_quant"):
        hscompile.Generator(model, {"device": "cpu"})
    del model.config.quantization_config
    model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"already quantized \(awq\)"):
        hscompile.from_pretrained(tmp_path)


def _sharp(family, seed, **config):
    """A bf16 model whose attention is sharp enough (matrices x6) that an int8 cache changes its tokens."""
    model = tiny_model(family, layers=2, seed=seed, dtype=torch.bfloat16, **config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model


def _cached_reference(model, ids, new_tokens, *, checkpoints, weight_quant="none"):
    ref = reference(model, weight_quant=weight_quant, quant_group_size=GROUP)
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0, past_key_values=reference_cache(ref, checkpoints=checkpoints))


@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_cache_blocks_give_the_tokens_of_transformers_with_the_same_round_trip(family, ratio):
    model = _sharp(family, seed=0)
    ids = prompts(3, 12, seed=0)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "cache_quant": "int8",
                                            "act_ratio": ratio, "block_size": 4})
    out = generator.generate(ids, max_new_tokens=10)
    assert torch.equal(out, _cached_reference(model, ids, 10, checkpoints=ratio == 1.0))
    pools = generator.cache.cache
    assert pools.kv.dtype == torch.uint8 and pools.act.dtype == torch.uint8  # rows of int8 values and scales
    assert (generator.stats()["recomputed_tokens"] > 0) == (ratio > 0)
    if family == "llama":  # the round trip matters here: unquantized, the tokens differ
        with torch.no_grad():
            plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)
        assert not torch.equal(out, plain)


def test_quantized_weights_and_cache_together_streamed_equal_the_reference():
    model = tiny_model("qwen2", layers=3, seed=2)
    ids = prompts(3, 9, seed=4)
    options = {"device": "cpu", "lowering": "eager", "weight_quant": "int4", "quant_group_size": GROUP,
               "cache_quant": "int8", "act_ratio": 0.0, "block_size": 4}
    generator = hscompile.Generator(model, {**options, "device_memory": _minimum(model, ids, options, 6)})
    out = generator.generate(ids, max_new_tokens=6)
    assert torch.equal(out, _cached_reference(model, ids, 6, checkpoints=False, weight_quant="int4"))
    assert generator.compiled_graphs[0].stats()["streamed_layers"] == 3


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_an_int8_cache_moves_at_most_055x_the_bytes_of_a_bf16_cache_per_decode_step(ratio):
    model = tiny_model("llama", layers=2, hidden=256, heads=4, kv_heads=2, dtype=torch.bfloat16)  # head_dim 64
    ids = prompts(3, 16)
    moved = {}
    for quant in ("none", "int8"):
        generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "cache_quant": quant,
                                                "act_ratio": ratio, "block_size": 4})
        generator.generate(ids, max_new_tokens=4)
        moved[quant] = generator.stats()["cache_h2d_bytes"]
    # Per token and layer: int8 K/V and a bf16 scale per head (K: 2 x 64 + 2 x 2 bytes per head of 256),
    # or an int8 checkpoint and one scale (256 + 2 of 512).
    expected = (2 * 2 * 64 + 2 * 2 * 2) / (2 * 2 * 64 * 2) if ratio == 0 else (256 + 2) / (256 * 2)
    assert moved["int8"] == pytest.approx(expected * moved["none"], rel=0, abs=0.5)
    assert moved["int8"] <= 0.55 * moved["none"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_one_layer_model_is_quantized_like_any_other(family):
    model = tiny_model(family, layers=1, seed=5)
    assert quantized_weight_names(model)  # one layer is still a decoder layer
    ids = prompts(2, 6)
    out = hscompile.generate(model, ids, max_new_tokens=4, options={
        "device": "cpu", "lowering": "eager", "weight_quant": "int4", "quant_group_size": GROUP,
        "cache_quant": "int8", "act_ratio": 1.0, "block_size": 2})
    ref = reference(model, weight_quant="int4", quant_group_size=GROUP)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0, past_key_values=reference_cache(ref, checkpoints=True))
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("family", "ratio"), [(f, 0.5) for f in FAMILIES] + [("qwen2", 0.25)])
def test_int8_cache_blocks_at_a_mixed_ratio_on_a_ragged_batch_give_the_reference_tokens(family, ratio):
    model = _sharp(family, seed=0)
    ids = prompts(3, 12, seed=0)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :7] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    lengths, pads = mask.sum(1).tolist(), (mask.shape[1] - mask.sum(1)).tolist()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "cache_quant": "int8",
                                            "act_ratio": ratio, "block_size": 4})
    out = generator.generate(ids, mask, max_new_tokens=10)
    ref = reference(model, weight_quant="none")
    # Each sequence's first blocks are checkpoints (hscompile's split of prompt + new tokens), the rest K/V.
    cache = reference_cache(ref, act_tokens=act_tokens_of(lengths, 10, ratio, 4), pads=pads)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                past_key_values=cache)
    assert torch.equal(out, expected)
    assert generator.stats()["recomputed_tokens"] > 0
