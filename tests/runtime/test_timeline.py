"""Timelines: what a compiled model did, per layer and mini-batch, recorded without changing it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from models import prompts, tiny_model
from streaming import compile_streaming, run, weight_bytes

import hscompile
from hscompile import bench, record_timeline
from hscompile.runtime.timeline import LANES, active_timeline

LAYERS = 4


def _weight_copies(generator: hscompile.Generator) -> tuple[int, int]:
    """(prefetches, streamed bytes) over every graph the generator compiled."""
    runtimes = [c.executor.runtime.weights for c in generator.compiled_graphs if c.executor is not None]
    return sum(r.prefetches for r in runtimes), sum(r.streamed_h2d_bytes for r in runtimes)


@pytest.fixture(scope="module")
def recorded():
    """A streamed generation in mini-batches of 2, run once plain and once recorded."""
    model = tiny_model("llama", layers=LAYERS)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "mini_batch_size": 2,
                                            "act_ratio": 0.5, "device_memory": int(weight_bytes(model) * 0.9)})
    ids = prompts(4, 8)
    plain = generator.generate(ids, max_new_tokens=4)
    before = _weight_copies(generator)
    with record_timeline() as timeline:
        assert active_timeline() is timeline
        traced = generator.generate(ids, max_new_tokens=4)
    after = _weight_copies(generator)
    return generator, plain, traced, timeline, (after[0] - before[0], after[1] - before[1])


def test_recording_changes_nothing_the_model_computes(recorded):
    _, plain, traced, _, _ = recorded
    assert torch.equal(plain, traced)
    assert active_timeline() is None  # nothing is recorded outside the block


def test_every_layer_of_every_minibatch_computes_on_the_compute_lane(recorded):
    _, _, _, timeline, _ = recorded
    spans = timeline.spans()
    calls = [s for s in spans if s.lane == "calls"]
    assert [c.label for c in calls] == ["prefill (2 mini-batches)"] + ["decode (2 mini-batches)"] * 3
    for call in calls:
        inside = [s for s in spans if s.lane == "compute" and call.start_ms <= s.start_ms and s.end_ms <= call.end_ms]
        seen = Counter((s.args["layer"], s.args["kind"], s.args["minibatch"]) for s in inside if s.args["layer"] is not None)
        for layer in range(LAYERS):
            for minibatch in (0, 1):
                for kind in ("attn_in", "attention", "attn_out"):
                    assert seen[layer, kind, minibatch] == 1, (call.label, layer, kind, minibatch)
        # a layer serves both mini-batches before the next layer starts
        order = [(s.args["layer"], s.args["minibatch"]) for s in inside if s.args["kind"] == "attn_in"]
        assert order == [(layer, mb) for layer in range(LAYERS) for mb in (0, 1)]
    host = {s.args["kind"] for s in spans if s.lane == "host"}
    assert {"load_kv", "load_act", "store"} <= host


def test_weight_copies_on_the_timeline_are_the_runtime_copies(recorded):
    _, _, _, timeline, (prefetches, streamed) = recorded
    copies = [s for s in timeline.spans() if s.lane == "copy: weights"]
    assert prefetches > 0 and len(copies) == prefetches
    assert sum(s.args["bytes"] for s in copies) == streamed
    assert all(s.label.startswith("weights L") for s in copies)


def test_spans_are_well_formed_and_export_as_a_chrome_trace(recorded, tmp_path):
    _, _, _, timeline, _ = recorded
    spans = timeline.spans()
    assert spans[0].start_ms == 0 and all(s.end_ms >= s.start_ms for s in spans)
    assert [s.start_ms for s in spans] == sorted(s.start_ms for s in spans)
    assert {s.lane for s in spans} <= set(LANES)
    path = tmp_path / "timeline.json"
    timeline.write(path)
    events = json.loads(path.read_text())["traceEvents"]
    threads = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert set(threads) == {s.lane for s in spans}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(spans)
    assert Counter(e["tid"] for e in complete) == Counter(threads[s.lane] for s in spans)


def test_a_whole_batch_records_steps_without_minibatches():
    model = tiny_model("opt", layers=2)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.0})
    ids = prompts(3, 6)
    plain = generator.generate(ids, max_new_tokens=3)
    with record_timeline() as timeline:
        traced = generator.generate(ids, max_new_tokens=3)
    assert torch.equal(plain, traced)
    compute = [s for s in timeline.spans() if s.lane == "compute"]
    assert compute and all("minibatch" not in s.args for s in compute)
    assert {s.args["layer"] for s in compute if s.args["kind"] == "attn_out"} == {0, 1}
    assert [s.label for s in timeline.spans() if s.lane == "calls"] == ["prefill", "decode", "decode"]


def test_a_plain_forward_is_recorded_as_calls():
    model = tiny_model("qwen2", layers=6, use_cache=False)
    compiled = compile_streaming(model, fraction=0.7)
    ids = prompts(2, 5)
    expected = run(compiled, ids)
    with record_timeline() as timeline:
        got = run(compiled, ids)
    assert torch.equal(expected, got)
    spans = timeline.spans()
    assert [s.label for s in spans if s.lane == "calls"] == ["call 1"]
    assert {s.args["layer"] for s in spans if s.lane == "compute" and s.args["kind"] == "attn_in"} == set(range(6))
    assert any(s.lane == "copy: weights" for s in spans)


def test_a_timeline_plots_its_last_call(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, _, timeline, _ = recorded
    path = tmp_path / "timeline.png"
    bench.plot_timeline(timeline.spans(), path, title="tiny llama")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no call of a compiled model"):
        bench.plot_timeline([], tmp_path / "empty.png", title="nothing")
