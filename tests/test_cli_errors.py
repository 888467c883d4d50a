"""Bad command-line input is a one-line error naming what is wrong (exit code 2), never a traceback."""

from __future__ import annotations

import json

import pytest

from hscompile.cli import main

LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 8192,
}
PREDICT = ["--profile", "h100-pcie5"]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps table cells at the terminal width


def _files(tmp_path) -> dict[str, str]:
    """The config files and checkpoint directories the cases name, as ``{name}`` placeholders."""
    contents = {
        "ok": json.dumps(LLAMA),
        "bad_json": '{"model_type": "llama", "hidden_size": 64,',
        "list": json.dumps([LLAMA]),
        "hidden_negative": json.dumps({**LLAMA, "hidden_size": -64}),
        "hidden_zero": json.dumps({**LLAMA, "hidden_size": 0}),
        "layers_zero": json.dumps({**LLAMA, "num_hidden_layers": 0}),
        "heads_zero": json.dumps({**LLAMA, "num_attention_heads": 0}),
        "heads_five": json.dumps({**LLAMA, "num_attention_heads": 5, "num_key_value_heads": 5}),
        # one layer of 6.25 TiB (float32): planned on the meta device, refused before anything is allocated
        "absurd": json.dumps({**LLAMA, "hidden_size": 2**17, "intermediate_size": 2**22, "num_attention_heads": 2**10,
                              "num_key_value_heads": 2**10}),
    }
    files = {}
    for name, text in contents.items():
        (tmp_path / f"{name}.json").write_text(text)
        files[name] = str(tmp_path / f"{name}.json")
        (tmp_path / f"{name}_dir").mkdir()
        (tmp_path / f"{name}_dir" / "config.json").write_text(text)
        files[f"{name}_dir"] = str(tmp_path / f"{name}_dir")
    return files


CASES = [
    # 1-2: config.json that is not JSON, or not a JSON object: as a file and in a directory
    (["inspect", "{bad_json}"], ["bad_json.json", "is not valid JSON"]),
    (["inspect", "{bad_json_dir}"], ["bad_json_dir/config.json", "is not valid JSON"]),
    (["predict", "{bad_json}", *PREDICT], ["bad_json.json", "is not valid JSON"]),
    (["inspect", "{list}"], ["list.json", "holds a JSON list; a config is a JSON object"]),
    (["inspect", "{list_dir}"], ["list_dir/config.json", "holds a JSON list; a config is a JSON object"]),
    (["predict", "{list_dir}", *PREDICT], ["list_dir/config.json", "holds a JSON list"]),
    (["bench", "{list}", "--device", "cpu"], ["list.json", "holds a JSON list"]),
    # 3: inspect's sizes
    (["inspect", "{ok}", "--device", "cpu", "--batch", "0"], ["--batch", ">= 1"]),
    (["inspect", "{ok}", "--device", "cpu", "--seq", "-1"], ["--seq", ">= 1"]),
    (["inspect", "{ok}", "--device", "cpu", "--seq", "0"], ["--seq", ">= 1"]),
    # 4: predict's sizes, and dtypes
    (["predict", "{ok}", *PREDICT, "--batch", "0"], ["--batch", ">= 1"]),
    (["predict", "{ok}", *PREDICT, "--prompt", "0"], ["--prompt", ">= 1"]),
    (["predict", "{ok}", *PREDICT, "--new-tokens", "0"], ["--new-tokens", ">= 1"]),
    (["predict", "{ok}", *PREDICT, "--dtype", "foo"], ["--dtype", "float32", "float16", "bfloat16"]),
    (["inspect", "{ok}", "--device", "cpu", "--dtype", "foo"], ["--dtype", "float32", "float16", "bfloat16"]),
    # 5: more positions than the model has
    (["predict", "{ok}", *PREDICT, "--prompt", "100000"], ["--prompt 100000", "8192", "max_position_embeddings"]),
    (["inspect", "{ok}", "--device", "cpu", "--seq", "9000"], ["--seq 9000", "8192", "max_position_embeddings"]),
    # 6: core sizes of the config, before a model is built
    (["inspect", "{hidden_negative}"], ["hidden_negative.json", "hidden_size", ">= 1", "-64"]),
    (["inspect", "{hidden_negative_dir}"], ["hidden_negative_dir/config.json", "hidden_size", ">= 1"]),
    (["predict", "{hidden_zero}", *PREDICT], ["hidden_size", ">= 1"]),
    (["bench", "{hidden_zero_dir}", "--device", "cpu"], ["hidden_size", ">= 1"]),
    (["inspect", "{layers_zero}"], ["num_hidden_layers", ">= 1"]),
    (["predict", "{heads_zero}", *PREDICT], ["num_attention_heads", ">= 1"]),
    (["inspect", "{heads_five}"], ["hidden_size 64", "not a multiple", "num_attention_heads 5"]),
    (["bench", "{heads_five}", "--device", "cpu"], ["hidden_size 64", "not a multiple", "num_attention_heads 5"]),
    # 7: a layer larger than this machine's host memory (inspect: too large even for the disk tier)
    (["inspect", "{absurd}", "--device", "cpu"], ["2 layers, hidden size 131072", "its weights take 12.50 TiB",
                                                  "bytes) of host memory available on this machine, so its layers "
                                                  "stay on disk", "use host_memory >= "]),
    (["bench", "{absurd}", "--device", "cpu"], ["2 layers, hidden size 131072", "layer 0 alone holds 6.25 TiB",
                                                "bytes) of host memory available on this machine"]),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_a_one_line_error_naming_it(tmp_path, capsys, args, expected):
    files = _files(tmp_path)
    try:
        code = main([a.format(**files) for a in args])
    except SystemExit as stop:  # argparse refuses a value with its usage and exit code 2
        code = stop.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, output
    for text in expected:
        assert text in lines[0], lines[0]


def test_predict_prints_no_two_rows_alike(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    assert main(["predict", str(path), *PREDICT, "--batch", "32", "--prompt", "512", "--new-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "mini-batches" in out
    rows = [line.replace("*", "").strip() for line in out.splitlines() if line.startswith("│")]
    assert len(rows) > 2, out
    assert len(rows) == len(set(rows)), out
