"""A property: for any drawn decoder, ragged batch and options, greedy tokens equal transformers'.

The cases and the run of one are in ``tests/fuzzing.py`` (shared with ``benchmarks/fuzz.py``, which
``make fuzz N=500`` runs for many more cases and a report). Here a bounded number of derandomized
examples runs in the suite: the same cases every run. A budget the library refuses with its
documented ``BudgetError`` is an answer, not a failure; a mismatch, a broken promise (device bytes
above the budget, blocks held after the call) or any other exception fails, with the line that
replays the case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
from fuzzing import ASYNC_SIM, Case, async_sim_env, cases, known, run_case
from hypothesis import HealthCheck, assume, event, example, given, settings

EXAMPLES = 16
"""About 4 s a case on one CPU core (a probe for the reported minimum where a device budget is
drawn, then the prefill and decode graphs traced): about a minute in all."""


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
# Four cases always run besides the drawn ones, so that every run covers streaming at the minimum
# budget, waves (a host budget, with every layer resident: placement refuses streamed layers above it),
# mini-batches, mixed ACT blocks and both quantizations, whatever hypothesis draws; and a host budget
# that splits the batch with a device budget 1% above the waves' minimum, where disk_cache="auto"
# first runs the batch whole (blocks on disk), its placement refuses the device budget, and the
# generator runs the waves instead (found by make fuzz, seed 26).
@example(case=Case(family="llama", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=None, seed=3,
                   lengths=(7, 3, 9, 5), max_new_tokens=4, act_ratio=0.5, block_size=2, mini_batch_size=2,
                   prefetch_depth=1, device_budget=0.0, host_budget=None,
                   quant={"weight_quant": "int4", "quant_group_size": 16, "cache_quant": "int8"}))
@example(case=Case(family="qwen2", layers=2, hidden=48, heads=4, kv_heads=2, head_dim=None, seed=5,
                   lengths=(4, 8, 2), max_new_tokens=3, act_ratio=0.25, block_size=2, mini_batch_size="auto",
                   prefetch_depth=1, device_budget=None, host_budget=0.0, quant={"cache_quant": "int8"}))
@example(case=Case(family="opt", layers=4, hidden=48, heads=3, kv_heads=3, head_dim=None, seed=4,
                   lengths=(2, 6), max_new_tokens=3, act_ratio=1.0, block_size=3, mini_batch_size="auto",
                   prefetch_depth=2, device_budget=0.0, host_budget=None,
                   quant={"weight_quant": "int8", "quant_group_size": 48}))
@example(case=Case(family="llama", layers=3, hidden=56, heads=1, kv_heads=1, head_dim=None, seed=545,
                   lengths=(11, 5, 5, 9), max_new_tokens=3, act_ratio=0.25, block_size=2, mini_batch_size=4,
                   prefetch_depth=2, device_budget=0.06435563965956408, host_budget=0.9517055015779661,
                   quant={"weight_quant": "int8", "quant_group_size": 4}))
def test_greedy_tokens_equal_transformers_for_any_drawn_model_batch_and_options(case: Case):
    assume(known(case) is None)  # a failure found and not fixed yet (fuzzing.KNOWN): make fuzz still runs it
    outcome = run_case(case)
    event(outcome.status)  # pytest --hypothesis-show-statistics counts these, and what the runs exercised:
    facts = outcome.facts
    for what, happened in (("streamed layers", facts.get("streamed_layers")),
                           ("mini-batches", facts.get("minibatch_size")),
                           ("waves", (facts.get("waves") or 0) > 1), ("ACT blocks", facts.get("act_ratio")),
                           ("quantized weights", case.quant.get("weight_quant")),
                           ("int8 cache blocks", case.quant.get("cache_quant"))):
        if happened:
            event(what)
    assert not outcome.failed, f"{outcome.status}: {outcome.detail}\noptions: {outcome.options}\n" \
                               f"replay: {case.command()}\n{outcome.traceback}"


# -- benchmarks/fuzz.py --async-sim: the simulated asynchronous device's schedule per case --------------------

TINY = Case(family="llama", layers=1, hidden=32, heads=2, kv_heads=1, head_dim=None, seed=1, lengths=(3, 2),
            max_new_tokens=2, act_ratio=0.5, block_size=2, mini_batch_size="auto", prefetch_depth=1,
            device_budget=None, host_budget=None)


def _fuzz_cli():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("fuzz_cli", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_async_sim_takes_the_library_schedules_or_random_and_refuses_anything_else_in_one_line(
        capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(ASYNC_SIM, raising=False)
    fuzz = _fuzz_cli()
    assert [fuzz._schedule(v) for v in ("late", " early", "random:7", "random")] == ["late", "early", "random:7",
                                                                                    "random"]
    # "random": each case its own seed, from the run's.
    assert [fuzz._case_schedule("random", index, 5) for index in range(3)] == ["random:5", "random:6", "random:7"]
    assert fuzz._case_schedule("late", 2, 5) == "late" and fuzz._case_schedule(None, 0, 5) is None
    for bad in ("sometimes", "random:x", "late:1", ""):
        with pytest.raises(SystemExit) as exit_:  # argparse refuses it before anything runs
            fuzz.main(["--async-sim", bad, "--n", "0", "--json", str(tmp_path / "fuzz.json"),
                       "--markdown", str(tmp_path / "fuzz.md")])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: argument --async-sim: expected late, early, random:SEED (SEED an integer) or random " \
               f"(random:<case index + seed> for each case), got {bad!r}" in error
    assert ASYNC_SIM not in os.environ  # checking a value leaves the environment as it was
    assert not list(tmp_path.iterdir())


def test_a_case_carries_its_schedule_in_its_reproducer_and_runs_under_it(monkeypatch):
    case = dataclasses.replace(TINY, async_sim="late")
    assert '"async_sim":"late"' in case.command() and Case.from_json(case.to_json()) == case
    # A case without one has the reproducer it had before the field existed.
    assert "async_sim" not in TINY.to_json() and Case.from_json(TINY.to_json()) == TINY
    monkeypatch.setenv(ASYNC_SIM, "early")
    with async_sim_env("random:3"):
        assert os.environ[ASYNC_SIM] == "random:3"
    assert os.environ[ASYNC_SIM] == "early"
    monkeypatch.delenv(ASYNC_SIM)
    outcome = run_case(case)
    assert outcome.status == "passed", f"{outcome.detail}\n{outcome.traceback}"
    assert outcome.facts["async_sim"] == "late"  # the generator ran on the simulated device
    assert ASYNC_SIM not in os.environ
