from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hscompile.planner.cost_model import (
    Choice,
    ModelDims,
    choose,
    device_memory,
    generation_seconds,
    minibatch_counts,
    simulate_step,
)
from hscompile.planner.hardware import load_profile

A100 = load_profile("a100-40gb-pcie4")
H100 = load_profile("h100-pcie5")


def _dims(layers=40, hidden=5120, heads=40, kv_heads=40, ffn=4, vocab=50272):
    head_dim = hidden // heads
    layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 2 * hidden * ffn * hidden
    return ModelDims(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype="float16",
                     layer_weight_bytes=layer * 2, global_weight_bytes=vocab * hidden * 2, layer_matmul_params=layer,
                     recompute_matmul_params=2 * hidden * kv_heads * head_dim, head_matmul_params=vocab * hidden)


def test_weights_that_stream_cost_link_time_that_work_can_hide():
    dims = _dims()
    # Little work per layer (one sequence, short past): the copies are exposed.
    resident = simulate_step(dims, Choice(40, 1, 0.0), A100, batch=1, new=1, past=16)
    streamed = simulate_step(dims, Choice(10, 1, 0.0), A100, batch=1, new=1, past=16)
    assert resident.exposed_link < 0.01 * streamed.exposed_link and streamed.exposed_link > 0.5 * streamed.weight_link
    assert streamed.weight_link == pytest.approx(30 * dims.layer_weight_bytes / A100.h2d_bytes_per_s)
    # Much compute per layer (a prefill of a big batch): the same copies hide behind it.
    busy = simulate_step(dims, Choice(10, 1, 0.0), A100, batch=32, new=512, past=0)
    assert busy.exposed_link < 0.05 * busy.weight_link


def test_a_faster_link_is_never_slower():
    dims = _dims()
    for choice in (Choice(10, 1, 0.0), Choice(10, 1, 1.0)):
        slow = simulate_step(dims, choice, A100, batch=32, new=1, past=1024)
        fast = simulate_step(dims, choice, H100, batch=32, new=1, past=1024)
        assert fast.seconds < slow.seconds


def test_checkpoints_halve_mha_cache_bytes_and_the_search_uses_them_when_the_link_binds():
    dims = _dims()  # MHA: a checkpoint is half the bytes of K/V
    decision = choose(dims, A100, batch=64, prompt=512, new_tokens=32, device_budget=20 * 2**30)
    assert decision.best.choice.act_ratio > 0
    # What all-KV would be bound by, with as many mini-batches: the link (its cache loads are exposed).
    # (Its placement may hold more resident layers: it stages only K/V, so more weights fit beside it.)
    best = decision.best.choice
    all_kv = next(p for p in decision.considered
                  if (p.choice.act_ratio, p.choice.minibatches, p.choice.prefetch_depth) == (0.0, best.minibatches,
                                                                                              best.prefetch_depth))
    assert all_kv.decode.bound == "link"
    assert all_kv.seconds > decision.best.seconds


def test_gqa_never_chooses_checkpoints_for_bandwidth():
    dims = _dims(layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256)  # Llama-3-8B: K+V is half the hidden state
    assert not dims.checkpoints_save_bytes
    decision = choose(dims, A100, batch=64, prompt=512, new_tokens=32, device_budget=12 * 2**30)
    assert {p.choice.act_ratio for p in decision.considered} == {0.0}
    assert "not smaller than K/V" in decision.reason


def test_predicted_throughput_grows_with_batch_while_weights_dominate():
    dims = _dims()
    per_token = []
    for batch in (1, 8, 64):
        total, _, _ = generation_seconds(dims, Choice(10, 1, 0.0), H100, batch=batch, prompt=128, new_tokens=16)
        per_token.append(total / (batch * 16))
    assert per_token[0] > per_token[1] > per_token[2]


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(2, 48),
    hidden=st.sampled_from([256, 1024, 2048, 4096]),
    kv_ratio=st.sampled_from([1, 2, 4, 8]),
    batch=st.integers(1, 64),
    prompt=st.integers(8, 1024),
    new=st.integers(2, 64),
    budget_fraction=st.floats(0.05, 2.0),
)
def test_the_search_respects_the_device_budget_or_says_nothing_fits(layers, hidden, kv_ratio, batch, prompt, new,
                                                                     budget_fraction):
    heads = hidden // 64
    dims = _dims(layers=layers, hidden=hidden, heads=heads, kv_heads=max(heads // kv_ratio, 1), vocab=32000)
    weights = dims.global_weight_bytes + layers * dims.layer_weight_bytes
    budget = int(weights * budget_fraction)
    try:
        decision = choose(dims, A100, batch=batch, prompt=prompt, new_tokens=new, device_budget=budget)
    except ValueError:
        smallest = min(device_memory(dims, Choice(0, 1, 0.0, count), batch=batch, context=prompt + new, activations=0,
                                     overlap=A100.copies_overlap).total for count in minibatch_counts(batch))
        assert smallest > budget
        return
    for prediction in decision.considered:
        assert prediction.device_bytes <= budget
        assert prediction.seconds > 0 and prediction.tokens_per_s > 0
    assert decision.best.seconds <= 1.01 * min(p.seconds for p in decision.considered)


def test_weights_cross_the_link_once_per_step_whatever_the_minibatches():
    dims = _dims()
    steps = [simulate_step(dims, Choice(10, 1, 0.5, m), A100, batch=64, new=1, past=512) for m in (1, 2, 4)]
    assert len({s.weight_link for s in steps}) == 1
    # Without a copy engine (the CPU), splitting only adds per-call costs.
    cpu = replace(A100, copies_overlap=False)
    serial = [simulate_step(dims, Choice(10, 1, 0.5, m), cpu, batch=64, new=1, past=512).seconds for m in (1, 2, 4)]
    assert serial[0] < serial[1] < serial[2]


def test_a_tight_budget_is_met_with_smaller_minibatches():
    dims = _dims()
    # 64 sequences of 2080 tokens fill an attention buffer of 2.5 GiB, two with loads issued
    # ahead; with the global weights and the ring that is 7.3 GiB: under 7 GiB only smaller
    # mini-batches fit.
    budget = 7 * 2**30
    decision = choose(dims, A100, batch=64, prompt=2048, new_tokens=32, device_budget=budget)
    best = decision.best.choice
    assert best.minibatches > 1 and "would not fit" in decision.reason
    whole = device_memory(dims, replace(best, minibatches=1, act_ratio=0.0), batch=64, context=2080, activations=0,
                          overlap=A100.copies_overlap).total
    assert whole > budget >= decision.best.device_bytes


def test_layers_on_disk_bind_a_small_batch_and_hide_behind_a_large_one():
    dims = _dims()
    slow_disk = replace(A100, disk_bytes_per_s=2e9)
    on_host = simulate_step(dims, Choice(10, 1, 0.0), slow_disk, batch=1, new=1, past=16)
    on_disk = simulate_step(dims, Choice(10, 1, 0.0, disk_layers=20), slow_disk, batch=1, new=1, past=16)
    # Twenty layers read at 2 GB/s, one reader: the step is at least those reads, and the disk binds it.
    reads = 20 * dims.layer_weight_bytes / 2e9
    assert on_disk.disk == pytest.approx(reads) and on_disk.seconds >= reads > on_host.seconds
    assert on_disk.bound == "disk" and on_host.exposed_disk == 0.0
    # A faster disk is never slower; a prefill of a big batch hides the same reads behind its compute.
    faster = simulate_step(dims, Choice(10, 1, 0.0, disk_layers=20), replace(slow_disk, disk_bytes_per_s=8e9),
                           batch=1, new=1, past=16)
    assert faster.seconds < on_disk.seconds
    busy = simulate_step(dims, Choice(10, 1, 0.0, disk_layers=20), slow_disk, batch=256, new=512, past=0)
    assert busy.exposed_disk < 0.05 * busy.disk
    # Resident layers are never read: layers on disk that the device holds cost nothing per step.
    assert simulate_step(dims, Choice(40, 1, 0.0, disk_layers=20), slow_disk, batch=1, new=1, past=16).disk == 0.0


def test_the_search_weighs_the_layers_on_disk():
    dims = replace(_dims(), disk_layers=30)
    # A device budget for a third of the layers: the rest stream, and those on disk are read every step.
    decision = choose(dims, replace(A100, disk_bytes_per_s=2e9), batch=1, prompt=16, new_tokens=8,
                      device_budget=dims.global_weight_bytes + 14 * dims.layer_weight_bytes)
    assert all(p.choice.disk_layers == 30 for p in decision.considered)
    assert decision.best.decode.bound == "disk"
