"""The checkpoint's generation defaults, logprobs and n > 1, end to end on a tiny saved checkpoint
whose generation_config.json sets a repetition penalty (and sampling settings greedy decoding ignores)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from models import save_checkpoint, text_tokenizer

import hscompile
from hscompile.cli import main

EAGER = {"device": "cpu", "lowering": "eager"}
PROMPTS = ["The capital of France is", "hello world", "Once upon a time there was a small model"]
NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("penalized")
    save_checkpoint(path, "llama", layers=2)
    # Greedy, with a repetition penalty; temperature / top_p are ignored when greedy (transformers' rule;
    # its save_pretrained refuses such a file, published checkpoints hold them all the same).
    config = {"do_sample": False, "repetition_penalty": 1.3, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return path, reference


def _batch(prompts=PROMPTS):
    tokenizer = text_tokenizer()
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def test_greedy_with_the_checkpoints_defaults_equals_transformers_generate_without_arguments(checkpoint):
    path, reference = checkpoint
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    generator = hscompile.from_pretrained(path, options={**EAGER, "act_ratio": 0.5, "block_size": 4})
    got = generator.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    # Without the checkpoint's penalty the tokens differ: the test sees the penalty applied.
    plain = generator.generate(ids, mask, max_new_tokens=NEW, repetition_penalty=1.0)
    assert not torch.equal(plain, expected)


def test_logprobs_equal_log_softmax_of_transformers_processed_scores(checkpoint):
    path, reference = checkpoint
    ids, mask = _batch()
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, output_scores=True,
                                 return_dict_in_generate=True)
    generator = hscompile.from_pretrained(path, options=EAGER)
    got = generator.run(ids, mask, max_new_tokens=NEW, logprobs=3)
    assert torch.equal(got.sequences, out.sequences) and got.logprobs is not None
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        new = out.sequences[row, width:].tolist()
        steps = new.index(2) + 1 if 2 in new else len(new)  # up to and including its end-of-sequence token
        for step in range(steps):
            expected = torch.log_softmax(out.scores[step][row].float(), dim=-1)
            record = got.logprobs[row][step]
            assert record.token_id == new[step]
            assert math.isclose(record.logprob, float(expected[new[step]]), abs_tol=1e-5)
            top = torch.topk(expected, 3)
            assert [t for t, _ in record.top] == top.indices.tolist()
            assert all(math.isclose(v, float(e), abs_tol=1e-5) for (_, v), e in zip(record.top, top.values, strict=True))


def test_n_samples_share_one_prefill_differ_and_reproduce_with_a_seed(checkpoint):
    path, _ = checkpoint
    generator = hscompile.from_pretrained(path, options={**EAGER, "act_ratio": 0.5, "block_size": 4})
    ids, mask = _batch(PROMPTS[:2])
    # Greedy copies equal the prompt decoded alone: the copied cache (KV and ACT blocks) is the prefill's.
    alone = generator.generate(ids, mask, max_new_tokens=6)
    assert generator.stats()["prefills_shared"] == 0
    copies = generator.generate(ids, mask, max_new_tokens=6, n=3)
    assert torch.equal(copies, alone.repeat_interleave(3, dim=0))
    assert generator.stats()["prefills_shared"] == 4  # 2 prompts x 2 copies that took the prompt's cache
    settings = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 0, "n": 3, "seed": 5}
    first = generator.generate_text(PROMPTS[:2], **settings)
    again = generator.generate_text(PROMPTS[:2], **settings)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.index for c in first] == [0, 1, 2, 0, 1, 2]
    for prompt in range(2):
        samples = {tuple(c.token_ids) for c in first[prompt * 3:prompt * 3 + 3]}
        assert len(samples) > 1, samples
    # Sample 0 of each prompt is what n=1 gives with the same seed.
    single = generator.generate_text(PROMPTS[:2], **{**settings, "n": 1})
    assert [c.token_ids for c in single] == [first[0].token_ids, first[3].token_ids]
    other = generator.generate_text(PROMPTS[:2], **{**settings, "seed": 6})
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_the_cli_samples_at_a_temperature_and_json_carries_logprobs_and_n(checkpoint, capsys):
    path, _ = checkpoint
    base = ["generate", str(path), "--prompt", "hello world", "--max-new-tokens", "8", "--device", "cpu",
            "--lowering", "eager", "--json"]

    def run(*extra: str) -> list[dict]:
        assert main([*base, *extra]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]

    # --temperature without --do-sample samples: two seeds give two texts (greedy gave one before).
    one, two = run("--temperature", "1.5", "--top-k", "0", "--seed", "1"), run("--temperature", "1.5", "--top-k", "0",
                                                                              "--seed", "2")
    assert one[0]["token_ids"] != two[0]["token_ids"]
    assert run("--temperature", "1.5", "--top-k", "0", "--seed", "1") == one
    greedy = run("--greedy", "--logprobs", "2", "--n", "2")
    assert [r["index"] for r in greedy] == [0, 1] and greedy[0]["token_ids"] == greedy[1]["token_ids"]
    record = greedy[0]
    assert len(record["logprobs"]) == record["completion_tokens"]
    first = record["logprobs"][0]
    assert set(first) == {"token_id", "token", "logprob", "top_logprobs"} and len(first["top_logprobs"]) == 2
    assert first["token_id"] == first["top_logprobs"][0]["token_id"] == record["token_ids"][0]  # greedy: the top one


def test_batch_lines_take_openai_names_and_results_carry_logprobs_and_n(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    lines = [
        {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_completion_tokens": 3,
                  "logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 0.9, "seed": 3, "user": "u"}},
        {"id": "y", "prompt": "hello world", "max_tokens": 2, "logprobs": 1, "repetition_penalty": 1.0},
    ]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    args = ["generate", str(path), "--input", str(source), "--output", str(output), "--device", "cpu",
            "--lowering", "eager"]
    assert main(args) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["id"], r.get("index")) for r in records] == [("x", 0), ("x", 1), ("y", None)]
    for record, top in zip(records, (2, 2, 1), strict=True):
        assert len(record["logprobs"]) == record["completion_tokens"] <= (3 if record["id"] == "x" else 2)
        assert all(len(entry["top_logprobs"]) == top for entry in record["logprobs"])


def test_n_copies_split_across_waves_and_mini_batches_decode_as_their_prompt_alone():
    from models import prompts, tiny_model

    model = tiny_model("llama", layers=2)
    ids = prompts(2, 9)
    options = {**EAGER, "act_ratio": 0.5, "block_size": 4}
    alone = hscompile.Generator(model, options).generate(ids, max_new_tokens=5)
    per_sequence = hscompile.Generator(model, options).spec.sequence_bytes(0.5, 9 + 5)
    # Room for 4 of the 6 sequences at a time: two waves, one prompt's copies in both; mini-batches of 2.
    generator = hscompile.Generator(model, {**options, "host_memory": 4 * per_sequence, "mini_batch_size": 2,
                                                 "disk_cache": "off"})
    copies = generator.generate(ids, max_new_tokens=5, n=3)
    assert torch.equal(copies, alone.repeat_interleave(3, dim=0))
    stats = generator.stats()
    assert len(generator.plan.waves) == 2 and stats["minibatches"] > stats["cache_steps"]
    assert stats["prefills_shared"] == 3, stats["prefills_shared"]  # 6 sequences, 3 prefills in all


def test_min_new_tokens_and_ignore_eos_through_hscompile_generate_with_params():
    from models import prompts, tiny_model

    model = tiny_model("llama", layers=2)
    ids = prompts(2, 9)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    eos = int(plain[0, 9 + 1])  # the second token row 0 generates ends it
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=4)
    params = hscompile.SamplingParams(max_new_tokens=8, min_new_tokens=4)
    got = hscompile.generate(model, ids, params=params, options=EAGER)
    assert torch.equal(got, expected)
    assert not torch.equal(hscompile.generate(model, ids, max_new_tokens=8, options=EAGER), expected)
    # ignore_eos: the end-of-sequence token may come, generation goes on (no padding after it).
    ignoring = hscompile.generate(model, ids, params=params.replace(min_new_tokens=None, ignore_eos=True), options=EAGER)
    assert int(ignoring[0, 9 + 1]) == eos and torch.equal(ignoring, plain)
