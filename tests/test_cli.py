from __future__ import annotations

import json
import re
import time

import pytest
from models import tiny_model

from hscompile.cli import main

LLAMA_13B = {
    "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
    "torch_dtype": "float16",
}


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps table cells at the terminal width


def test_inspect_a_13b_config_in_well_under_a_minute(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_13B))
    start = time.perf_counter()
    code = main(["inspect", str(path), "--device", "cuda", "--device-memory", "8GiB", "--batch", "4", "--seq", "512"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0
    assert elapsed < 60, elapsed
    assert "40 x LlamaDecoderLayer" in out and "not loaded" in out
    assert re.search(r"layers \d+-38: prefetch\(L\+1, 605\.02 MiB\) -> wait\(L\) -> attn_in", out)
    assert "streamed: slot 0, prefetched" in out and "resident (copied once)" in out
    assert "budget 8.00 GiB" in out


def test_inspect_a_local_checkpoint_directory_reads_no_weights(tmp_path, capsys):
    model = tiny_model("qwen2", layers=4)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    assert main(["inspect", str(tmp_path), "--device", "cpu", "--device-memory", "500KiB", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "4 x Qwen2DecoderLayer" in out and "streamed" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "/nonexistent/config.json"], "does not exist"),
        (["inspect", "{dir}"], "no config.json"),
        (["inspect", "{config}", "--device-memory", "lots"], "device_memory"),
        (["inspect", "{config}", "--device", "cpu", "--device-memory", "1KiB"], "minimum working set"),
    ],
)
def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys, args, message):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**LLAMA_13B, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128}))
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(dir=empty, config=config) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().out


def test_predict_on_a_bundled_profile_ranks_the_choices(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_13B, "num_key_value_heads": 40}))
    assert main(["predict", str(path), "--profile", "h100-pcie5", "--batch", "16", "--prompt", "256",
                 "--new-tokens", "16", "--device-memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "tokens/s" in out and "choice (*)" in out


def _best_prediction(tmp_path, capsys, batch, prompt, *flags):
    """``(the output, its words joined by single spaces, the chosen row, that row's tokens/s)`` of
    ``predict`` on a 13B Llama (MHA) on the A100 profile, 8 new tokens, an 8 GiB device budget."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_13B, "num_key_value_heads": 40}))
    assert main(["predict", str(path), "--profile", "a100-40gb-pcie4", "--batch", str(batch), "--prompt", str(prompt),
                 "--new-tokens", "8", "--device-memory", "8GiB", *flags]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " * " in line)
    return out, " ".join(out.split()), row, float(row.split("│")[5])


def test_predict_with_quantized_weights_predicts_more_throughput_where_the_link_binds(tmp_path, capsys):
    _, plain_out, _, plain = _best_prediction(tmp_path, capsys, 8, 128)
    _, int4_out, _, int4 = _best_prediction(tmp_path, capsys, 8, 128, "--weight-quant", "int4")
    assert "weights as stored" in plain_out and "int4 weights (groups of 64)" in int4_out
    assert int4 > 2 * plain  # a quarter of the bytes over a link-bound stream


def test_predict_with_layers_on_disk_predicts_a_disk_bound_step_that_a_faster_disk_shortens(tmp_path, capsys):
    in_memory = _best_prediction(tmp_path, capsys, 4, 64)[3]
    _, out, row, slow = _best_prediction(tmp_path, capsys, 4, 64, "--host-memory", "16GiB", "--disk-bandwidth", "1.5")
    assert "layers on disk at 1.50 GB/s" in out and "disk" in row.split("│")[7]
    fast = _best_prediction(tmp_path, capsys, 4, 64, "--host-memory", "16GiB", "--disk-bandwidth", "6")[3]
    assert slow < fast < in_memory
    assert "every layer fits host_memory=1TiB" in _best_prediction(tmp_path, capsys, 4, 64, "--host-memory", "1TiB")[1]


def test_tune_measures_and_prints_the_profile(capsys):
    assert main(["tune", "--device", "cpu", "--width", "128"]) == 0
    out = capsys.readouterr().out
    assert "host -> device" in out and "matmul float32" in out and "hscompile per layer" in out


def test_predict_with_an_unknown_profile_is_an_error(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_13B))
    assert main(["predict", str(path), "--profile", "tpu-v9"]) == 2
    assert "no hardware profile" in capsys.readouterr().out


def test_tune_with_a_disk_directory_measures_its_disk_and_a_missing_one_is_one_line(tmp_path, capsys):
    assert main(["tune", "--device", "cpu", "--width", "128", "--disk", str(tmp_path / "missing")]) == 2
    assert "--disk" in capsys.readouterr().out and not list(tmp_path.iterdir())
    (tmp_path / "model.safetensors").write_bytes(bytes(2**20))  # read, not a probe written beside it
    from hscompile.runtime import disk

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(disk, "directory_read_bandwidth",
                      lambda directory: disk.read_bandwidth(directory / "model.safetensors")[0])
        patch.setattr("hscompile.generation.tuning.directory_read_bandwidth", disk.directory_read_bandwidth)
        assert main(["tune", "--device", "cpu", "--width", "128", "--disk", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "disk (" in out and "GB/s (direct reads)" in out  # (the directory may wrap in the table)


def test_inspect_plans_a_checkpoint_larger_than_host_memory_with_its_last_layers_on_disk(tmp_path, capsys,
                                                                                        _wide_console):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_13B))  # 26 GB of float16 weights
    code = main(["inspect", str(path), "--device", "cuda", "--device-memory", "8GiB", "--host-memory", "16GiB",
                 "--seq", "64"])
    out = capsys.readouterr().out
    assert code == 0
    # Half of 16 GiB for the weights: the embeddings and head, three staging slots and the first layers.
    match = re.search(r"disk layers +│ (\d+)-39: read from the checkpoint's files at every step through 3 host slots", out)
    assert match and 5 <= int(match.group(1)) <= 12, out


def test_generate_takes_the_disk_cache_option():
    from hscompile.cli import _generation_options, _parser

    args = _parser().parse_args(["generate", "m", "--prompt", "x", "--device", "cpu", "--disk-cache", "off"])
    assert _generation_options(args)["disk_cache"] == "off"
    assert "disk_cache" not in _generation_options(_parser().parse_args(["generate", "m", "--prompt", "x",
                                                                          "--device", "cpu"]))
