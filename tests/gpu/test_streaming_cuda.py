"""Weight streaming on CUDA: parity, the budget against the allocator, and copy/compute overlap.

Skipped without CUDA. Models live on the CPU (host memory); compute runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile.errors import BudgetError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(family, layers=16, hidden=256, dtype=torch.float32):
    return tiny_model(family, layers=layers, hidden=hidden, heads=8, kv_heads=4, use_cache=False, dtype=dtype)


def _budget(model, fraction):
    # The CUDA plan keeps a fixed workspace reserve; budget it on top of the weights' fraction.
    return int(weight_bytes(model) * fraction) + 96 * 2**20


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_parity_on_cuda(family, lowering):
    model = _model(family)
    ids = prompts(4, 32)
    with torch.no_grad():
        expected = model(ids).logits
    compiled = torch.compile(model, backend="hybridserve",
                             options={"device": "cuda", "lowering": lowering, "device_memory": _budget(model, 0.3)})
    with torch.no_grad():
        got = compiled(ids).logits
    assert got.device.type == "cpu"  # outputs come back where the model lives
    assert (got - expected).abs().max().item() <= 1e-4
    s = hscompile.inspect(compiled).stats
    assert s["streamed_layers"] > 0


@pytest.mark.parametrize("depth", [1, 2])
def test_budget_holds_against_the_cuda_allocator(depth):
    model = _model("llama", layers=24, hidden=512)
    budget = _budget(model, 0.25)
    compiled = torch.compile(model, backend="hybridserve",
                             options={"device": "cuda", "lowering": "eager", "device_memory": budget, "prefetch_depth": depth})
    ids = prompts(8, 64)
    torch.cuda.synchronize()
    with torch.no_grad():
        compiled(ids)  # compile and build the runtime (resident copies, ring)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    with torch.no_grad():
        compiled(ids)
    torch.cuda.synchronize()
    s = hscompile.inspect(compiled).stats
    assert torch.cuda.max_memory_allocated() <= budget
    assert s["peak_device_bytes"] <= budget
    assert baseline <= s["weight_device_bytes"] + 2**20  # between calls: weights and ring, little else


def test_weights_already_on_the_gpu_cannot_stream():
    model = _model("llama").cuda()
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cuda", "device_memory": 2**20})
    with pytest.raises(BudgetError, match="load the model on the CPU"):
        compiled(prompts().cuda())


def test_copies_overlap_compute():
    model = _model("llama", layers=12, hidden=1024)
    compiled = torch.compile(model, backend="hybridserve",
                             options={"device": "cuda", "lowering": "eager", "device_memory": _budget(model, 0.3)})
    ids = prompts(16, 128)
    with torch.no_grad():
        compiled(ids)
    with hscompile.record_timeline() as timeline, torch.no_grad():
        compiled(ids)
    spans = timeline.spans()
    copies = [s for s in spans if s.lane == "copy: weights"]
    computes = [s for s in spans if s.lane == "compute" and s.args["layer"] is not None]
    assert copies and computes
    # a layer's weights arrive while an earlier layer computes: the copy stream runs beside the compute stream
    overlapping = [(c.label, s.label) for c in copies for s in computes
                   if f"L{s.args['layer']}" != c.label.split()[-1] and c.overlaps(s)]
    assert overlapping, spans


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_streams_on_cuda(dtype):
    model = _model("qwen2", dtype=dtype)
    reference = _model("qwen2")
    ids = prompts(2, 16)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cuda", "device_memory": _budget(model, 0.3)})
    with torch.no_grad():
        got = compiled(ids).logits.float()
        expected = reference(ids).logits
    assert (got - expected).abs().max().item() <= 5e-2
