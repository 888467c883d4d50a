"""Any number of models in one process, as a notebook or a service meets them: compiled entries do
not pile up on code that every model of a class shares, and a dropped model frees its graphs."""

from __future__ import annotations

import gc
import weakref

import torch
from models import prompts, tiny_model

import hscompile

MODELS = 6
"""Each generator used to add its two graphs to the code every model of the class shares, so the
33rd failed with ``FailOnRecompileLimitHit`` (and a model of another class after it): that shared
code now holds none, whatever the number of models (40 in a row ran clean by hand)."""


def _entries(code) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def _reference(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                              pad_token_id=0)


def test_models_one_after_another_neither_pile_up_compiled_entries_nor_stay_alive():
    ids = prompts(2, 6)
    options = {"device": "cpu", "lowering": "eager"}
    first = tiny_model("llama", layers=2, seed=0)
    kept = hscompile.Generator(first, options)  # a generator someone keeps across all of this
    assert torch.equal(kept.generate(ids, max_new_tokens=2), _reference(first, ids))
    models, runtimes = [], []
    for seed in range(1, MODELS + 1):
        model = tiny_model("llama", layers=2, seed=seed)
        out = hscompile.generate(model, ids, max_new_tokens=2, options=options)
        if seed % 3 == 0:
            assert torch.equal(out, _reference(model, ids))
        models.append(weakref.ref(model))
        runtimes.extend(weakref.ref(c.executor.runtime) for c in hscompile.backend.compiled_models(model))
        del model, out
    # What every model of the class shares holds no compiled graph: each generator keeps its own.
    forward = type(first).forward
    while hasattr(forward, "__wrapped__"):
        assert _entries(forward.__code__) == 0
        forward = forward.__wrapped__
    assert _entries(forward.__code__) == 0
    # A model of another class, and the kept generator on a batch size it has not seen, still run.
    other = tiny_model("qwen2", layers=2)
    assert torch.equal(hscompile.generate(other, ids, max_new_tokens=2, options=options), _reference(other, ids))
    wider = prompts(3, 5)
    assert torch.equal(kept.generate(wider, max_new_tokens=2), _reference(first, wider))
    # Dropped models are freed, and so are their graphs' runtimes: the weight store, the device
    # buffers and the cache. (Dynamo may keep a graph's plan and schedule: its guards on the
    # model's class are finalized with the class only.)
    gc.collect()  # frees the models and generators; their finalizers release the graphs' runtimes,
    gc.collect()  # whose cycles the next collection frees
    assert all(ref() is None for ref in models)
    assert runtimes and all(ref() is None for ref in runtimes)
