"""Helpers for tests that stream weights."""

from __future__ import annotations

import torch

import hscompile


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def compile_streaming(model, *, fraction: float | None = None, budget: int | None = None, lowering="eager", **options):
    """``model`` compiled for the CPU with a device budget of ``fraction`` of its weights (or ``budget`` bytes)."""
    if fraction is not None:
        budget = int(weight_bytes(model) * fraction)
    opts = {"device": "cpu", "lowering": lowering, **options}
    if budget is not None:
        opts["device_memory"] = budget
    return torch.compile(model, backend="hybridserve", options=opts)


def run(compiled, ids):
    with torch.no_grad():
        out = compiled(ids)
    return out.logits if hasattr(out, "logits") else out


def stats(compiled):
    return hscompile.inspect(compiled).stats
