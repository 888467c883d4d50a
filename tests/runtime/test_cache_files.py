"""Cache blocks on disk (runtime/spill.py, runtime/blocks.py): the files past the host pools."""

from __future__ import annotations

import os

import pytest
import torch

from hscompile.errors import BudgetError, CheckpointError
from hscompile.ir.cache import CacheSpec
from hscompile.runtime.blocks import HybridCache
from hscompile.runtime.spill import CacheFile, split_runs


def test_runs_are_split_where_the_host_pool_ends():
    runs = [(0, 0, 4), (6, 4, 6), (12, 10, 3)]
    below, past = split_runs(runs, 8)
    assert below == [(0, 0, 4), (6, 4, 2)]
    assert past == [(0, 6, 4), (4, 10, 3)]  # slots counted from the boundary, destinations kept
    assert split_runs(runs, 0) == ([], [(0, 0, 4), (6, 4, 6), (12, 10, 3)])
    assert split_runs(runs, 100) == (runs, [])


def test_a_cache_file_holds_rows_per_layer_and_leaves_nothing_in_its_directory(tmp_path):
    file = CacheFile(tmp_path, kind="kv", layers=3, slots=10, row_bytes=8)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up, whatever ends the process
    rows = torch.arange(3 * 10 * 2, dtype=torch.float32).view(3, 10, 2)
    for layer in range(3):
        file.write(layer, 0, rows[layer])
    out = torch.empty(4, 2)
    file.read(1, 5, 4, out)
    assert torch.equal(out, rows[1, 5:9])
    assert file.read_bytes == 32 and file.write_bytes == 3 * 80
    with pytest.raises(RuntimeError, match=r"layer 3 slots 0..1 outside 3 layers of 10 slots"):
        file.read(3, 0, 1, out)
    file.close()
    with pytest.raises(CheckpointError, match=r"reading 32 bytes of KV cache blocks at byte 120 .* failed"):
        file.read(1, 5, 4, out)


def test_a_cache_file_the_disk_has_no_room_for_is_a_budget_error_naming_the_directory(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(BudgetError, match=rf"offload_dir {tmp_path} has no room for .* \(4000 bytes\) of ACT cache "
                                          r"blocks past host_memory: No space left on device; .*disk_cache='off'"):
        CacheFile(tmp_path, kind="act", layers=2, slots=100, row_bytes=20)
    assert list(tmp_path.iterdir()) == []


def test_a_pool_larger_than_its_host_part_keeps_the_rest_in_files(tmp_path):
    spec = CacheSpec(num_layers=2, kv_heads=1, head_dim=2, hidden=4, dtype=torch.float32, block_size=2)
    cache = HybridCache.allocate(spec, 0.5, 4, 4, host_blocks=(1, 3), spill_dir=str(tmp_path))
    assert cache.host_slots("kv") == 2 and cache.slots("kv") == 8 and cache.kv_file is not None
    assert cache.host_slots("act") == 6 and cache.act_file is not None and cache.disk_blocks == 4
    # Rows across the boundary: written and read back through both homes.
    rows = torch.randn(2, 5, 2, 1, 2)
    cache.set_rows("kv", 1, rows)
    assert torch.equal(cache.rows("kv", 1, 5), rows)
    assert torch.equal(cache.kv[:, 1], rows[:, 0])
    assert cache.kv_file.write_bytes == 2 * 4 * spec.kv_row_bytes
    everything = HybridCache.allocate(spec, 0.5, 4, 4, host_blocks=(9, 9), spill_dir=None)
    assert everything.kv_file is None and everything.act_file is None and everything.disk_blocks == 0
    cache.close()
