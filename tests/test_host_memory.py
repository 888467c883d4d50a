"""Weights that cannot live in host memory are refused before anything is allocated, with the numbers.

No test here allocates a large model: absurd configs are built on the meta device, absurd
checkpoints are safetensors headers without their data, and the memory figure the planner reads is
patched where a small real model must look too big.
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
import transformers
from models import save_checkpoint, tiny_config

import hscompile
from hscompile.config import HybridServeConfig
from hscompile.errors import BudgetError
from hscompile.ir.layout import read_bytes
from hscompile.planner import budget
from hscompile.planner.budget import HostBudget, check_host_weights, host_budget, machine_budget
from hscompile.planner.cost_model import ModelDims
from hscompile.planner.hardware import host_memory_available
from hscompile.planning import check_host_weights_of, plan_model

ABSURD = {"hidden_size": 2**17, "intermediate_size": 2**22, "num_hidden_layers": 2, "num_attention_heads": 2**10,
          "num_key_value_heads": 2**10, "vocab_size": 128, "max_position_embeddings": 256}
"""A Llama whose one layer holds 6.25 TiB of float32 weights (the MLP alone: 3 x 2^17 x 2^22 x 4 bytes)."""


def _meta_model(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def test_the_host_memory_figure_is_what_this_machine_has_available():
    available = host_memory_available()
    assert available is not None and 0 < available
    machine = host_budget(HybridServeConfig.from_options({"device": "cpu"}), held=5)
    assert machine is not None and not machine.option and machine.nbytes > 5  # the figure moves as other work runs
    assert host_budget(HybridServeConfig.from_options({"host_memory": "1GiB"})) == HostBudget(2**30, option=True)


def test_weights_too_large_even_for_the_disk_tier_are_refused_by_planning_with_the_numbers():
    config = transformers.LlamaConfig(**ABSURD)
    layer = ModelDims.from_model(_meta_model(config)).layer_weight_bytes
    assert layer > 6 * 2**40
    with pytest.raises(BudgetError) as refused:
        plan_model(config, seq=16, options={"device": "cpu"})
    message = str(refused.value)
    assert "LlamaForCausalLM of 2 layers, hidden size 131072, float32: its weights take " in message
    assert "of host memory available on this machine, so its layers stay on disk" in message
    assert re.search(r"use host_memory >= \d+ on a machine with that much memory available", message), message


ON_THIS_MACHINE = "of host memory available on this machine"


@pytest.mark.parametrize("source", ["available", "option"])
def test_planning_weights_larger_than_the_host_budget_plans_their_last_layers_on_disk(monkeypatch, source):
    # As from_pretrained would load it: the first layer in memory beside the weights outside the
    # layers and three staging slots (half the budget), the other fifteen read from disk at every step.
    config = tiny_config("llama", layers=16)
    model = _meta_model(config)
    layer = sum(p.nbytes for p in model.model.layers[0].parameters())
    outside = sum(p.nbytes for p in model.parameters()) - 16 * layer
    room = 2 * (outside + 3 * read_bytes(layer) + layer) + 64
    assert outside + 16 * layer > room
    options = {"device": "cpu", "lowering": "eager"}
    if source == "available":
        monkeypatch.setattr(budget, "host_memory_available", lambda: room)
    else:
        options["host_memory"] = room
    info = plan_model(config, seq=16, options=options)
    assert info.policy.disk_layers == tuple(range(1, 16))
    assert "disk layers" in str(info) and "read from the checkpoint's files at every step" in str(info)
    with pytest.raises(BudgetError, match=r"so its layers stay on disk; .*use host_memory >= \d+"):
        plan_model(config, seq=16, options={**options, "host_memory": room // 4})


def test_the_host_memory_option_bounds_the_cache_not_the_weights(monkeypatch):
    monkeypatch.setattr(budget, "host_memory_available", lambda: 2**40)
    model = _meta_model(tiny_config("llama"))
    check_host_weights_of(model, HybridServeConfig.from_options({"device": "cpu", "host_memory": 1024}))
    assert host_budget(HybridServeConfig.from_options({"host_memory": 1024})) == HostBudget(1024, option=True)
    assert machine_budget(held=5) == HostBudget(2**40 + 5, option=False)


def test_a_plan_for_a_device_this_machine_lacks_is_not_held_to_this_machines_memory(monkeypatch):
    monkeypatch.setattr(budget, "host_memory_available", lambda: 1024)
    model = _meta_model(tiny_config("llama"))
    with pytest.raises(BudgetError, match="of host memory available on this machine"):
        check_host_weights_of(model, HybridServeConfig.from_options({"device": "cpu"}))
    if not torch.cuda.is_available():
        check_host_weights_of(model, HybridServeConfig.from_options({"device": "cuda"}, check_device=False))


def test_check_host_weights_names_the_largest_layer():
    with pytest.raises(BudgetError, match=r"layer 2 alone holds 300 B \(300 bytes\)"):
        check_host_weights([100, 200, 300, 100], 0, HostBudget(250, option=True), what="m")
    check_host_weights([100, 200], 50, HostBudget(350, option=True), what="m")
    with pytest.raises(BudgetError, match=r"m: its weights take 400 B \(400 bytes: 2 layers of up to 200 B and 100 B "
                                          r"outside them\), more than host_memory=350 B; hscompile keeps every weight"):
        check_host_weights([100, 200], 100, HostBudget(350, option=True), what="m")
    check_host_weights([10**15], 0, None, what="m")  # no figure, no check


def test_from_pretrained_refuses_a_budget_below_the_disk_tiers_minimum_before_reading_weights(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "llama", tokenizer=False)
    monkeypatch.setattr(budget, "host_memory_available", lambda: 64 * 1024)

    def unread(*args, **kwargs):
        raise AssertionError("a weight was read before the host memory check")

    monkeypatch.setattr(hscompile.loading, "_read_layers", unread)
    with pytest.raises(BudgetError, match=rf"the checkpoint {tmp_path}: its weights take .*, more than the 64.00 KiB "
                                          r"\(65536 bytes\) of host memory available on this machine, so its layers "
                                          r"stay on disk; .* use host_memory >= \d+ on a machine with that much"):
        hscompile.from_pretrained(tmp_path, options={"device": "cpu", "lowering": "eager"})


def _header_only_checkpoint(path, shape):
    """A checkpoint whose safetensors header declares two layers of ``shape`` float32 weights, and no data."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **ABSURD}))
    nbytes = 4 * shape[0] * shape[1]
    header = {f"model.layers.{i}.mlp.up_proj.weight":
              {"dtype": "F32", "shape": list(shape), "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(2)}
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)


def test_a_checkpoint_of_absurd_sizes_is_refused_with_the_numbers_before_allocation(tmp_path):
    _header_only_checkpoint(tmp_path, (2**25, 2**23))  # 1 PiB per layer
    with pytest.raises(BudgetError, match=r"its weights take 2048.00 TiB \(2251799813685248 bytes\), more than the .* "
                                          r"of host memory available on this machine, so its layers stay on disk; .* the "
                                          r"staging slots layers are read into \(3072.00 TiB\)"):
        hscompile.from_pretrained(tmp_path, options={"device": "cpu"})
