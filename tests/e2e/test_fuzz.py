"""A property: for any drawn decoder, ragged batch and options, greedy tokens equal transformers'.

The cases and the run of one are in ``tests/fuzzing.py`` (shared with ``benchmarks/fuzz.py``, which
``make fuzz N=500`` runs for many more cases and a report). Here a bounded number of derandomized
examples runs in the suite: the same cases every run. A budget the library refuses with its
documented ``BudgetError`` is an answer, not a failure; a mismatch, a broken promise (device bytes
above the budget, blocks held after the call) or any other exception fails, with the line that
replays the case.
"""

from __future__ import annotations

from fuzzing import Case, cases, known, run_case
from hypothesis import HealthCheck, assume, event, example, given, settings

EXAMPLES = 16
"""About 4 s a case on one CPU core (a probe for the reported minimum where a device budget is
drawn, then the prefill and decode graphs traced): about a minute in all."""


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
# Three cases always run besides the drawn ones, so that every run covers streaming at the minimum
# budget, waves (a host budget, with every layer resident: placement refuses streamed layers above it),
# mini-batches, mixed ACT blocks and both quantizations, whatever hypothesis draws.
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
