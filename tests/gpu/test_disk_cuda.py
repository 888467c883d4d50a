"""The disk tier on CUDA: layers read from the checkpoint's files into pinned staging slots by the
reader thread, which waits on CUDA events before it reuses a slot; greedy tokens equal transformers'.

Skipped without CUDA (never run by the session that wrote it: no GPU was lent)."""

from __future__ import annotations

import re

import pytest
import torch
from models import prompts, save_checkpoint

import hscompile
from hscompile.errors import BudgetError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device_fraction", [None, 0.3], ids=["all resident on the GPU", "streamed"])
def test_layers_on_disk_give_transformers_tokens_on_cuda(tmp_path, device_fraction):
    model = save_checkpoint(tmp_path, "llama", tokenizer=False, layers=12, hidden=512).eval()
    with pytest.raises(BudgetError) as refused:
        hscompile.from_pretrained(tmp_path, options={"device": "cuda", "lowering": "eager", "host_memory": 1})
    minimum = int(re.search(r"use host_memory >= (\d+)", str(refused.value)).group(1))
    options = {"device": "cuda", "lowering": "eager", "host_memory": minimum}
    if device_fraction is not None:
        weights = sum(p.nbytes for p in model.parameters())
        options["device_memory"] = int(weights * device_fraction) + 96 * 2**20
    ids = prompts(3, 9)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    generator = hscompile.from_pretrained(tmp_path, options=options)
    for _ in range(2):  # the second call reuses the staging slots the reader thread refills
        assert torch.equal(generator.generate(ids, max_new_tokens=6), expected)
    stats = generator.stats()
    assert stats["disk_reads"] > 0
    if device_fraction is not None:
        assert stats["disk_layers"] > 0 and stats["host_syncs_per_step"] == 1.0


@pytest.mark.parametrize("act_ratio", [0.0, 0.5])
def test_cache_blocks_on_disk_give_the_same_tokens_on_cuda(tmp_path, act_ratio):
    # Pinned staging for the file's runs, stores copied to pinned memory and written after the fetch.
    from models import tiny_model

    model = tiny_model("opt", layers=2)
    ids = prompts(4, 9)
    options = {"device": "cuda", "lowering": "eager", "act_ratio": act_ratio, "block_size": 4,
               "offload_dir": str(tmp_path)}
    probe = hscompile.Generator(model, options)
    per_sequence = probe.spec.pool_bytes(*probe.spec.blocks_for(act_ratio, 9 + 6), pinned=True)
    expected = probe.generate(ids, max_new_tokens=6)
    generator = hscompile.Generator(model, {**options, "host_memory": int(1.5 * per_sequence), "disk_cache": "on"})
    assert torch.equal(generator.generate(ids, max_new_tokens=6), expected)
    stats = generator.stats()
    assert stats["cache_disk_read_bytes"] > 0 and stats["cache_disk_write_bytes"] > 0
    assert stats["host_syncs_per_step"] == 1.0
