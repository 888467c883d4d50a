"""Faults mid-step leave nothing broken: the call raises, and the same generator then serves the
next call with exact tokens, every cache block back in its pool, no staging or weight slot held."""

from __future__ import annotations

import pytest
import torch
from models import ragged_prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile.generation.sampling import TokenPicker
from hscompile.runtime.cache import CacheRuntime
from hscompile.runtime.weights import WeightRuntime

LAYERS = 4
NEW_TOKENS = 4

# Where a fault strikes: (what, class or module, attribute, which call raises). The model has 4
# layers: attention calls 1-4 are the prefill's, 5 onwards the decode steps'.
FAULTS = [
    ("prefill attention", CacheRuntime, "attend", 1),
    ("decode attention", CacheRuntime, "attend", LAYERS + 2),
    ("cache load", CacheRuntime, "load_kv", 2),
    ("checkpoint load", CacheRuntime, "load_act", 2),
    ("recompute", CacheRuntime, "recompute", 1),
    ("store", CacheRuntime, "store", LAYERS + 1),
    ("weight prefetch", WeightRuntime, "prefetch", 2),
    ("token selection", TokenPicker, "__call__", 2),
]


def _injected(original, fault: BaseException, on_call: int):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise fault
        return original(*args, **kwargs)

    return wrapper, calls


def _assert_clean(generator: hscompile.Generator) -> None:
    cache = generator.cache
    pools = cache.cache
    assert pools is not None
    assert not pools.sequences, "every sequence released"
    assert pools.kv_pool.num_free() == pools.kv_pool.num_blocks and pools.act_pool.num_free() == pools.act_pool.num_blocks
    assert cache.plans == [] and cache.step is None and cache.request is None
    assert cache.loads.arena is None, "the staging arena was given back"
    for compiled in generator.compiled_graphs:
        if compiled.executor is not None:
            assert all(slot.occupant is None for slot in compiled.executor.runtime.weights._slots)


@pytest.mark.parametrize("schedule", [None, "late"], ids=["cpu", "async-sim-late"])
@pytest.mark.parametrize(("what", "owner", "name", "on_call"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_mid_step_raises_and_the_generator_serves_the_next_call_exactly(monkeypatch, what, owner, name,
                                                                                 on_call, schedule):
    # Under the simulated asynchronous device the CUDA paths run: loads issued ahead, stores on the
    # copy stream. A fault then leaves copies in flight, which must be waited for, never dropped.
    if schedule is not None:
        monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", schedule)
    model = tiny_model("llama", layers=LAYERS)
    ids, mask = ragged_prompts()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    # Streamed (weights cross the ring), half the tokens as checkpoints (loads, recompute), blocks of 2.
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5, "block_size": 2,
                                            "device_memory": int(weight_bytes(model) * 0.9)})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)  # compiled, warm
    original = getattr(owner, name)
    for fault in (RuntimeError(f"injected into {what}"), KeyboardInterrupt()):
        wrapper, calls = _injected(original, fault, on_call)
        monkeypatch.setattr(owner, name, wrapper)
        with pytest.raises(type(fault)):
            generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
        assert calls["n"] == on_call, f"the fault in {what} did strike"
        monkeypatch.setattr(owner, name, original)
        _assert_clean(generator)
        assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected), what
        _assert_clean(generator)
    if schedule is not None:
        assert generator.stats()["deferred_copies"] > 0
        assert generator.cache.backend.pending == 0
