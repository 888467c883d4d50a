from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hscompile.ir.cache import CacheSpec, split_blocks
from hscompile.runtime.blocks import BlockPool, HybridCache

SPEC = CacheSpec(num_layers=2, kv_heads=2, head_dim=4, hidden=16, dtype=torch.float32, block_size=4)


def test_pool_hands_out_each_block_once_and_takes_it_back():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(b.id for b in blocks) == [0, 1, 2] and pool.num_free() == 0
    with pytest.raises(ValueError, match="no free block blocks: all 3 are in use"):
        pool.allocate()
    pool.incref(blocks[0])
    pool.free(blocks[0])
    assert pool.num_free() == 0  # still referenced once
    pool.free(blocks[0])
    assert pool.num_free() == 1


def test_pool_misuse_is_a_runtime_error():
    pool, other = BlockPool(2), BlockPool(2)
    block = pool.allocate()
    pool.free(block)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(block)
    with pytest.raises(RuntimeError, match="incref of free"):
        pool.incref(block)
    foreign = other.allocate()
    foreign.id = 1
    with pytest.raises(RuntimeError, match="does not belong"):
        pool.free(foreign)


@pytest.mark.parametrize(("blocks", "ratio", "act"),
                         [(4, 0.0, 0), (4, 0.25, 1), (4, 0.5, 2), (4, 1.0, 4), (3, 0.5, 2), (1, 0.25, 0)])
def test_step_one_splits_blocks_by_the_ratio_oldest_as_act(blocks, ratio, act):
    kinds = split_blocks(blocks, ratio)
    assert kinds.count("act") == act and kinds == ["act"] * act + ["kv"] * (blocks - act)


def test_block_sizes_follow_the_model_dimensions():
    assert SPEC.kv_block_bytes == 2 * 4 * (2 * 2 * 4) * 4  # layers x tokens x 2*kv_heads*head_dim x fp32
    assert SPEC.act_block_bytes == 2 * 4 * 16 * 4


def test_a_sequence_that_does_not_fit_waits_and_fits_after_a_release():
    cache = HybridCache.allocate(SPEC, 0.5, kv_blocks=2, act_blocks=2)
    assert cache.admit(0, 16)  # 4 blocks: 2 ACT + 2 KV
    assert not cache.admit(1, 4)  # nothing left: it waits, nothing is allocated
    assert cache.kv_pool.num_free() == 0 and 1 not in cache.sequences
    cache.release(0)
    assert cache.admit(1, 4)


def test_growing_keeps_the_ratio_and_grows_the_pools():
    cache = HybridCache.allocate(SPEC, 0.5, kv_blocks=1, act_blocks=1)
    cache.admit(0, 4)
    cache.kv[0, :4] = 7.0
    cache.extend(0, 40)
    table = cache.sequences[0]
    assert len(table.kinds) == 10 and table.kinds.count("act") == 5
    assert table.capacity_tokens == 40
    assert cache.kv.shape[1] >= 5 * 4 and bool((cache.kv[0, :4] == 7.0).all())  # contents survive growth
    with pytest.raises(ValueError, match="cannot grow"):
        cache.extend(0, 400, limit_bytes=cache.kv.numel() * 4 + cache.act.numel() * 4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=30),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
)
def test_no_leaks_and_no_block_owned_twice(operations, ratio):
    cache = HybridCache.allocate(SPEC, ratio, kv_blocks=12, act_blocks=12)
    start = (cache.kv_pool.num_free(), cache.act_pool.num_free())
    next_id = 0
    for admit, tokens in operations:
        if admit or not cache.sequences:
            if cache.admit(next_id, tokens):
                next_id += 1
        else:
            cache.release(next(iter(cache.sequences)))
        owned = [(kind, b.id) for table in cache.sequences.values() for kind, b in zip(table.kinds, table.blocks)]
        assert len(owned) == len(set(owned))
        assert cache.kv_pool.num_free() + sum(k == "kv" for k, _ in owned) == 12
        assert cache.act_pool.num_free() + sum(k == "act" for k, _ in owned) == 12
    for seq in list(cache.sequences):
        cache.release(seq)
    assert (cache.kv_pool.num_free(), cache.act_pool.num_free()) == start
