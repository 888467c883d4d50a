"""Mini-batch formation (pure) and the split of a schedule by mini-batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import prompts, tiny_model

from hscompile.backend import compile_graph
from hscompile.config import HybridServeConfig
from hscompile.ir.schedule import MIN_ROWS
from hscompile.planner.minibatch import SequenceCost, form_minibatches, makespan, minibatch_count
from hscompile.runtime.minibatch import batch_split

costs_strategy = st.lists(
    st.builds(SequenceCost, st.floats(0, 10, allow_nan=False), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(costs=costs_strategy, size=st.integers(1, 50))
def test_every_sequence_is_in_exactly_one_minibatch_of_an_allowed_size(costs, size):
    groups = form_minibatches(costs, size)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    if size >= len(costs) or len(costs) < MIN_ROWS:
        assert groups == [list(range(len(costs)))]
        return
    n = len(costs)
    assert len(groups) == minibatch_count(n, size)
    largest = -(-n // len(groups))
    assert largest <= max(size, 2 * MIN_ROWS - 1)
    for group in groups:
        assert MIN_ROWS <= len(group) and n // len(groups) <= len(group) <= largest
    if size >= MIN_ROWS:  # as many mini-batches as the size asks for, unless one would be below MIN_ROWS
        assert len(groups) == -(-n // size) or n // -(-n // size) < MIN_ROWS


@settings(max_examples=100, deadline=None)
@given(costs=costs_strategy, size=st.integers(2, 12))
def test_the_order_is_optimal_for_the_load_then_compute_pipeline(costs, size):
    groups = form_minibatches(costs, size)
    if len(groups) > 6:
        return
    chosen = makespan([[costs[i] for i in g] for g in groups], overlap=True)
    best = min(makespan([[costs[i] for i in g] for g in order], overlap=True) for order in itertools.permutations(groups))
    assert chosen == pytest.approx(best)


def test_load_heavy_sequences_are_paired_with_compute_heavy_ones():
    costs = [SequenceCost(10, 0), SequenceCost(10, 0), SequenceCost(0, 10), SequenceCost(0, 10)]
    groups = form_minibatches(costs, 2)
    assert len(groups) == 2
    for group in groups:
        assert {costs[i].load > 0 for i in group} == {True, False}


def test_overlap_hides_loads_behind_the_previous_compute():
    groups = [[SequenceCost(1, 3)], [SequenceCost(2, 2)], [SequenceCost(3, 1)]]
    assert makespan(groups, overlap=False) == 12
    assert makespan(groups, overlap=True) == 1 + 3 + 2 + 1  # only the first load and the last compute show


def test_a_size_below_one_is_refused():
    with pytest.raises(ValueError, match="mini-batch size"):
        form_minibatches([SequenceCost(1, 1)] * 3, 0)


def _generation_schedules(batch, prompt):
    import hscompile

    model = tiny_model("llama", layers=2)
    generator = hscompile.Generator(model, options={"device": "cpu", "lowering": "eager", "act_ratio": 0.0})
    generator.generate(prompts(batch, prompt), max_new_tokens=2)
    return [c.executor for c in generator.compiled_graphs]


def test_generation_graphs_split_on_their_batch_even_when_it_equals_the_prompt_length():
    executors = _generation_schedules(4, 4)  # duck sizing would give batch and length one symbol
    assert len(executors) == 2
    for executor in executors:
        assert executor.split.splittable, executor.split.reason
        names = [n.name for n in executor.schedule.graph.nodes if n.op == "placeholder"]
        split = {names[i] for i in executor.split.batch_inputs}
        assert {"input_ids", "attention_mask", "position_ids"} <= split
        assert not any("weight" in name for name in split)


def test_a_graph_compiled_for_one_batch_size_is_not_split(capture_graph):
    model = tiny_model("llama", layers=2)
    gm, example = capture_graph(model, prompts(3, 5))
    compiled = compile_graph(gm, example, HybridServeConfig.from_options({"device": "cpu", "lowering": "eager"}))
    assert "one batch size" in batch_split(compiled.executor.schedule).reason


def _peak_values_held(layers: int, monkeypatch) -> int:
    """Most tensors the runner's steps made that were alive at once, in a mini-batched generation."""
    import weakref

    import hscompile
    from hscompile.runtime.minibatch import MiniBatchRunner

    alive: list[weakref.ref] = []
    peak = [0]
    run = MiniBatchRunner._run

    def counting(self, node, lookup):
        value = run(self, node, lookup)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                alive.append(weakref.ref(item))
        alive[:] = [r for r in alive if r() is not None]
        peak[0] = max(peak[0], len(alive))
        return value

    monkeypatch.setattr(MiniBatchRunner, "_run", counting)
    model = tiny_model("llama", layers=layers)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5, "mini_batch_size": 2})
    generator.generate(prompts(4, 6), max_new_tokens=2)
    assert generator.stats()["minibatches"] > generator.stats()["cache_steps"]  # it did run mini-batches
    return peak[0]


def test_a_call_holds_one_layers_values_not_every_layers(monkeypatch):
    # The runner drops each value after its last use, as generated code does: what it holds at
    # once does not grow with depth (without that, six layers hold three times what two do).
    import torch._dynamo

    shallow = _peak_values_held(2, monkeypatch)
    torch._dynamo.reset()
    deep = _peak_values_held(6, monkeypatch)
    assert deep <= shallow + 2, (shallow, deep)
