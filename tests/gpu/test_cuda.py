"""CUDA checks; skipped on machines without a GPU. Run them wherever one is available."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, prompts, tiny_model

import hscompile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_on_cuda_fp32(family, lowering):
    model = tiny_model(family, layers=3).cuda()
    ids = prompts(3, 11).cuda()
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cuda", "lowering": lowering})
    with torch.no_grad():
        expected, got = model(ids).logits, compiled(ids).logits
    assert got.device.type == "cuda"
    assert (got - expected).abs().max().item() <= 1e-4
    assert hscompile.inspect(compiled).stats["calls"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_on_cuda_is_close_to_fp32(family, dtype):
    model32 = tiny_model(family, layers=2).cuda()
    model = tiny_model(family, layers=2, dtype=dtype).cuda()
    ids = prompts(2, 9).cuda()
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cuda"})
    with torch.no_grad():
        reference, expected, got = model32(ids).logits, model(ids).logits.float(), compiled(ids).logits.float()
    # Against the same-dtype eager model: kernels may differ in rounding only.
    assert (got - expected).abs().max().item() <= 2e-2
    assert (got - reference).abs().max().item() <= 5e-2
