"""torch.compile(model, backend="hybridserve")(ids).logits equals the eager model's logits."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, TinyDecoder, cache_keyword, prompts, returned_cache, tiny_model

import hscompile

TOLERANCE = 1e-4  # float32, max abs difference of logits


def _compare(model, compiled, ids, **kwargs):
    with torch.no_grad():
        expected = model(ids, **kwargs)
        got = compiled(ids, **kwargs)
    expected = expected.logits if hasattr(expected, "logits") else expected
    got = got.logits if hasattr(got, "logits") else got
    assert got.shape == expected.shape
    difference = (got - expected).abs().max().item()
    assert difference <= TOLERANCE, difference
    return difference


@pytest.mark.parametrize("use_cache", [False, True], ids=["forward", "with_cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_lowering_parity(family, use_cache):
    model = tiny_model(family, layers=3, use_cache=use_cache)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    _compare(model, compiled, prompts(3, 11))
    assert hscompile.inspect(compiled).stats["calls"] == 1  # our backend ran, not a fallback


@pytest.mark.inductor
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_lowering_parity(family):
    model = tiny_model(family, layers=2)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu"})
    _compare(model, compiled, prompts(3, 11))
    stats = hscompile.inspect(compiled).stats
    assert stats["lowering"] == "inductor" and stats["compiled_artifacts"] == 4 and stats["calls"] == 1


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_padded_batch_with_attention_mask(family):
    model = tiny_model(family)
    ids = prompts(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    _compare(model, compiled, ids, attention_mask=mask)


def test_new_shapes_recompile_with_dynamic_sizes_and_stay_exact():
    model = tiny_model("qwen2")
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    for batch, seq in [(2, 7), (3, 12), (4, 9), (2, 5)]:
        _compare(model, compiled, prompts(batch, seq))
    inspection = hscompile.inspect(compiled)
    assert inspection.compilations == 2  # static, then one dynamic graph for every later shape
    assert inspection.plan.sizes
    _compare(model, compiled, prompts(1, 5))  # size 1 is specialised by dynamo: a third graph


@pytest.mark.inductor
def test_inductor_with_dynamic_shapes():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu"})
    for batch, seq in [(2, 7), (3, 12), (1, 5)]:
        _compare(model, compiled, prompts(batch, seq))


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_a_returned_cache_holds_placeholders_and_decoding_from_it_matches(family):
    # With use_cache=True the model's attention state goes to hscompile's hybrid cache; the
    # cache object it returns holds NaN placeholders of the right shapes, good for this model only.
    model = tiny_model(family, use_cache=True)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    ids, step = prompts(2, 8), prompts(2, 1, seed=5)
    with torch.no_grad():
        expected, got = model(ids), compiled(ids)
        assert torch.equal(got.logits, expected.logits)
        for layer in range(2):
            placeholder = returned_cache(got).layers[layer].keys
            assert placeholder.shape == returned_cache(expected).layers[layer].keys.shape
            assert placeholder.untyped_storage().nbytes() <= 8 and bool(placeholder.isnan().all())
        mask = torch.ones(2, 9, dtype=torch.long)
        keyword = cache_keyword(model)
        next_expected = model(step, **{keyword: returned_cache(expected)}, attention_mask=mask).logits
        next_got = compiled(step, **{keyword: returned_cache(got)}, attention_mask=mask).logits
    assert (next_got - next_expected).abs().max().item() <= TOLERANCE


def test_model_compile_in_place_path():
    model = tiny_model("gpt2")
    with torch.no_grad():
        expected = model(prompts()).logits
    model.compile(backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    with torch.no_grad():
        got = model(prompts()).logits
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert hscompile.inspect(model).stats["calls"] == 1


def test_a_decoder_nobody_named_compiles_with_parity():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    _compare(model, compiled, prompts(2, 9))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_runs_on_cpu(family):
    model = tiny_model(family, dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    ids = prompts(2, 6)
    with torch.no_grad():
        expected, got = model(ids).logits, compiled(ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_calls_with_grad_enabled_return_inference_tensors():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"})
    logits = compiled(prompts()).logits
    assert not logits.requires_grad
    with torch.no_grad():
        assert (logits - model(prompts()).logits).abs().max().item() <= TOLERANCE
