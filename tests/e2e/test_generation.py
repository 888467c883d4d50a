"""Generation over the hybrid KV/ACT cache: token-for-token parity with transformers' generate."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, GQA_FAMILIES, VOCAB, prompts, ragged_prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile.errors import BudgetError, UnsupportedModelError

RATIOS = [0.0, 0.25, 0.5, 1.0]
NEW_TOKENS = 10


def _batch(family_seed: int = 1):
    """Three prompts of different lengths, left-padded."""
    ids = prompts(3, 9, seed=family_seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _model(family, layers=6):
    return tiny_model(family, layers=layers)


def _reference(model, ids, mask, new=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(family):
        if family not in cache:
            model = _model(family)
            ids, mask = _batch()
            cache[family] = (model, ids, mask, _reference(model, ids, mask))
        return cache[family]

    return get


@pytest.mark.parametrize("streaming", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_for_every_act_ratio(references, family, streaming):
    model, ids, mask, expected = references(family)
    options = {"device": "cpu", "lowering": "eager", "block_size": 4}
    if streaming:
        options |= {"device_memory": int(weight_bytes(model) * 0.75), "prefetch_depth": 1}
    generator = hscompile.Generator(model, options)
    # The largest ratio first: the graphs are placed for the first call's cache staging, and a later
    # call that needs more is refused with a BudgetError (on an asynchronous device, loads issued
    # ahead double the staging, and this budget has no room for more than the first call's).
    for ratio in sorted(RATIOS, reverse=True):
        out = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, act_ratio=ratio)
        assert torch.equal(out, expected), f"act_ratio={ratio}"
        stats = generator.stats()
        assert stats["act_ratio"] == ratio
    stats = generator.stats()
    if streaming:
        assert stats["streamed_layers"] > 0 and stats["peak_device_bytes"] <= stats["device_budget"]
    assert stats["graphs"] == 2  # one prefill graph, one decode graph, reused by every call and ratio


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_generate_on_a_model_compiled_in_place_uses_the_hybrid_cache(references, family):
    _, ids, mask, expected = references(family)
    model = _model(family)  # a fresh instance: the compiled one is changed in place
    model.compile(backend="hybridserve", options={"device": "cpu", "lowering": "eager", "act_ratio": 0.5, "block_size": 4})
    with torch.no_grad():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    stats = hscompile.inspect(model).stats
    assert stats["act_tokens"] > 0 and stats["kv_tokens"] > 0 and stats["recomputed_tokens"] > 0


@pytest.mark.inductor
def test_inductor_generation_with_streaming_and_checkpoints(references):
    model, ids, mask, expected = references("llama")
    generator = hscompile.Generator(
        model, {"device": "cpu", "act_ratio": 0.5, "block_size": 4, "device_memory": int(weight_bytes(model) * 0.6)}
    )
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert generator.stats()["lowering"] == "inductor"


def _five_prompts():
    return ragged_prompts()


@pytest.mark.parametrize("family", FAMILIES)
def test_minibatches_keep_parity_and_each_layers_weights_serve_them_all(family):
    model = _model(family, layers=4)
    ids, mask = _five_prompts()
    expected = _reference(model, ids, mask)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "mini_batch_size": 2,
                                            "device_memory": int(weight_bytes(model) * 0.9), "prefetch_depth": 1})
    for ratio in (1.0, 0.5, 0.0):  # the first call sizes the budget's staging: all-ACT stages the most
        assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, act_ratio=ratio), expected), ratio
    stats = generator.stats()
    assert stats["minibatch_size"] == 2 and stats["minibatch_split"] == "yes"
    assert stats["minibatches"] == 2 * stats["cache_steps"]  # 5 sequences: mini-batches of 3 and 2 rows
    # The call's one plan says 2 (not ceil(5 / 2) = 3), and the placement's prediction simulates what ran.
    assert generator.plan.minibatches == 2
    assert {c.policy.minibatches for c in generator.compiled_graphs} == {2}
    # Streamed weights cross the link once per layer per step, whatever the number of mini-batches.
    assert stats["streamed_layers"] > 0
    assert stats["prefetches"] == stats["calls"] * stats["streamed_layers"]
    assert stats["peak_device_bytes"] <= stats["device_budget"]


def test_loads_issued_ahead_give_the_same_tokens_and_bytes():
    model = _model("opt", layers=3)
    ids, mask = _five_prompts()
    runs = []
    for ahead in (False, True):
        generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4,
                                                "mini_batch_size": 2, "act_ratio": 0.5})
        generator.cache.overlap_loads = ahead  # the CUDA order of loads, with synchronous copies
        runs.append((generator.generate(ids, mask, max_new_tokens=6), generator.stats()))
    (a, first), (b, second) = runs
    assert torch.equal(a, b)
    assert first["cache_h2d_bytes"] == second["cache_h2d_bytes"] > 0
    assert first["recomputed_tokens"] == second["recomputed_tokens"] > 0


@pytest.mark.inductor
def test_inductor_partitions_run_on_every_minibatch_size():
    model = _model("llama", layers=3)
    ids, mask = _five_prompts()
    expected = _reference(model, ids, mask, new=5)
    generator = hscompile.Generator(model, {"device": "cpu", "act_ratio": 0.5, "block_size": 4, "mini_batch_size": 2})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=5), expected)
    assert generator.stats()["minibatches"] == 2 * generator.stats()["cache_steps"]


def test_the_rewritten_graph_shows_load_recompute_attend_store_per_layer():
    model = _model("llama", layers=3)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
    ids, mask = _batch()
    generator.generate(ids, mask, max_new_tokens=3)
    decode = generator.compiled_graphs[-1]
    info = hscompile.inspect(decode)
    targets = [str(n.target) for n in info.graph.graph.nodes if n.op == "call_function"]
    for op in ("load_kv", "load_act", "recompute_kv", "cache_attention", "store_cache"):
        assert sum(op in t for t in targets) == 3, op
    assert "load_kv -> load_act -> recompute -> attention -> store" in str(info)
    assert info.policy.act_ratio == 0.5


def test_stats_count_tokens_recomputation_and_bytes():
    model = _model("opt", layers=4)
    ids, mask = _batch()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4})
    generator.generate(ids, mask, max_new_tokens=5, act_ratio=1.0)
    stats = generator.stats()
    stored = int(mask.sum()) + 3 * 4  # prompt tokens, then 4 decode steps store their input token
    assert stats["act_tokens"] == stored and stats["kv_tokens"] == 0
    assert stats["recomputed_tokens"] > 0 and stats["cache_h2d_bytes"] > 0 and stats["cache_d2h_bytes"] > 0
    before = stats
    generator.generate(ids, mask, max_new_tokens=5, act_ratio=0.0)
    after = generator.stats()
    assert after["kv_tokens"] == stored and after["act_tokens"] == before["act_tokens"]
    assert after["recomputed_tokens"] == before["recomputed_tokens"]  # nothing to recompute with KV only


def _decode_bytes_per_step(family, ratio):
    model = tiny_model(family, layers=2, hidden=64, heads=4, kv_heads=1)
    ids = prompts(2, 16)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 16})
    generator.generate(ids, max_new_tokens=2, act_ratio=ratio)  # prefill, then one decode step over 16 past tokens
    return generator.stats()["cache_h2d_bytes"]


def test_checkpoints_halve_the_bytes_of_an_mha_model_but_not_of_gqa():
    # A decode step loads every past token of every layer once, as K/V or as a checkpoint.
    assert _decode_bytes_per_step("opt", 1.0) * 2 == _decode_bytes_per_step("opt", 0.0)  # MHA: hidden vs 2*hidden
    # Llama-style 4:1 GQA with 64 hidden: K/V is 2*1*16 = 32 values, a checkpoint 64: twice the bytes.
    assert _decode_bytes_per_step("llama", 1.0) == 2 * _decode_bytes_per_step("llama", 0.0)


def test_sampling_with_a_seed_is_reproducible():
    model = _model("qwen2", layers=3)
    ids, mask = _batch()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager"})
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = generator.generate(ids, mask, seed=7, **kwargs)
    b = generator.generate(ids, mask, seed=7, **kwargs)
    c = generator.generate(ids, mask, seed=8, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :9], ids)


def test_each_sequence_stops_at_its_eos_and_is_padded_after(references):
    model, ids, mask, expected = references("gpt2")
    eos = int(expected[0, 9 + 2])  # the third token row 0 generates
    model.generation_config.eos_token_id = eos
    try:
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out = hscompile.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                 options={"device": "cpu", "lowering": "eager"})
    finally:
        model.generation_config.eos_token_id = 2
    assert torch.equal(out, reference)
    generated = out[0, 9:]
    stop = int((generated == eos).nonzero()[0])  # the first end-of-sequence token of row 0
    assert stop <= 2 and bool((generated[stop + 1:] == 0).all())


def test_a_host_budget_for_one_sequence_at_a_time_gives_the_same_tokens(references):
    model, ids, mask, expected = references("mistral")
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5})
    # Its pools as allocated: pinned ones (CUDA, the simulated device) round up to a power of two each.
    blocks = generator.spec.blocks_for(0.5, int(mask.sum(1).max()) + NEW_TOKENS)
    per_sequence = generator.spec.pool_bytes(*blocks, pinned=generator.cache.backend.pins_host)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5,
                                            "host_memory": per_sequence, "disk_cache": "off"})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1"),
        ({"max_new_tokens": 250}, ValueError, "exceeds the model's maximum positions"),
        ({"max_new_tokens": 2, "attention_mask": torch.ones(3, 5, dtype=torch.long)}, ValueError, "shape of input_ids"),
        ({"max_new_tokens": 2, "right_padded": True}, ValueError, "not left-padded"),
        ({"max_new_tokens": 2, "do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
        ({"max_new_tokens": 2, "do_sample": True, "top_p": 1.5}, ValueError, "top_p"),
        ({"max_new_tokens": 2, "host_memory": 64}, BudgetError, "cannot hold even one sequence"),
        ({"max_new_tokens": 2, "available": 1024}, BudgetError,
         (r"the 1.00 KiB \(1024 bytes\) of host memory available on this machine cannot hold even one sequence: "
          r"sequence 0 needs 1 blocks of 16 tokens")),
        ({"max_new_tokens": 2, "ids": "vocabulary"}, ValueError,
         r"input_ids\[1, 3\] = 128 is not a token id of this model: its vocabulary has 128 ids \(0 to 127\)"),
        ({"max_new_tokens": 2, "ids": "negative"}, ValueError, r"input_ids\[0, 0\] = -1 is not a token id"),
        ({"max_new_tokens": 2, "ids": "float"}, ValueError, r"2-D integer tensor .*got a 2-D torch.float32 tensor"),
        ({"max_new_tokens": 2, "act_ratio": 1.5}, ValueError, "act_ratio: got 1.5; expected a float in \\[0, 1\\] or 'auto'"),
        ({"max_new_tokens": 2, "do_sample": True, "seed": "abc"}, ValueError, "seed must be an int or a list"),
        ({"max_new_tokens": 2, "do_sample": True, "seed": [1, 2]}, ValueError,
         r"seed must be an int or a list of 3 ints \(one per sequence\), got \[1, 2\]"),
        ({"max_new_tokens": 2, "do_sample": True, "top_k": -1}, ValueError,
         r"top_k must be an int >= 0 \(0: no limit\) or None, got -1"),
        ({"max_new_tokens": 2, "n": 0}, ValueError, "n must be an int >= 1, got 0"),
        ({"max_new_tokens": 2, "logprobs": -1}, ValueError, r"logprobs must be an int >= 0 .*got -1"),
        ({"max_new_tokens": 2, "min_p": 2}, ValueError, r"min_p must be in \[0, 1\] or None, got 2"),
        ({"max_new_tokens": 2, "repetition_penalty": -1.0}, ValueError,
         r"repetition_penalty must be a number > 0 \(1: none\) or None, got -1.0"),
        ({"max_new_tokens": 2, "presence_penalty": 2.5}, ValueError, r"presence_penalty must be in \[-2, 2\] or None"),
        ({"max_new_tokens": 2, "stop": 3}, ValueError, "stop must be a string or a list of non-empty strings, got 3"),
        ({"max_new_tokens": 2, "do_sample": False, "temperature": 0.7}, ValueError,
         r"temperature must be 0 or None with do_sample=False \(greedy\), got 0.7"),
        ({"max_new_tokens": 2, "top_q": 0.5}, TypeError, r"unknown sampling parameter\(s\) 'top_q'; valid: do_sample, "),
        ({"max_new_tokens": 2, "ids": "empty"}, ValueError, r"input_ids is empty: shape \(3, 0\)"),
        ({"max_new_tokens": 2, "attention_mask": torch.full((3, 9), 2)}, ValueError,
         r"attention_mask must hold only 0 \(padding\) and 1 \(tokens\)"),
        ({"max_new_tokens": 2, "attention_mask": torch.zeros(3, 9, dtype=torch.long)}, ValueError,
         r"sequence 0 of the batch has no tokens \(its mask is all 0\)"),
    ],
)
def test_bad_input_is_refused_before_any_work(kwargs, error, message, monkeypatch):
    model = _model("llama", layers=2)
    ids, mask = _batch()
    options = {"device": "cpu", "lowering": "eager"}
    if "host_memory" in kwargs:
        options["host_memory"] = kwargs.pop("host_memory")
    if "host_memory" in options or "available" in kwargs:
        options["disk_cache"] = "off"  # else the blocks host memory cannot hold would go to disk
    if "available" in kwargs:  # no host_memory option: what this machine has available bounds one sequence
        available = kwargs.pop("available")
        monkeypatch.setattr("hscompile.planner.budget.host_memory_available", lambda: available)
    if kwargs.pop("right_padded", False):
        mask = mask.flip(1)
    mask = kwargs.pop("attention_mask", mask)
    bad_ids = kwargs.pop("ids", None)
    if bad_ids == "vocabulary":
        ids = ids.clone()
        ids[1, 3] = VOCAB
    elif bad_ids == "negative":
        ids = ids.clone()
        ids[0, 0] = -1
    elif bad_ids == "float":
        ids = ids.float()
    elif bad_ids == "empty":
        ids = ids[:, :0]
    generator = hscompile.Generator(model, options)
    with pytest.raises(error, match=message):
        generator.generate(ids, mask, **kwargs)
    assert generator.compiled_graphs == []  # nothing was compiled or run


def test_a_prompt_longer_than_the_positions_is_refused():
    model = tiny_model("gpt2", layers=2)
    with pytest.raises(ValueError, match="more than the model's maximum positions"):
        hscompile.generate(model, prompts(1, 300), max_new_tokens=1, options={"device": "cpu", "lowering": "eager"})


def test_generating_past_a_sliding_window_is_refused():
    model = tiny_model("mistral", layers=2, sliding_window=12)
    with pytest.raises(UnsupportedModelError, match="sliding window of 12"):
        hscompile.generate(model, prompts(1, 8), max_new_tokens=8, options={"device": "cpu", "lowering": "eager"})


def test_the_window_that_applies_is_read_per_layer_where_the_config_says_so():
    import transformers

    from hscompile.generation.validation import sliding_window

    assert sliding_window(transformers.MistralConfig(sliding_window=12)) == 12  # no layer_types: the field
    assert sliding_window(transformers.MistralConfig(sliding_window=None)) is None
    # Qwen2-MoE: sliding_window=0, use_sliding_window=False, every layer full attention.
    assert sliding_window(transformers.AutoConfig.for_model("qwen2_moe")) is None
    assert sliding_window(transformers.Qwen2Config(sliding_window=12, use_sliding_window=False)) is None
    both = transformers.Qwen2Config(sliding_window=12, use_sliding_window=True, max_window_layers=1,
                                    num_hidden_layers=2)
    assert both.layer_types == ["full_attention", "sliding_attention"] and sliding_window(both) == 12


@pytest.mark.parametrize("family", GQA_FAMILIES[:1])
def test_generate_reuses_one_generator_per_model_and_options(family):
    model = _model(family, layers=2)
    ids, mask = _batch()
    options = {"device": "cpu", "lowering": "eager"}
    a = hscompile.generate(model, ids, attention_mask=mask, max_new_tokens=3, options=options)
    b = hscompile.generate(model, ids, attention_mask=mask, max_new_tokens=3, options=dict(options))
    assert torch.equal(a, b)
    assert hscompile.inspect(model).compilations == 2  # prefill + decode, compiled once


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_auto_ratio_is_the_cost_models_choice_and_keeps_parity(references, family):
    model, ids, mask, expected = references(family)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    decision = generator.plan.decision
    assert decision is not None and generator.stats()["act_ratio"] == decision.best.choice.act_ratio
    assert decision.best.seconds == min(p.seconds for p in decision.considered)
    if family in GQA_FAMILIES:  # 64 hidden vs 2 * 2 * 16 K/V values: checkpoints are never cheaper
        assert {p.choice.act_ratio for p in decision.considered} == {0.0}
    policy = generator.compiled_graphs[-1].policy
    assert policy.predicted is not None and "predicted longest decode step" in policy.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_the_searchs_activation_floor_is_below_the_placements_estimate(family):
    # The search is told a floor (it must not refuse what fits); the placement checks its own,
    # graph-derived figure. The floor should still be most of it.
    from hscompile.planner.cost_model import ModelDims

    model = tiny_model(family, layers=3, hidden=128, heads=4)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.0})
    generator.generate(prompts(8, 32), max_new_tokens=2)
    prefill = generator.compiled_graphs[0].executor.runtime.last_activation_bytes
    floor = ModelDims.from_model(model).prefill_activation_bytes(8, 32)
    assert prefill / 2 <= floor <= prefill


def test_auto_under_a_tight_budget_counts_activations_and_splits_the_batch():
    # At 0.75x the weights one whole-batch step does not fit (prefill activations + cache
    # staging); the search, told the prefill's activations, takes mini-batches instead, and the
    # placement accepts them. Searching as if activations were free picked one mini-batch and was refused.
    model = tiny_model("llama", layers=6, hidden=128, heads=4, kv_heads=4)
    ids = prompts(8, 32)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager",
                                            "device_memory": int(weight_bytes(model) * 0.75)})
    got = generator.generate(ids, max_new_tokens=3)
    assert generator.plan.minibatch_rows is not None and generator.plan.minibatch_rows < 8
    assert generator.plan.decision.best.choice.minibatches > 1
    assert torch.equal(got, _reference(model, ids, torch.ones_like(ids), new=3))


def test_many_generators_of_one_model_class_do_not_hit_dynamos_recompile_limit():
    # Each generator adds a prefill and a decode graph to LlamaForCausalLM's code: six of them
    # are more graphs than dynamo's default limit of 8 allows for one function.
    ids, mask = _batch()
    for seed in range(6):
        model = tiny_model("llama", layers=2, seed=seed)
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        out = hscompile.Generator(model, {"device": "cpu", "lowering": "eager"}).generate(ids, mask, max_new_tokens=3)
        assert torch.equal(out, expected)


def test_any_integer_dtype_of_ids_and_a_per_call_auto_ratio_are_accepted(references):
    model, ids, mask, expected = references("llama")
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
    assert torch.equal(generator.generate(ids.to(torch.int16), mask, max_new_tokens=NEW_TOKENS, act_ratio="auto"),
                       expected)
    assert torch.equal(generator.generate(ids.to(torch.int8), mask, max_new_tokens=NEW_TOKENS), expected)  # ids < 128
    assert generator.plan.decision is not None  # the cost model chose this call's ratio


def test_generating_leaves_the_model_in_the_mode_it_was_in():
    model = _model("llama", layers=2)
    model.train()
    model.model.layers[1].eval()
    ids, mask = _batch()
    hscompile.generate(model, ids, attention_mask=mask, max_new_tokens=2, options={"device": "cpu", "lowering": "eager"})
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training


def test_a_model_whose_weights_are_not_loaded_is_refused():
    with torch.device("meta"):
        model = tiny_model("llama", layers=2)
    with pytest.raises(UnsupportedModelError, match=r"weights are not loaded: parameter 'model.embed_tokens.weight' "
                                                    r"is on the meta device"):
        hscompile.Generator(model, {"device": "cpu"})
