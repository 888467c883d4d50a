"""Any number of models in one process, as a notebook or a service meets them: compiled entries do
not pile up on code that every model of a class shares, and a dropped model frees its graphs."""

from __future__ import annotations

import gc
import weakref

import torch
from models import TinyDecoder, prompts, tiny_model

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


SIDE_BY_SIDE = (  # family, layers, hidden, heads, kv_heads (OPT and GPT-2 have no GQA: their kv_heads is ignored)
    ("llama", 2, 64, 4, 2),
    ("mistral", 1, 32, 2, 1),
    ("qwen2", 2, 96, 6, 3),
    ("opt", 1, 48, 3, 3),
    ("gpt2", 2, 80, 5, 5),
)
ONE_AFTER_ANOTHER = (
    ("llama", 1, 128, 8, 8),  # the class of a generator kept alive, at another shape
    ("opt", 2, 64, 4, 4),
)


def _shared_code_entries(model) -> int:
    """Compiled entries on the code every model of ``model``'s class shares (its forward, unwrapped)."""
    forward, entries = type(model).forward, 0
    while True:
        entries += _entries(forward.__code__)
        if not hasattr(forward, "__wrapped__"):
            return entries
        forward = forward.__wrapped__


def test_models_of_several_classes_and_shapes_side_by_side_and_one_after_another_match_transformers():
    options = {"device": "cpu", "lowering": "eager"}
    models = [tiny_model(f, layers=n, hidden=h, heads=q, kv_heads=kv, seed=i)
              for i, (f, n, h, q, kv) in enumerate(SIDE_BY_SIDE)]
    generators = [hscompile.Generator(m, options) for m in models]
    scratch = TinyDecoder(dim=32, heads=2, depth=2).eval()  # no transformers class: through torch.compile
    compiled = torch.compile(scratch, backend="hybridserve", options=options)
    batches = [prompts(2, 6, seed=1), prompts(3, 5, seed=2)]
    counts = None
    for round_ in range(3):  # interleaved: each round visits every generator, in alternating order and batch shape
        ids = batches[round_ % 2]
        order = range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))
        for i in order:
            got = generators[i].generate(ids, max_new_tokens=2)
            assert torch.equal(got, _reference(models[i], ids)), SIDE_BY_SIDE[i]
            if i == 2:  # the scratch decoder between two generators
                with torch.no_grad():
                    assert (compiled(ids) - scratch(ids)).abs().max().item() <= 1e-4
        if round_ == 1:
            counts = [len(g.compiled_graphs) for g in generators]
    # Both batch shapes seen, the third round compiles nothing new.
    assert [len(g.compiled_graphs) for g in generators] == counts
    # One after another: a fresh model per class and shape, dropped after its call.
    for i, (family, layers, hidden, heads, kv_heads) in enumerate(ONE_AFTER_ANOTHER):
        model = tiny_model(family, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, seed=100 + i)
        ids = batches[i % 2]
        assert torch.equal(hscompile.generate(model, ids, max_new_tokens=2, options=options), _reference(model, ids))
        del model
    # The code every model of a class shares holds no compiled graph: each generator keeps its own.
    for model in models:
        assert _shared_code_entries(model) == 0, type(model).__name__
    # The generators kept side by side still run after all of that, and compile nothing new.
    for generator, model in zip(generators, models, strict=True):
        assert torch.equal(generator.generate(batches[0], max_new_tokens=2), _reference(model, batches[0]))
    assert [len(g.compiled_graphs) for g in generators] == counts
