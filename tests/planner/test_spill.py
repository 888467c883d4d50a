"""Cache blocks on disk or waves (planner/spill.py): the ``disk_cache`` option and the cost model's
choice between them, made once per call in its plan."""

from __future__ import annotations

import dataclasses
import shutil
from collections import namedtuple

import pytest
from test_choice import A100, _dims

from hscompile.config import HybridServeConfig
from hscompile.errors import BudgetError, ConfigError
from hscompile.planner.budget import HostBudget
from hscompile.planner.choice import plan_call
from hscompile.planner.spill import disk_traffic, host_share

PROMPT, NEW = 128, 32


def _call(tmp_path, dims, options, *, batch=8, host_sequences=2.5, prompt=PROMPT, profile=A100):
    config = HybridServeConfig.from_options({"device": "cpu", "act_ratio": 0.0, "offload_dir": str(tmp_path),
                                             "device_memory": "8GiB", **options})
    spec = dims.cache_spec(config.cache.block_size)
    budget = HostBudget(int(host_sequences * spec.sequence_bytes(0.0, prompt + NEW)), option=True)
    plan = plan_call(config, spec, totals=[prompt + NEW] * batch, prompt=prompt, new_tokens=NEW, overlap=True,
                     host=budget, dims=dims, profile=profile)
    return spec, budget, plan


def test_weights_read_from_disk_at_every_step_make_one_batch_with_blocks_on_disk_faster_than_waves(tmp_path):
    dims = dataclasses.replace(_dims(), disk_layers=24)
    spec, budget, plan = _call(tmp_path, dims, {})
    spill = plan.spill
    assert spill is not None and plan.waves == (tuple(range(8)),)
    assert spill.waves == 4 and spill.seconds < spill.waves_seconds  # four passes over the disk's weights, or one
    assert spill.directory == str(tmp_path)
    # The host pools keep what fits the budget; the rest of the batch's blocks are on disk.
    blocks = 8 * spec.blocks_for(0.0, PROMPT + NEW)[0]
    assert spill.host_blocks[0] + spill.disk_blocks[0] == blocks and spill.disk_blocks[1] == 0
    assert spec.pool_bytes(*spill.host_blocks, pinned=False) <= budget.nbytes
    assert spill.disk_bytes == spill.disk_blocks[0] * spec.kv_block_bytes


def test_long_contexts_over_a_fast_link_keep_the_waves(tmp_path):
    # Weights over a 25 GB/s link, and every step would read each token's 512 KiB of K/V from a 2 GB/s disk.
    _, _, plan = _call(tmp_path, _dims(), {}, prompt=2048)
    assert plan.spill is None and len(plan.waves) == 4


def test_a_faster_disk_turns_the_choice_to_blocks_on_disk(tmp_path):
    fast = dataclasses.replace(A100, disk_bytes_per_s=1e12)  # as fast as memory: the cache's reads cost nothing
    _, _, plan = _call(tmp_path, _dims(), {}, prompt=2048, profile=fast)
    assert plan.spill is not None and plan.spill.seconds < plan.spill.waves_seconds


def test_the_option_forces_either_answer(tmp_path):
    dims = _dims()
    _, _, on = _call(tmp_path, dims, {"disk_cache": "on"}, prompt=2048)
    assert on.spill is not None and on.spill.waves_seconds is None and on.spill.waves == 4 and len(on.waves) == 1
    fast = dataclasses.replace(_dims(), disk_layers=24)
    _, _, off = _call(tmp_path, fast, {"disk_cache": "off"})
    assert off.spill is None and len(off.waves) == 4


def test_a_sequence_the_host_budget_cannot_hold_alone_goes_to_disk_unless_the_option_is_off(tmp_path):
    _, _, plan = _call(tmp_path, _dims(), {}, host_sequences=0.5)
    assert plan.spill is not None and plan.spill.waves == 0 and len(plan.waves) == 1
    with pytest.raises(BudgetError, match="cannot hold even one sequence"):
        _call(tmp_path, _dims(), {"disk_cache": "off"}, host_sequences=0.5)


def test_a_disk_without_room_is_refused_when_asked_for_and_keeps_the_waves_otherwise(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(BudgetError, match=rf"offload_dir {tmp_path} has 1000 B free, and the cache blocks "
                                          r"host_memory=.* cannot hold take .*: free space, give another offload_dir"):
        _call(tmp_path, _dims(), {"disk_cache": "on"})
    dims = dataclasses.replace(_dims(), disk_layers=24)
    assert _call(tmp_path, dims, {})[2].spill is None


def test_a_missing_offload_dir_is_refused_when_blocks_would_go_there(tmp_path):
    with pytest.raises(ConfigError, match=rf"offload_dir {tmp_path}/missing does not exist .*disk_cache='off'"):
        _call(tmp_path / "missing", _dims(), {"disk_cache": "on"})


def test_the_host_share_is_the_largest_that_fits():
    spec = _dims(layers=2, hidden=256, heads=4, kv_heads=4).cache_spec(16)
    budget = HostBudget(10 * spec.kv_block_bytes + 5 * spec.act_block_bytes + 1, option=True)
    kept = host_share(spec, 40, 20, budget)
    assert kept == (10, 5)
    assert host_share(spec, 40, 20, HostBudget(0, option=True)) == (0, 0)
    assert host_share(spec, 4, 2, HostBudget(10**9, option=True)) == (4, 2)


def test_disk_traffic_counts_the_past_each_step_reads_and_each_token_written_once():
    spec = _dims(layers=2, hidden=256, heads=4, kv_heads=4).cache_spec(16)
    assert disk_traffic(spec, batch=4, prompt=10, new_tokens=5, blocks=(8, 0), disk_blocks=(0, 0)) == 0
    every = disk_traffic(spec, batch=4, prompt=10, new_tokens=5, blocks=(8, 0), disk_blocks=(8, 0))
    # 4 decode steps read 10, 11, 12, 13 past tokens; 15 tokens written: per sequence, per layer.
    assert every == 4 * (46 + 15) * spec.kv_row_bytes * 2
    half = disk_traffic(spec, batch=4, prompt=10, new_tokens=5, blocks=(8, 0), disk_blocks=(4, 0))
    assert half == every // 2


def test_an_auto_ratio_counts_the_disk_bytes_checkpoints_save():
    # MHA: a checkpoint is half the bytes of a token's K/V, on disk as over the link. Compute is
    # cheap on this profile, so the ratio that reads the fewest bytes from disk wins once blocks spill.
    dims = dataclasses.replace(_dims(), disk_layers=24)
    config = HybridServeConfig.from_options({"device": "cpu", "act_ratio": "auto", "device_memory": "8GiB",
                                             "disk_cache": "on"})
    spec = dims.cache_spec(16)
    budget = HostBudget(spec.sequence_bytes(0.0, 2048 + NEW), option=True)
    plan = plan_call(config, spec, totals=[2048 + NEW] * 8, prompt=2048, new_tokens=NEW, overlap=True, host=budget,
                     dims=dims, profile=A100)
    spill = plan.spill
    assert spill is not None and plan.act_ratio == spill.act_ratio > 0 and spill.disk_blocks[1] > 0
    fixed = plan_call(HybridServeConfig.from_options({"device": "cpu", "act_ratio": 0.0, "device_memory": "8GiB",
                                                      "disk_cache": "on"}), spec, totals=[2048 + NEW] * 8,
                      prompt=2048, new_tokens=NEW, overlap=True, host=budget, dims=dims, profile=A100)
    assert fixed.act_ratio == 0.0 and fixed.spill.seconds > spill.seconds
