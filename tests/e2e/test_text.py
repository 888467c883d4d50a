"""Checkpoints in, text out: from_pretrained, generate_text and their errors, on tiny saved checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from models import TEXT_VOCAB, save_checkpoint, text_tokenizer, tiny_model

import hscompile
from hscompile.errors import BudgetError, CheckpointError

EAGER = {"device": "cpu", "lowering": "eager"}
PROMPTS = ["The capital of France is", "hello world", "Once upon a time there was a small model"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = save_checkpoint(path, "llama", layers=4)
    return path, model


def _transformers_new_tokens(model, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _expected(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt)["input_ids"]
    new = _transformers_new_tokens(model, ids, max_new_tokens)
    if 2 in new:  # transformers pads after the end-of-sequence token; a completion ends at it
        new = new[: new.index(2) + 1]
    return ids, new


@pytest.mark.parametrize("act_ratio", [0.0, 0.5])
def test_greedy_text_equals_transformers_together_and_alone(checkpoint, act_ratio):
    path, model = checkpoint
    generator = hscompile.from_pretrained(path, options={**EAGER, "act_ratio": act_ratio, "device_memory": 720_000})
    assert generator.model is not None and generator.tokenizer is not None
    together = generator.generate_text(PROMPTS, max_new_tokens=10)
    alone = [generator.generate_text(p, max_new_tokens=10)[0] for p in PROMPTS]
    tokenizer = text_tokenizer()
    for prompt, a, b in zip(PROMPTS, together, alone, strict=True):
        ids, new = _expected(model, tokenizer, prompt, 10)
        assert a.token_ids == b.token_ids == new
        assert a.prompt_tokens == len(ids) and a.completion_tokens == len(new)
        assert a.text == tokenizer.decode(new, skip_special_tokens=True)
        assert a.finish_reason == ("stop" if new[-1] == 2 else "length")
    assert generator.stats()["streamed_layers"] > 0  # the budget is below the weights


def test_loaded_layers_are_packed_as_the_host_store_streams_them_and_never_copied(checkpoint):
    # from_pretrained reads each layer straight into one packed buffer; the compiled model's host
    # store adopts those buffers, so no parameter moves and the weights are held once.
    path, _ = checkpoint
    generator = hscompile.from_pretrained(path, options={**EAGER, "device_memory": 720_000})
    layers = generator.model.model.layers
    storages = [{p.untyped_storage().data_ptr() for p in layer.parameters()} for layer in layers]
    assert all(len(s) == 1 for s in storages)  # one buffer per layer
    before = {name: p.data_ptr() for name, p in generator.model.named_parameters()}
    generator.generate_text(PROMPTS[0], max_new_tokens=3)
    assert {name: p.data_ptr() for name, p in generator.model.named_parameters()} == before
    host = generator.compiled_graphs[-1].executor.runtime.weights.host_buffers()
    assert host and {b.untyped_storage().data_ptr() for b in host} <= set().union(*storages)


def test_chat_messages_use_the_chat_template(checkpoint):
    path, model = checkpoint
    generator = hscompile.from_pretrained(path, options=EAGER)
    messages = [{"role": "user", "content": "hello there"}]
    tokenizer = text_tokenizer()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    (completion,) = generator.generate_text([messages], max_new_tokens=6)
    assert completion.prompt_tokens == len(ids)
    assert completion.token_ids == _transformers_new_tokens(model, ids, 6)[: completion.completion_tokens]
    (as_chat,) = generator.generate_text("hello there", max_new_tokens=6, chat=True)
    assert as_chat.token_ids == completion.token_ids


def test_a_stop_string_ends_the_sequence_and_is_cut_from_the_text(checkpoint):
    path, _ = checkpoint
    generator = hscompile.from_pretrained(path, options=EAGER)
    (full,) = generator.generate_text(PROMPTS[0], max_new_tokens=12)
    tokenizer = generator.tokenizer
    # A stop string that the greedy text reaches at its 5th token.
    prefix = tokenizer.decode(full.token_ids[:4], skip_special_tokens=True)
    fifth = tokenizer.decode(full.token_ids[:5], skip_special_tokens=True)
    assert fifth != prefix, "the 5th token must add text for this test"
    stop = fifth[len(prefix):] if fifth.startswith(prefix) else fifth
    (stopped, other) = generator.generate_text([PROMPTS[0], PROMPTS[1]], max_new_tokens=12, stop=stop)
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and full.text.startswith(stopped.text)
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) <= 5
    assert other.token_ids == generator.generate_text(PROMPTS[1], max_new_tokens=12, stop=stop)[0].token_ids


def test_sampling_depends_on_the_sequence_and_its_seed_not_on_its_batch_or_wave(checkpoint):
    path, _ = checkpoint
    settings = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50)
    generator = hscompile.from_pretrained(path, options=EAGER)
    together = generator.generate_text(PROMPTS, seed=[11, 12, 13], **settings)
    alone = [generator.generate_text(p, seed=[s], **settings)[0] for p, s in zip(PROMPTS, [11, 12, 13], strict=True)]
    # A host budget for one sequence at a time: three waves. (The same model: through from_pretrained,
    # host_memory would bound its weights too, and these do not fit 40 kB beside the disk tier's slots.)
    waves = hscompile.Generator(generator.model, {**EAGER, "host_memory": 40_000, "disk_cache": "off"},
                                tokenizer=generator.tokenizer)
    in_waves = waves.generate_text(PROMPTS, seed=[11, 12, 13], **settings)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone] == [c.token_ids for c in in_waves]
    # One seed for the call: the same per-sequence streams, with waves or without.
    assert [c.token_ids for c in generator.generate_text(PROMPTS, seed=42, **settings)] == [
        c.token_ids for c in waves.generate_text(PROMPTS, seed=42, **settings)
    ]
    assert len({tuple(c.token_ids) for c in together}) > 1


def test_sharded_and_half_precision_checkpoints_load_as_saved(tmp_path):
    model = save_checkpoint(tmp_path, "qwen2", dtype=torch.float16, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    generator = hscompile.from_pretrained(tmp_path, options=EAGER)
    assert next(generator.model.parameters()).dtype == torch.float16
    state = model.state_dict()
    for name, tensor in generator.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert next(hscompile.from_pretrained(tmp_path, dtype="float32", options=EAGER).model.parameters()).dtype == torch.float32


def test_one_generator_serves_calls_of_any_size_after_smaller_ones():
    # Graphs compiled for batch 1 fit the budget tightly (more layers resident); a later
    # batch-3 call never runs them and must not be refused because of them.
    model = tiny_model("llama", layers=6)
    ids = {b: torch.randint(3, 128, (b, s), generator=torch.Generator().manual_seed(b)) for b, s in [(5, 30), (3, 28), (1, 27)]}
    generator = hscompile.Generator(model, {**EAGER, "device_memory": 1_100_000, "act_ratio": 0})
    for batch, new in [(5, 10), (3, 9), (1, 4), (3, 9), (1, 4), (5, 10)]:
        out = generator.generate(ids[batch], max_new_tokens=new)
        assert out.shape == (batch, ids[batch].shape[1] + new)
    assert len(generator.compiled_graphs) == 4
    assert {c.stats()["resident_layers"] for c in generator.compiled_graphs} != {0}


def test_a_call_that_an_earlier_graph_cannot_fit_is_still_refused_before_it_runs():
    model = tiny_model("llama", layers=6)
    generator = hscompile.Generator(model, {**EAGER, "device_memory": 1_000_000, "act_ratio": 0})
    generator.generate(torch.randint(3, 128, (2, 8)), max_new_tokens=2)
    with pytest.raises(BudgetError, match="device memory"):
        generator.generate(torch.randint(3, 128, (2, 200)), max_new_tokens=40)


def _write_config(path, text):
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("no_config", "has no config.json"),
        ("bad_json", "not valid JSON"),
        ("json_list", "holds a JSON list"),
        ("no_model_type", "has no 'model_type'"),
        ("unknown_type", "no causal LM in transformers"),
        ("remote_code", "never runs"),
        ("pickle", "pickle"),
        ("no_weights", "has no model.safetensors"),
        ("wrong_shapes", "do not match its config.json"),
        ("missing_shard", "names shards that are not in"),
    ],
)
def test_a_bad_checkpoint_is_refused_with_what_is_wrong(tmp_path, case, match):
    path = tmp_path / "ckpt"
    if case == "file":
        path.write_text("x")
    elif case == "no_config":
        path.mkdir()
    elif case == "bad_json":
        _write_config(path, "{not json")
    elif case == "json_list":
        _write_config(path, "[1, 2]")
    elif case == "no_model_type":
        _write_config(path, json.dumps({"hidden_size": 4}))
    elif case == "unknown_type":
        _write_config(path, json.dumps({"model_type": "no-such-model"}))
    elif case == "remote_code":
        _write_config(path, json.dumps({"model_type": "my-own", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    elif case == "pickle":
        save_checkpoint(path, "llama", tokenizer=False)
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
    elif case == "no_weights":
        save_checkpoint(path, "llama", tokenizer=False)
        (path / "model.safetensors").unlink()
    elif case == "wrong_shapes":
        save_checkpoint(path, "llama", tokenizer=False)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    elif case == "missing_shard":
        save_checkpoint(path, "llama", tokenizer=False, max_shard_size="40KB")
        sorted(path.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match=match) as raised:
        hscompile.from_pretrained(path, options=EAGER)
    assert "\n" not in str(raised.value)


def test_text_needs_a_tokenizer_and_real_prompts(checkpoint, tmp_path):
    save_checkpoint(tmp_path, "llama", tokenizer=False)
    without = hscompile.from_pretrained(tmp_path, options=EAGER)
    assert without.tokenizer is None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        without.generate_text("hi", max_new_tokens=2)
    generator = hscompile.from_pretrained(checkpoint[0], options=EAGER)
    with pytest.raises(CheckpointError, match="prompt 1 is empty"):
        generator.generate_text(["fine", ""], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 0 has .* more than the model's maximum positions"):
        generator.generate_text("hello " * 300, max_new_tokens=2)
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        hscompile.from_pretrained(checkpoint[0], dtype="int8", options=EAGER)
    assert TEXT_VOCAB == generator.model.config.vocab_size
