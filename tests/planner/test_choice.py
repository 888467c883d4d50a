"""The per-call plan (planner/choice.py): one set of numbers that the prediction, the staging and
the runtime all read."""

from __future__ import annotations

import pytest
import torch

from hscompile.config import HybridServeConfig
from hscompile.errors import ConfigError
from hscompile.ir.cache import CacheSpec, pinned_bytes
from hscompile.planner.budget import HostBudget, admit_waves, decode_staging
from hscompile.planner.choice import plan_call
from hscompile.planner.cost_model import ModelDims, minibatch_counts
from hscompile.planner.hardware import load_profile
from hscompile.planner.minibatch import SequenceCost, form_minibatches, minibatch_count

A100 = load_profile("a100-40gb-pcie4")


def _dims(layers=32, hidden=4096, heads=32, kv_heads=32, vocab=32000, cache_quant="none"):
    head_dim = hidden // heads
    layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * 4 * hidden
    return ModelDims(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype="float16",
                     layer_weight_bytes=layer * 2, global_weight_bytes=2 * vocab * hidden * 2,
                     layer_matmul_params=layer, recompute_matmul_params=2 * hidden * kv_heads * head_dim,
                     head_matmul_params=vocab * hidden, cache_quant=cache_quant)


def _plan(dims: ModelDims, options: dict, *, batch: int, prompt: int = 512, new_tokens: int = 32, act_ratio=None,
          overlap: bool = True):
    config = HybridServeConfig.from_options({"device": "cpu", **options})
    spec = dims.cache_spec(config.cache.block_size)
    return spec, plan_call(config, spec, totals=[prompt + new_tokens] * batch, prompt=prompt, new_tokens=new_tokens,
                           act_ratio=act_ratio, overlap=overlap, host=None, dims=dims, profile=A100)


def test_five_sequences_in_mini_batches_of_two_run_and_are_predicted_as_two():
    # ceil(5 / 2) = 3 groups would leave one of a single row: the runtime forms 2 (of 3 and 2 rows).
    dims = _dims(layers=4, hidden=512, heads=8, kv_heads=8)
    spec, plan = _plan(dims, {"act_ratio": 0.5, "mini_batch_size": 2}, batch=5, act_ratio=None)
    groups = form_minibatches([SequenceCost(1.0, 1.0)] * 5, plan.minibatch_rows)
    assert plan.minibatches == len(groups) == minibatch_count(5, 2) == 2
    assert plan.largest_minibatch == max(map(len, groups)) == 3
    # The staging is sized for the largest mini-batch the runtime forms.
    assert plan.staging_bytes == decode_staging(spec, 0.5, rows=3, longest=544, overlap=True)
    # With an "auto" ratio the search evaluates the same count the runtime runs.
    _, searched = _plan(dims, {"act_ratio": "auto", "mini_batch_size": 2}, batch=5)
    assert {p.choice.minibatches for p in searched.decision.considered} == {2}


def test_every_mini_batch_count_the_search_tries_is_one_the_runtime_forms():
    for batch in range(1, 70):
        for count in minibatch_counts(batch):
            assert minibatch_count(batch, -(-batch // count)) == count, (batch, count)


def test_int8_checkpoints_of_the_hidden_width_save_bytes_and_their_staging_is_reserved():
    # 2 * kv_heads * head_dim == hidden: as values a checkpoint is as wide as K/V, but int8 blocks
    # keep one scale per K/V head and one per checkpoint, so a checkpoint moves fewer bytes.
    dims = _dims(hidden=4096, heads=32, kv_heads=16, cache_quant="int8")
    assert dims.hidden == 2 * dims.kv_heads * dims.head_dim
    spec, plan = _plan(dims, {"act_ratio": "auto", "cache_quant": "int8", "device_memory": 12 * 2**30}, batch=64)
    assert spec.act_row_bytes < spec.kv_row_bytes and spec.checkpoints_save_bytes
    assert plan.decision is not None and {p.choice.act_ratio for p in plan.decision.considered} != {0.0}
    assert plan.act_ratio > 0  # the link binds at this batch: the search takes checkpoints
    assert plan.staged_ratio == 1.0  # any ratio a later "auto" call may pick
    rows = plan.largest_minibatch
    assert plan.staging_bytes == decode_staging(spec, 1.0, rows=rows, longest=544, overlap=True)
    assert plan.staging_bytes >= decode_staging(spec, plan.act_ratio, rows=rows, longest=544, overlap=True)


def test_without_int8_the_same_width_keeps_every_token_as_kv():
    dims = _dims(hidden=4096, heads=32, kv_heads=16)
    spec, plan = _plan(dims, {"act_ratio": "auto", "device_memory": 12 * 2**30}, batch=64)
    assert not spec.checkpoints_save_bytes
    assert plan.act_ratio == 0.0 and plan.staged_ratio == 0.0
    assert {p.choice.act_ratio for p in plan.decision.considered} == {0.0}


def test_a_calls_ratio_is_checked_once_with_the_options_message():
    dims = _dims(layers=2, hidden=256, heads=4, kv_heads=4)
    with pytest.raises(ConfigError, match=r"act_ratio: got 1.5; expected a float in \[0, 1\] or 'auto'"):
        _plan(dims, {"act_ratio": 0.5}, batch=2, act_ratio=1.5)
    _, plan = _plan(dims, {"act_ratio": 0.5, "mini_batch_size": 4}, batch=2, act_ratio=1)
    assert plan.act_ratio == 1.0 and plan.decision is None and plan.profile is None


def test_the_host_budget_splits_the_call_into_waves_largest_first():
    dims = _dims(layers=2, hidden=256, heads=4, kv_heads=4)
    config = HybridServeConfig.from_options({"device": "cpu", "act_ratio": 0.0, "block_size": 16})
    spec = dims.cache_spec(16)
    one = spec.sequence_bytes(0.0, 64)
    plan = plan_call(config, spec, totals=[64, 64, 32, 64, 64], prompt=48, new_tokens=16, overlap=False,
                     host=2 * one, dims=dims, profile=A100)
    assert plan.waves == ((0, 1), (2, 3), (4,))  # in order, each as full as the budget allows
    assert plan.workload == (2, 48, 16)


def test_a_spec_rule_is_in_bytes():
    spec = CacheSpec(num_layers=1, kv_heads=2, head_dim=64, hidden=256, dtype=torch.float16, block_size=16)
    assert not spec.checkpoints_save_bytes  # 256 values both ways
    assert CacheSpec(num_layers=1, kv_heads=2, head_dim=64, hidden=256, dtype=torch.float16, block_size=16,
                     quant="int8").checkpoints_save_bytes


def test_pinned_pools_are_budgeted_as_the_pinned_allocator_rounds_them():
    # Three sequences of 3 KV blocks: 9 blocks take 9 * block bytes pageable, but pinned the pool
    # rounds up to 16 blocks' worth, so a budget of 12 blocks holds only two of them per wave.
    dims = _dims(layers=2, hidden=256, heads=4, kv_heads=4)
    spec = dims.cache_spec(16)
    block = spec.kv_block_bytes
    assert block & (block - 1) == 0  # a power of two: the rounding is in blocks
    budget = 12 * block
    assert admit_waves(spec, 0.0, [48, 48, 48], HostBudget(budget, option=True)) == [[0, 1, 2]]
    assert admit_waves(spec, 0.0, [48, 48, 48], HostBudget(budget, option=True, pinned=True)) == [[0, 1], [2]]
    assert spec.pool_bytes(9, 0, pinned=True) == 16 * block and spec.pool_bytes(9, 0, pinned=False) == 9 * block
    assert [pinned_bytes(n) for n in (0, 1, 5, 8, 9)] == [0, 1, 8, 8, 16]
