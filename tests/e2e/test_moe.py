"""Mixture-of-experts decoders (issue 27, first part): the dense pipeline streams each layer whole,
its experts included, and captures the routing without a graph break. Greedy tokens equal
transformers' for tiny random-weight Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE and OLMoE, at
act_ratio 0 and 0.5, with every layer streamed at the smallest device budget hscompile names, and
with a dense first layer before the MoE ones (``mlp_only_layers``)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from models import VOCAB, prompts

import hscompile
import hscompile.planning
from hscompile.errors import BudgetError, ConfigError

EAGER = {"device": "cpu", "lowering": "eager", "block_size": 4}
NEW = 4

COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    # A shared expert beside the routed ones; its config says sliding_window=0, use_sliding_window=False
    # and every layer full attention: no window applies.
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      decoder_sparse_step=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}


def moe_model(family: str, **overrides) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **MOE[family], **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _minimum(model, ids, options) -> int:
    with pytest.raises(BudgetError) as refused:
        hscompile.Generator(model, {**options, "device_memory": 1}).generate(ids, max_new_tokens=NEW)
    return int(re.search(r"use device_memory >= (\d+)", str(refused.value)).group(1))


@pytest.mark.parametrize("act_ratio", [0.0, 0.5])
@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_decoders_streamed_at_the_minimum_budget_give_transformers_tokens(family, act_ratio):
    model = moe_model(family)
    ids = prompts(4, 7)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)
    options = {**EAGER, "act_ratio": act_ratio, "mini_batch_size": 2}
    generator = hscompile.Generator(model, {**options, "device_memory": _minimum(model, ids, options)})
    assert torch.equal(generator.generate(ids, max_new_tokens=NEW), expected)
    stats = generator.stats()
    assert stats["streamed_layers"] == 3 and stats["minibatches"] > stats["cache_steps"]
    assert stats["graphs"] == 2  # a prefill and a decode graph: routing captured without a break


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_a_dense_first_layer_before_moe_layers_gives_transformers_tokens(family):
    # The first MoE layer computes the token count (batch x sequence, a symbolic size) and dynamo
    # records it once: every later MoE layer reads it from there. It is size arithmetic, not a
    # layer's data, so the analysis puts it before the layers (it refused the model before).
    model = moe_model(family, num_hidden_layers=4, mlp_only_layers=[0])
    assert type(model.model.layers[0].mlp) is not type(model.model.layers[1].mlp)
    ids = prompts(4, 7)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)
    options = {**EAGER, "act_ratio": 0.5}
    generator = hscompile.Generator(model, {**options, "device_memory": _minimum(model, ids, options)})
    assert torch.equal(generator.generate(ids, max_new_tokens=NEW), expected)
    assert generator.stats()["streamed_layers"] == 4


def test_a_router_choosing_more_experts_than_it_has_is_refused_before_any_work(tmp_path):
    # transformers accepts the config; its model fails inside the first forward.
    config = transformers.AutoConfig.for_model("mixtral", **COMMON, num_local_experts=4, num_experts_per_tok=6)
    message = (r"num_experts_per_tok is 6, but the router chooses among 4 experts \(num_local_experts\); give a number "
               r"of experts per token from 1 to 4")
    with pytest.raises(ConfigError, match=f"the model's config: {message}"):
        hscompile.Generator(transformers.AutoModelForCausalLM.from_config(config), EAGER)
    config.save_pretrained(tmp_path)  # a checkpoint directory: refused from its config.json, no weights read
    with pytest.raises(ConfigError, match=f"config.json: {message}"):
        hscompile.from_pretrained(tmp_path, options=EAGER)
    with pytest.raises(ConfigError, match=message):
        hscompile.planning.plan_model(tmp_path / "config.json", seq=8)
