"""The decode step's hot path, held to its contract (DESIGN.md): loads are copies of contiguous
runs (no gather on the host), the host waits on the device once a step, attention reads the past
where it landed, and nothing that is the same for every layer is built per layer."""

from __future__ import annotations

import pytest
import torch
from models import ragged_prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile.runtime import step_plan

NEW_TOKENS = 6
LAYERS = 6


def _reference(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("minibatch", [None, 2], ids=["whole", "minibatched"])
@pytest.mark.parametrize("ahead", [False, True], ids=["in-order", "loads-ahead"])
def test_every_policy_loads_runs_waits_once_a_step_and_assembles_what_attention_reads(family, streamed, minibatch,
                                                                                         ahead):
    model = tiny_model(family, layers=LAYERS)
    ids, mask = ragged_prompts()
    expected = _reference(model, ids, mask)
    options = {"device": "cpu", "lowering": "eager", "block_size": 4}
    if streamed:
        options |= {"device_memory": int(weight_bytes(model) * 0.75), "prefetch_depth": 1}
    if minibatch:
        options["mini_batch_size"] = minibatch
    generator = hscompile.Generator(model, options)
    generator.cache.overlap_loads = ahead
    for ratio in (1.0, 0.5, 0.0):  # the first call sizes the graphs' staging: all-ACT stages the most
        before = generator.stats()
        assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, act_ratio=ratio), expected), ratio
        stats = generator.stats()
        steps = stats["cache_steps"] - before.get("cache_steps", 0)
        assert stats["host_gather_bytes"] == 0
        # One wait of the host on the device per step: its tokens.
        assert stats["host_syncs"] - before.get("host_syncs", 0) == steps
        read = stats["attention_read_bytes"] - before.get("attention_read_bytes", 0)
        assembled = stats["attention_assembly_bytes"] - before.get("attention_assembly_bytes", 0)
        assert 0 < assembled <= 1.1 * read, (assembled, read)
        # A sequence's blocks of one kind are consecutive: at most one run per kind, per sequence,
        # layer and decode step (the prefill loads nothing).
        runs = stats["load_runs"] - before.get("load_runs", 0)
        assert 0 < runs <= (steps - 1) * LAYERS * 2 * ids.shape[0]
    assert stats["host_syncs_per_step"] == 1.0
    if minibatch:
        assert stats["minibatches"] > stats["cache_steps"]  # it did run mini-batches


def test_the_mask_and_indices_of_a_step_are_built_once_not_per_layer(monkeypatch):
    model = tiny_model("qwen2", layers=4)
    ids, mask = ragged_prompts()
    expected = _reference(model, ids, mask)
    built = {"masks": 0, "plans": 0}
    make_mask, make_plan = step_plan._mask, step_plan.plan_step

    def counting_mask(*args, **kwargs):
        built["masks"] += 1
        return make_mask(*args, **kwargs)

    def counting_plan(*args, **kwargs):
        built["plans"] += 1
        return make_plan(*args, **kwargs)

    monkeypatch.setattr(step_plan, "_mask", counting_mask)
    monkeypatch.setattr(hscompile.runtime.cache, "plan_step", counting_plan)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5, "block_size": 4})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    steps = generator.stats()["cache_steps"]
    assert built["plans"] == steps  # one plan per step (one mini-batch here), whatever the depth
    assert built["masks"] == steps - 1  # every decode step's layers share one mask; the prefill has no past


def test_the_attention_buffers_are_allocated_once_per_batch():
    model = tiny_model("llama", layers=LAYERS)
    ids, mask = ragged_prompts()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.0, "block_size": 4})
    arenas = set()
    original = generator.cache.loads.prepare

    def watching(*args, **kwargs):
        original(*args, **kwargs)
        arenas.add(id(generator.cache.loads.arena.kv[0]))

    generator.cache.loads.prepare = watching
    generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert len(arenas) == 1  # every decode step and layer reused the first step's buffer


def test_stats_say_where_compilation_time_went(fresh_graph_cache):
    model = tiny_model("llama", layers=2)
    ids, mask = ragged_prompts()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager"})
    generator.generate(ids, mask, max_new_tokens=2)
    records = generator.graphs.records
    assert [r.kind for r in records] == ["prefill", "decode"]
    assert all(r.layers == 2 and r.partitions >= 3 and r.trace > 0 and r.passes > 0 for r in records)
    assert all(r.traced_layers == 1 for r in records), "dynamo traced one layer, the other is its region body"
    phases = generator.stats()["compile_seconds_by_phase"]
    assert phases["trace"] == sum(r.trace for r in records) and set(phases) == {"trace", "passes", "lowering"}
    generator.generate(ids, mask, max_new_tokens=2)  # nothing new to compile
    assert generator.graphs.records == records
