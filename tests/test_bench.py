"""The benchmark harness and the bench command, on tiny models (figures live in BENCHMARKS.md; the generate
command is tested in test_generate_cli.py)."""

from __future__ import annotations

import json

import pytest
from models import tiny_config, tiny_model
from streaming import weight_bytes

from hscompile import bench
from hscompile.cli import main
from hscompile.planner.hardware import tune


@pytest.fixture(scope="module")
def profile():
    return tune("cpu", quick=True)


def test_every_policy_is_measured_or_says_why_not(profile):
    model = tiny_model("opt", layers=4)
    workload = bench.Workload(batch=2, prompt=8, new_tokens=5)
    options = {"device": "cpu", "lowering": "eager", "device_memory": int(weight_bytes(model) * 0.8)}
    results = {r.policy: r for r in bench.run(model, workload, options=options, profile=profile)}
    assert list(results) == list(bench.POLICIES)
    for policy in ("auto", "all-kv", "all-act", "resident", "transformers", "token-recompute"):
        r = results[policy]
        assert r.ran and r.tokens_per_s > 0 and r.decode_step_ms >= 0, (policy, r.note)
    streamed = results["all-kv"]
    # a decode step moves the streamed layers' weights and the past tokens' K/V over the link
    assert streamed.link_bytes_per_step > 0 and streamed.peak_device_bytes <= options["device_memory"]
    assert results["resident"].link_bytes_per_step < streamed.link_bytes_per_step
    assert streamed.predicted_tokens_per_s > 0 and "act_ratio 0.00" in streamed.note
    assert "act_ratio 1.00" in results["all-act"].note
    assert not results["accelerate"].ran and "CUDA" in results["accelerate"].note
    versus = bench.ratios(list(results.values()), "all-kv")
    assert versus["all-kv"] == 1.0


def test_quantized_policies_run_on_request_and_move_fewer_bytes_a_step(profile):
    model = tiny_model("llama", layers=4, hidden=128)
    workload = bench.Workload(batch=2, prompt=8, new_tokens=4)
    options = {"device": "cpu", "lowering": "eager", "device_memory": int(weight_bytes(model) * 0.6),
               "quant_group_size": 32}
    policies = ("all-kv", *bench.QUANTIZED_POLICIES)
    results = {r.policy: r for r in bench.run(model, workload, options=options, profile=profile, policies=policies)}
    assert all(r.ran for r in results.values()), {p: r.note for p, r in results.items()}
    # Quantized layers stream less (here they all fit beside the budget: nothing streams), and int8
    # cache blocks move about half the cache bytes.
    assert results["int4-weights"].link_bytes_per_step <= results["int8-weights"].link_bytes_per_step
    assert results["int8-weights"].link_bytes_per_step < results["all-kv"].link_bytes_per_step
    assert results["int4-int8-cache"].link_bytes_per_step < results["int4-weights"].link_bytes_per_step


@pytest.mark.parametrize("new_tokens", [1, 2])
def test_a_workload_of_one_or_two_new_tokens_is_measured(profile, new_tokens):
    # No shorter run to subtract: the bytes a step moves are the whole run's (it used to index past the runs).
    model = tiny_model("llama", layers=2)
    results = bench.run(model, bench.Workload(2, 6, new_tokens), options={"device": "cpu", "lowering": "eager"},
                        profile=profile, policies=["all-kv"])
    assert results[0].ran and results[0].tokens_per_s > 0, results[0].note
    # With two new tokens the one decode step loads the prompt's K/V; with one there is no decode step.
    assert (results[0].link_bytes_per_step > 0) == (new_tokens == 2)


def test_unknown_policies_and_empty_workloads_are_refused(profile):
    model = tiny_model("opt", layers=2)
    with pytest.raises(ValueError, match=r"unknown benchmark policies.*valid"):
        bench.run(model, bench.Workload(1, 4, 2), options={"device": "cpu"}, profile=profile, policies=["flexgen"])
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        bench.run(model, bench.Workload(1, 4, 0), options={"device": "cpu"}, profile=profile, policies=["auto"])


def test_bench_command_writes_a_table_json_a_timeline_and_a_profile(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama", layers=3).to_json_string())
    out, trace, profile = tmp_path / "bench.json", tmp_path / "trace.json", tmp_path / "profile.json"
    code = main(["bench", str(config), "--device", "cpu", "--lowering", "eager", "--batch", "2", "--prompt", "6",
                 "--new-tokens", "4", "--device-memory", "480KiB",
                 "--policy", "auto", "--policy", "all-kv", "--policy", "transformers",
                 "--json", str(out), "--trace", str(trace), "--profile", str(profile)])
    assert code == 0
    text = capsys.readouterr().out
    assert "prompt 6, 4 new tokens" in text and f"wrote {out}" in text.replace("\n", "")
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == ["auto", "all-kv", "transformers"]
    assert report["auto_vs"]["all-kv"] > 0 and report["auto_vs"]["transformers"] > 0
    # hscompile's timeline: lanes per layer, weights streamed under this budget
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"calls", "compute", "copy: weights", "host"} <= lanes
    labels = {e["name"] for e in events if e["ph"] == "X"}
    assert {"prefill", "decode", "L2 attention", "L0 load_kv"} <= labels
    # torch.profiler's: the hybridserve ops themselves
    names = {e.get("name", "") for e in json.loads(profile.read_text())["traceEvents"]}
    assert any("hybridserve::load_kv" in n for n in names) and any("hybridserve::cache_attention" in n for n in names)


def test_bench_command_draws_the_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    config = tmp_path / "config.json"
    config.write_text(tiny_config("opt", layers=4).to_json_string())
    assert main(["bench", str(config), "--device", "cpu", "--lowering", "eager", "--batch", "2", "--prompt", "4",
                 "--new-tokens", "3", "--device-memory", "600KiB", "--policy", "auto", "--timeline", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in capsys.readouterr().out.replace("\n", "")
