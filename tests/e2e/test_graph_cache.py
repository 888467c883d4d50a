"""Captured graphs saved on disk: a later generator (or process) of a model with the same structure
reuses them instead of tracing with dynamo, gets the same tokens, and never reuses a graph whose
key or guards do not match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from models import prompts, save_checkpoint, tiny_model

import hscompile
from hscompile.errors import ConfigError
from hscompile.generation.captures import CaptureStore, structure_key
from hscompile.generation.kept import KEPT_ATTRIBUTE

OPTIONS = {"device": "cpu", "lowering": "eager", "act_ratio": 0.5}


@pytest.fixture
def cache_dir(fresh_graph_cache):
    return fresh_graph_cache


def _reference(model, ids, new=3):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)


def _saved(cache_dir) -> list:
    return sorted((cache_dir / "graphs").rglob("*.graph"))


def _fresh_process() -> None:
    """What a new process would have: no compiled frames, no dynamo state."""
    torch._dynamo.reset()


def test_a_model_of_the_same_structure_reuses_the_saved_graphs_without_tracing_and_matches_transformers(cache_dir):
    ids = prompts(3, 7)
    first = tiny_model("llama", layers=3, seed=0)
    out = hscompile.Generator(first, OPTIONS).generate(ids, max_new_tokens=3)
    assert torch.equal(out, _reference(first, ids))
    assert len(_saved(cache_dir)) == 2  # the prefill graph and the decode graph

    _fresh_process()
    other = tiny_model("llama", layers=3, seed=5)  # other weights: the graphs do not depend on them
    generator = hscompile.Generator(other, OPTIONS)
    wider = prompts(2, 9, seed=3)  # other sizes: the saved graphs are symbolic in batch and length
    assert torch.equal(generator.generate(wider, max_new_tokens=3), _reference(other, wider))
    records = generator.graphs.records
    assert [r.kind for r in records] == ["prefill", "decode"]
    assert all(r.traced_layers == 0 and r.saved for r in records), records
    assert generator.stats()["saved_graphs_used"] == 2 and "(captured earlier: " in records[0].line()
    assert len(_saved(cache_dir)) == 2


def test_a_call_the_saved_graphs_do_not_admit_is_captured_by_dynamo_and_saved(cache_dir):
    model = tiny_model("qwen2", layers=2)
    hscompile.Generator(model, OPTIONS).generate(prompts(2, 6), max_new_tokens=2)
    _fresh_process()
    generator = hscompile.Generator(model, OPTIONS)
    one = prompts(1, 6)  # batch 1: dynamo specialises size 1, so the symbolic graphs do not serve it
    assert torch.equal(generator.generate(one, max_new_tokens=2), _reference(model, one, 2))
    assert [r.traced_layers for r in generator.graphs.records] == [1, 1]
    assert generator.stats()["saved_graphs_used"] == 0
    assert len(_saved(cache_dir)) == 4


def test_a_changed_attribute_or_config_is_a_new_key_and_parity_holds(cache_dir):
    ids = prompts(2, 6)
    model = tiny_model("llama", layers=2)
    generator = hscompile.Generator(model, OPTIONS)
    generator.generate(ids, max_new_tokens=2)
    key = structure_key(model)
    assert key is not None and structure_key(tiny_model("llama", layers=2, seed=9)) == key

    # A value dynamo bakes into the graph, changed on the same model between two calls.
    model.model.layers[1].self_attn.scaling *= 0.5
    assert structure_key(model) != key
    assert torch.equal(generator.generate(ids, max_new_tokens=2), _reference(model, ids, 2))
    _fresh_process()
    assert torch.equal(hscompile.Generator(model, OPTIONS).generate(ids, max_new_tokens=2), _reference(model, ids, 2))

    assert structure_key(tiny_model("llama", layers=2, rms_norm_eps=1e-3)) != key
    assert structure_key(tiny_model("llama", layers=3)) != key
    assert structure_key(tiny_model("llama", layers=2, dtype=torch.bfloat16)) != key


def test_a_damaged_or_foreign_file_is_ignored_deleted_and_rebuilt(cache_dir):
    ids = prompts(2, 6)
    model = tiny_model("llama", layers=2)
    hscompile.Generator(model, OPTIONS).generate(ids, max_new_tokens=2)
    damaged, whole = _saved(cache_dir)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    # A whole file under another key (renamed by hand, or another model's) is not trusted either.
    foreign = cache_dir / "graphs" / ("0" * 32)
    foreign.mkdir()
    (foreign / whole.name).write_bytes(whole.read_bytes())
    assert CaptureStore(cache_dir / "graphs", "0" * 32).saved() == []
    assert not (foreign / whole.name).exists()

    _fresh_process()
    generator = hscompile.Generator(model, OPTIONS)
    assert torch.equal(generator.generate(ids, max_new_tokens=2), _reference(model, ids, 2))
    assert sorted(r.traced_layers for r in generator.graphs.records) == [0, 1]  # one reused, one traced again
    assert len(_saved(cache_dir)) == 2


def test_graph_cache_off_saves_nothing_and_hooked_models_are_not_keyed(cache_dir):
    ids = prompts(2, 6)
    model = tiny_model("llama", layers=2)
    hscompile.Generator(model, {**OPTIONS, "graph_cache": False}).generate(ids, max_new_tokens=2)
    assert _saved(cache_dir) == []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
    try:
        assert structure_key(model) is None
        _fresh_process()
        out = hscompile.Generator(model, OPTIONS).generate(ids, max_new_tokens=2)
        assert torch.equal(out, _reference(model, ids, 2))
        assert _saved(cache_dir) == []
    finally:
        handle.remove()
    with pytest.raises(ConfigError, match="option 'graph_cache': got 'yes'; expected True or False"):
        hscompile.Generator(model, {**OPTIONS, "graph_cache": "yes"})


def test_a_second_process_reuses_the_first_ones_graphs(cache_dir):
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import torch
        from models import prompts, tiny_model
        import hscompile
        model = tiny_model("mistral", layers=2)
        generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "act_ratio": 0.5})
        out = generator.generate(prompts(2, 7), max_new_tokens=3)
        print(json.dumps({"tokens": out.tolist(), "traced": [r.traced_layers for r in generator.graphs.records]}))
    """)
    tests = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "HSCOMPILE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script, tests], capture_output=True, text=True, env=env,
                              check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["traced"] == [1, 1] and runs[1]["traced"] == [0, 0]
    assert runs[1]["tokens"] == runs[0]["tokens"]


def test_least_recently_used_keys_and_stale_temporary_files_are_removed(cache_dir, monkeypatch):
    from hscompile.generation import captures

    monkeypatch.setattr(captures, "_MAX_KEYS", 2)
    graphs = cache_dir / "graphs"
    for age, name in ((3000, "older"), (2000, "old")):
        (graphs / name).mkdir(parents=True)
        os.utime(graphs / name, (time.time() - age, time.time() - age))
    model = tiny_model("llama", layers=2)
    hscompile.Generator(model, OPTIONS).generate(prompts(2, 6), max_new_tokens=2)
    key = structure_key(model)
    assert sorted(d.name for d in graphs.iterdir()) == sorted(["old", key])  # "older" went, "old" stays
    stale, fresh = graphs / key / "a.tmp", graphs / key / "b.tmp"
    stale.write_bytes(b"half a graph")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert len(CaptureStore(graphs, key).saved()) == 2
    assert not stale.exists() and fresh.exists()


def test_a_patched_function_method_or_attention_registration_is_a_new_key(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama", layers=2)
    key = structure_key(model)
    rotary = modeling_llama.apply_rotary_pos_emb
    forward = modeling_llama.LlamaMLP.forward
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    patches = [
        (modeling_llama, "apply_rotary_pos_emb", lambda *args, **kwargs: rotary(*args, **kwargs)),
        (modeling_llama.LlamaMLP, "forward", lambda self, x: forward(self, x)),
    ]
    for owner, name, replacement in patches:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, replacement)
            assert structure_key(model) != key, name
        assert structure_key(model) == key, name
    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *args, **kwargs: sdpa(*args, **kwargs))
        assert structure_key(model) != key
    assert structure_key(model) == key


def _kept(model):
    """The one generator ``hscompile.generate`` kept on ``model``."""
    (generator,) = vars(model)[KEPT_ATTRIBUTE].values()
    return generator


def test_hscompile_generate_saves_its_captures_and_a_later_call_reuses_them_and_matches_transformers(cache_dir):
    # The generator hscompile.generate keeps on the model is hscompile's own attribute, which the
    # key leaves out: the model keeps its key after the call (fixed sources: the model's part alone).
    ids = prompts(3, 7)
    first = tiny_model("llama", layers=3, seed=0)
    key = structure_key(first, sources="fixed")
    assert torch.equal(hscompile.generate(first, ids, max_new_tokens=3, options=OPTIONS), _reference(first, ids))
    assert KEPT_ATTRIBUTE in vars(first) and structure_key(first, sources="fixed") == key
    assert len(_saved(cache_dir)) == 2

    _fresh_process()
    other = tiny_model("llama", layers=3, seed=5)
    wider = prompts(2, 9, seed=3)
    assert torch.equal(hscompile.generate(other, wider, max_new_tokens=3, options=OPTIONS), _reference(other, wider))
    records = _kept(other).graphs.records
    assert [r.kind for r in records] == ["prefill", "decode"]
    assert all(r.traced_layers == 0 and r.saved for r in records), records
    assert _kept(other).stats()["saved_graphs_used"] == 2

    # The same key as a Generator's: what one entry point saved, the other reuses.
    _fresh_process()
    generator = hscompile.Generator(tiny_model("llama", layers=3, seed=7), OPTIONS)
    assert torch.equal(generator.generate(ids, max_new_tokens=3), _reference(generator.model, ids))
    assert generator.stats()["saved_graphs_used"] == 2
    assert len(_saved(cache_dir)) == 2


def test_from_pretrained_the_cli_and_hscompile_generate_reuse_one_another_s_captures(cache_dir, tmp_path, capsys):
    from hscompile.cli import main

    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, "llama", num_hidden_layers=2)
    texts = ["The capital of France is", "hello"]
    options = {"device": "cpu", "lowering": "eager"}
    cold = hscompile.from_pretrained(checkpoint, options=options)
    expected = [c.token_ids for c in cold.generate_text(texts, max_new_tokens=3)]
    assert cold.stats()["saved_graphs_used"] == 0 and len(_saved(cache_dir)) == 2

    _fresh_process()
    capsys.readouterr()
    prompt_args = [arg for text in texts for arg in ("--prompt", text)]
    assert main(["generate", str(checkpoint), *prompt_args, "--max-new-tokens", "3", "--json",
                 "--device", "cpu", "--lowering", "eager"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["token_ids"] for line in captured.out.strip().splitlines()] == expected
    shown = " ".join(captured.err.split())
    assert shown.count("layers (0 traced)") == 2 and shown.count("(captured earlier: ") == 2, shown

    _fresh_process()
    model = hscompile.from_pretrained(checkpoint, options=options).model
    ids = prompts(2, 6)
    assert torch.equal(hscompile.generate(model, ids, max_new_tokens=3, options=options), _reference(model, ids))
    assert _kept(model).stats()["saved_graphs_used"] == 2
    assert len(_saved(cache_dir)) == 2
