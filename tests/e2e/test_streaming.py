"""Weight streaming under a device budget: parity, the budget promise, byte accounting."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import capture
from models import FAMILIES, prompts, tiny_model
from streaming import compile_streaming, run, stats, weight_bytes

import hscompile
from hscompile.backend import compile_graph
from hscompile.config import HybridServeConfig
from hscompile.errors import BudgetError

# (budget as a fraction of the weights, prefetch depth): from "everything resident" to "weights 10x the budget".
SWEEP = [(2.0, 1), (2.0, 2), (0.5, 1), (0.5, 2), (0.25, 1), (0.25, 2), (0.125, 1), (0.125, 2), (0.1, 1), (0.1, 2)]


def _model(family, layers=40, **kw):
    # Many layers with a wide MLP, so that a tenth of the weights still holds the global
    # weights, a ring of prefetch_depth + 1 layers and the activations.
    return tiny_model(family, layers=layers, hidden=32, heads=2, kv_heads=1, use_cache=False, **kw)


@pytest.fixture(scope="module")
def captured():
    """One dynamo capture per family, compiled below under many policies (tracing 40 layers costs seconds)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = _model(family, layers=48, intermediate_size=256 if family in ("llama", "mistral", "qwen2") else None,
                           ffn_dim=256 if family == "opt" else None, n_inner=256 if family == "gpt2" else None)
            ids = prompts(2, 7)
            gm, example_inputs = capture(model, ids)
            with torch.no_grad():
                expected = model(ids).logits
            cache[family] = (model, gm, example_inputs, expected)
        return cache[family]

    return get


@pytest.mark.parametrize(("fraction", "depth"), SWEEP)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_and_budget_from_all_resident_to_a_tenth(captured, family, fraction, depth):
    model, gm, example_inputs, expected = captured(family)
    config = HybridServeConfig.from_options(
        {"device": "cpu", "lowering": "eager", "device_memory": int(weight_bytes(model) * fraction), "prefetch_depth": depth}
    )
    compiled = compile_graph(gm, example_inputs, config)
    (logits,) = compiled(*example_inputs)
    assert torch.equal(logits, expected)
    s = compiled.stats()
    assert s["peak_device_bytes"] <= s["device_budget"]
    # Resident weights cross once, at setup: none on the CPU (used in place), all under the simulated
    # asynchronous device (which, as CUDA, copies them).
    streamed = s["weight_h2d_bytes"] - s["setup_h2d_bytes"]
    if fraction >= 1:
        assert s["streamed_layers"] == 0 and streamed == 0
    else:
        assert s["streamed_layers"] > 0 and streamed == s["schedule_weight_bytes_per_call"] > 0
    if fraction <= 0.125:
        assert weight_bytes(model) >= 8 * s["device_budget"]  # "weights 8x the budget" and beyond


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_through_torch_compile(family):
    model = _model(family, layers=12)
    ids = prompts(2, 7)
    compiled = compile_streaming(model, fraction=0.4, prefetch_depth=2)
    with torch.no_grad():
        assert torch.equal(run(compiled, ids), model(ids).logits)
    s = stats(compiled)
    assert s["streamed_layers"] > 0 and s["peak_device_bytes"] <= s["device_budget"]


@pytest.mark.inductor
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inductor_streaming_parity(family):
    model = _model(family, layers=12)
    compiled = compile_streaming(model, fraction=0.4, lowering="inductor", prefetch_depth=2)
    ids = prompts(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    assert (run(compiled, ids) - expected).abs().max().item() <= 1e-4
    assert stats(compiled)["streamed_layers"] > 0


def test_a_budget_below_the_minimum_is_refused_with_the_minimum_and_the_minimum_works():
    model = _model("llama", layers=6)
    ids = prompts(2, 7)
    with pytest.raises(BudgetError) as info:
        run(compile_streaming(model, budget=1000), ids)
    message = str(info.value)
    minimum = int(re.search(r"device_memory >= (\d+)", message).group(1))
    assert "minimum working set" in message and minimum > 1000
    torch._dynamo.reset()
    compiled = compile_streaming(model, budget=minimum)
    with torch.no_grad():
        assert torch.equal(run(compiled, ids), model(ids).logits)
    s = stats(compiled)
    assert s["peak_device_bytes"] <= minimum and s["resident_layers"] == 0
    torch._dynamo.reset()
    with pytest.raises(BudgetError):
        run(compile_streaming(model, budget=minimum - 1), ids)


def test_bytes_moved_equal_what_the_schedule_says():
    model = _model("qwen2", layers=10)
    compiled = compile_streaming(model, fraction=0.5)
    ids = prompts(3, 5)
    for calls in (1, 2, 3):
        run(compiled, ids)
        s = stats(compiled)
        assert s["calls"] == calls
        assert s["weight_h2d_bytes"] == s["setup_h2d_bytes"] + calls * s["schedule_weight_bytes_per_call"]
        assert s["h2d_bytes"] == s["weight_h2d_bytes"] + s["input_h2d_bytes"]
        assert s["prefetches"] == calls * s["streamed_layers"]
    assert hscompile.inspect(compiled).compilations == 1  # re-pointing the weights forced no recompile


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tied_embeddings_stream_correctly_and_count_once(family):
    model = _model(family, layers=10)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    compiled = compile_streaming(model, fraction=0.5)
    ids = prompts(2, 7)
    with torch.no_grad():
        assert torch.equal(run(compiled, ids), model(ids).logits)
    info = hscompile.inspect(compiled)
    embedding = model.get_input_embeddings().weight
    assert info.plan.weight_bytes - sum(w.nbytes for w in info.plan.global_weights if w.kind == "buffer") == weight_bytes(model)
    assert sum(1 for w in info.plan.global_weights if w.shape == tuple(embedding.shape)) == 1


def test_bf16_streams_on_cpu():
    model = _model("llama", layers=10, dtype=torch.bfloat16)
    compiled = compile_streaming(model, fraction=0.5)
    ids = prompts(2, 7)
    with torch.no_grad():
        got, expected = run(compiled, ids), model(ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_dynamic_shapes_stream_and_a_call_too_big_for_the_budget_is_refused_before_it_runs():
    model = _model("mistral", layers=10)
    budget = int(weight_bytes(model) * 0.5)
    compiled = compile_streaming(model, budget=budget)
    for shape in [(2, 7), (3, 9), (2, 12)]:
        ids = prompts(*shape)
        with torch.no_grad():
            assert torch.equal(run(compiled, ids), model(ids).logits)
    before = stats(compiled)
    with pytest.raises(BudgetError, match="this call needs"):
        run(compiled, prompts(64, 200))
    after = stats(compiled)
    assert after["calls"] == before["calls"] and after["prefetches"] == before["prefetches"]  # nothing ran
    ids = prompts(2, 8)  # and the model still works
    with torch.no_grad():
        assert torch.equal(run(compiled, ids), model(ids).logits)


def test_inspect_shows_prefetch_wait_and_release_for_every_streamed_layer():
    model = _model("llama", layers=10)
    compiled = compile_streaming(model, fraction=0.5, prefetch_depth=2)
    run(compiled, prompts(2, 5))
    info = hscompile.inspect(compiled)
    code = info.graph.code
    for layer in info.policy.streamed_layers:
        assert f"hybridserve.prefetch_weights.default({layer}, " in code
        assert f"hybridserve.wait_weights.default({layer}, " in code
        assert f"hybridserve.release_weights.default({layer}, " in code
    text = str(info)
    assert "streamed: slot" in text and "prefetch(L+2" in text
