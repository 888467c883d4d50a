"""`hscompile generate MODEL_DIR`: prompts and the resumable batch job, on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
from models import save_checkpoint

import hscompile
from hscompile.cli import main

EAGER = ["--device", "cpu", "--lowering", "eager"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, "llama")
    return path


def _jobs(path):
    lines = [
        {"id": "a", "prompt": "The capital of France is"},
        {"id": "b", "messages": [{"role": "user", "content": "hello there"}], "max_new_tokens": 3},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 4}},
        {"id": 7, "prompt": "hello world", "temperature": 0.9, "seed": 5},
        {"id": "e", "prompt": "the quick brown fox"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_print_their_completions_and_json_gives_the_fields(checkpoint, capsys, fresh_graph_cache):
    args = ["generate", str(checkpoint), "--prompt", "The capital of France is", "--prompt", "hello", "--max-new-tokens", "5"]
    assert main([*args, *EAGER]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "The capital of France is" in out and "tokens/s" in out and "layers streamed" in out
    # Compilation is shown as it happens, on standard error: which graph, how many partitions, the time.
    shown = " ".join(captured.err.split())
    assert "compiled the prefill graph" in shown and "compiled the decode graph" in shown
    assert "layers (1 traced), " in shown and "distinct partitions; trace" in shown
    assert main([*args, *EAGER, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in records] == ["The capital of France is", "hello"]
    expected = hscompile.from_pretrained(checkpoint, options={"device": "cpu", "lowering": "eager"}).generate_text(
        ["The capital of France is", "hello"], max_new_tokens=5)
    for record, completion in zip(records, expected, strict=True):
        assert set(record) == {"prompt", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert record["token_ids"] == completion.token_ids and record["text"] == completion.text


def test_the_batch_job_writes_every_id_once_and_a_rerun_resumes_after_a_torn_line(checkpoint, tmp_path, capsys):
    jobs = _jobs(tmp_path / "in.jsonl")
    whole = tmp_path / "whole.jsonl"
    run = ["generate", str(checkpoint), "--input", str(jobs), "--max-new-tokens", "6", "--batch-size", "2", *EAGER]
    assert main([*run, "--output", str(whole)]) == 0
    records = {r["id"]: r for r in _records(whole)}
    assert sorted(map(str, records)) == ["7", "a", "b", "c", "e"] and len(_records(whole)) == 5
    assert records["b"]["completion_tokens"] <= 3 and records["c"]["completion_tokens"] <= 4
    assert records["a"]["completion_tokens"] <= 6 and records["a"]["prompt"] == "The capital of France is"
    assert main([*run, "--output", str(whole)]) == 0
    assert "nothing to do" in capsys.readouterr().out and len(_records(whole)) == 5
    # A job killed while writing its third line: two whole lines and a torn one.
    killed = tmp_path / "killed.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    killed.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    assert main([*run, "--output", str(killed)]) == 0
    resumed = _records(killed)
    assert sorted(map(str, (r["id"] for r in resumed))) == ["7", "a", "b", "c", "e"]
    assert {str(r["id"]): r for r in resumed} == {str(k): v for k, v in records.items()}


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"id": "a", "prompt": "x"}', "{broken"], "input line 2: not valid JSON"),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "input line 2: id 'a' is used again"),
        (['{"prompt": "x"}'], "input line 1: needs an 'id'"),
        (['{"id": 1, "prompt": ""}'], "input line 1: 'prompt' must be a non-empty string"),
        (['{"id": 1, "prompt": "x", "messages": []}'], "exactly one of 'prompt'"),
        (['{"id": 1, "prompt": "x", "max_new_tokens": 0}'], r"input line 1 \(id 1\): max_new_tokens must be an int >= 1"),
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "x", "best_of": 2}'],
         r"input line 2 \(id 'b'\): unknown field\(s\) 'best_of'; a request may hold "),
        (['{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
          '"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}}'],
         r"input line 1 \(id 'c'\): unknown field\(s\) 'logit_bias'"),
        (['{"id": 1, "prompt": "x", "n": 0}'], r"input line 1 \(id 1\): n must be an int >= 1, got 0"),
        (['{"id": 1, "prompt": "x", "logprobs": -1}'], r"input line 1 \(id 1\): logprobs must be an int >= 0"),
        (['{"id": 1, "prompt": "x", "min_p": 2}'], r"input line 1 \(id 1\): min_p must be in \[0, 1\]"),
        (['{"id": 1, "prompt": "x", "stop": 5}'], r"input line 1 \(id 1\): stop must be a string or a list of non-empty"),
        (['{"id": 1, "prompt": "x", "repetition_penalty": -1}'], r"repetition_penalty must be a number > 0"),
        (['{"id": 1, "prompt": "x", "top_logprobs": 2, "logprobs": false}'], "'top_logprobs' needs 'logprobs': true"),
        (['[1, 2]'], "a request is a JSON object"),
        (['{"id": 1, "prompt": "' + "hello " * 200 + '"}'], "line 1 \\(id 1\\) has .* more than the model's maximum"),
    ],
)
def test_a_bad_input_line_is_named_before_any_work(checkpoint, tmp_path, capsys, lines, match):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    code = main(["generate", str(checkpoint), "--input", str(source), "--output", str(output), *EAGER])
    text = capsys.readouterr().out
    assert code == 2 and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    import re

    assert re.search(match, " ".join(text.split())), text
    assert not output.exists() or output.read_text() == ""


def test_command_line_mistakes_exit_2_with_one_line(checkpoint, tmp_path, capsys):
    source = _jobs(tmp_path / "in.jsonl")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    cases = [
        (["generate", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["generate", str(tmp_path / "bad"), "--prompt", "x"], "not valid JSON"),
        (["generate", str(checkpoint), "--input", str(source), "--output", str(tmp_path / "no" / "out.jsonl")],
         "does not exist"),
        (["generate", str(checkpoint)], "--prompt"),
        (["generate", str(checkpoint), "--input", str(source)], "--output"),
        (["generate", str(checkpoint), "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", str(checkpoint), "--prompt", "x", "--greedy", "--temperature", "0.8"],
         "--greedy decodes greedily (temperature 0) and cannot go with --temperature 0.8"),
        (["generate", str(checkpoint), "--prompt", "x", "--n", "0"], "--n must be an int >= 1"),
        (["generate", str(checkpoint), "--prompt", "x", "--min-p", "2"], "--min-p must be in [0, 1]"),
        (["generate", str(checkpoint), "--prompt", "x", "--logprobs", "-1"], "--logprobs must be an int >= 0"),
        (["generate", str(checkpoint), "--prompt", "x", "--presence-penalty", "-3"], "--presence-penalty must be in [-2, 2]"),
    ]
    for args, match in cases:
        assert main([*args, *EAGER]) == 2, args
        text = capsys.readouterr().out
        assert match in text and "Traceback" not in text, (args, text)
