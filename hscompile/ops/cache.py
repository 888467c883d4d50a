"""The hybrid KV/ACT cache ops, acting on the bound runtime's cache.

These run per layer in generation graphs, in this order: load the past tokens' K/V (KV
blocks) and checkpoints (ACT blocks) from host memory, recompute K/V of the latter, attend
over past + new tokens, store the new tokens' state. Past-token tensors have a size known
only at run time; no compiled partition reads them, and their fake kernels return 0 tokens.
``cache_step`` and ``cache_commit`` open and close a step; ``cache_stub`` stands in for the
transformers cache's concatenation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .context import OpRuntime, active_runtime
from .effects import register_ordered_effect
from .sdpa import attention_output

__all__ = ["KERNELS", "cache_attention", "cache_commit", "cache_step", "cache_stub", "load_act", "load_kv",
           "recompute_kv", "store_cache"]


def _cache(rt: OpRuntime) -> Any:
    assert rt.cache is not None, "a cache op ran in a graph compiled without the hybrid cache"
    return rt.cache


def _load_kv(rt: OpRuntime, layer: int, device: Any) -> Tensor:
    return _cache(rt).load_kv(layer)


def _load_act(rt: OpRuntime, layer: int, device: Any) -> Tensor:
    return _cache(rt).load_act(layer)


def _recompute_kv(rt: OpRuntime, layer: int, act: Tensor, weights: Any, rotary_weights: Any) -> Tensor:
    return _cache(rt).recompute(layer, act, weights, rotary_weights)


def _cache_attention(rt: OpRuntime, layer: int, query: Tensor, key: Tensor, value: Tensor, past_kv: Tensor,
                     recomputed_kv: Tensor, attn_mask: Tensor | None, scale: float | None, is_causal: bool) -> Tensor:
    return _cache(rt).attend(layer, query, key, value, past_kv, recomputed_kv, attn_mask, scale, is_causal)


def _store_cache(rt: OpRuntime, layer: int, key: Tensor, value: Tensor, hidden: Tensor, positions: Any) -> None:
    _cache(rt).store(layer, key, value, hidden, positions)


def _cache_step(rt: OpRuntime, hidden: Tensor, past: Any) -> None:
    _cache(rt).step_begin(hidden, past)


def _cache_commit(rt: OpRuntime, after: Any) -> None:
    _cache(rt).end_step()


@torch.library.custom_op("hybridserve::load_kv", mutates_args=())
def load_kv(layer: int, device: torch.device) -> Tensor:
    """K/V of the past tokens cached as KV blocks, on ``device``: ``(N_kv, 2, kv_heads, head_dim)``."""
    return _load_kv(active_runtime("load_kv"), layer, device)


@load_kv.register_fake
def _load_kv_fake(layer: int, device: torch.device) -> Tensor:
    return torch.empty(0, device=device)


@torch.library.custom_op("hybridserve::load_act", mutates_args=())
def load_act(layer: int, device: torch.device) -> Tensor:
    """Checkpoints (layer inputs) of the past tokens cached as ACT blocks: ``(N_act, hidden)``."""
    return _load_act(active_runtime("load_act"), layer, device)


@load_act.register_fake
def _load_act_fake(layer: int, device: torch.device) -> Tensor:
    return torch.empty(0, device=device)


@torch.library.custom_op("hybridserve::recompute_kv", mutates_args=())
def recompute_kv(layer: int, act: Tensor, weights: list[Tensor], rotary_weights: list[Tensor]) -> Tensor:
    """K/V of ACT-cached tokens, recomputed by the layer's slice from their checkpoints ``act``,
    with rotary at their true positions: ``(N_act, 2, kv_heads, head_dim)``."""
    return _recompute_kv(active_runtime("recompute_kv"), layer, act, weights, rotary_weights)


@recompute_kv.register_fake
def _recompute_kv_fake(layer: int, act: Tensor, weights: list[Tensor], rotary_weights: list[Tensor]) -> Tensor:
    return torch.empty(0, device=act.device)


@torch.library.custom_op("hybridserve::cache_attention", mutates_args=())
def cache_attention(
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_kv: Tensor,
    recomputed_kv: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> Tensor:
    """Attention of the new tokens over each sequence's past (loaded and recomputed K/V) and themselves.

    The past is laid out per sequence as transformers lays out its cache (left-padded to the
    longest sequence), so the result matches the model's own attention over its cache.
    """
    return _cache_attention(active_runtime("cache_attention"), layer, query, key, value, past_kv, recomputed_kv,
                            attn_mask, scale, is_causal)


@cache_attention.register_fake
def _cache_attention_fake(
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_kv: Tensor,
    recomputed_kv: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> Tensor:
    return attention_output(query, value)


@torch.library.custom_op("hybridserve::store_cache", mutates_args=())
def store_cache(layer: int, key: Tensor, value: Tensor, hidden: Tensor, positions: Tensor | None) -> None:
    """Store the new tokens' state in host blocks: K/V for tokens placed in KV blocks, the layer
    input ``hidden`` (the checkpoint) for tokens placed in ACT blocks."""
    _store_cache(active_runtime("store_cache"), layer, key, value, hidden, positions)


@store_cache.register_fake
def _store_cache_fake(layer: int, key: Tensor, value: Tensor, hidden: Tensor, positions: Tensor | None) -> None:
    return None


@torch.library.custom_op("hybridserve::cache_step", mutates_args=())
def cache_step(hidden: Tensor, past: Tensor | None) -> None:
    """Start a step of the hybrid cache: ``hidden`` (the first layer's input) gives the batch and
    the new tokens; ``past`` is the transformers cache's past K of the first layer, if the
    model carries one. The generator's request, or these, say which tokens are real and new."""
    _cache_step(active_runtime("cache_step"), hidden, past)


@cache_step.register_fake
def _cache_step_fake(hidden: Tensor, past: Tensor | None) -> None:
    return None


@torch.library.custom_op("hybridserve::cache_commit", mutates_args=())
def cache_commit(after: list[Tensor]) -> None:
    """End the step once ``after`` (the graph's results) are computed: the new tokens join the past."""
    _cache_commit(active_runtime("cache_commit"), after)


@cache_commit.register_fake
def _cache_commit_fake(after: list[Tensor]) -> None:
    return None


@torch.library.custom_op("hybridserve::cache_stub", mutates_args=())
def cache_stub(past: Tensor, new: Tensor) -> Tensor:
    """What a transformers cache receives instead of ``cat([past, new], dim=-2)``: a tensor of
    that shape that holds no memory (an expanded scalar). The cache's length bookkeeping stays
    right; the state lives in the hybrid cache. The scalar is NaN, so that reading these
    placeholders anywhere but in the same compiled model fails loudly."""
    return _stub_scalar(new).expand(_stub_shape(past, new))


def _stub_scalar(new: Tensor) -> Tensor:
    return new.new_full((), float("nan")) if new.dtype.is_floating_point else new.new_zeros(())


def _stub_shape(past: Tensor, new: Tensor) -> tuple[int, ...]:
    # transformers starts an empty cache as a 1-D empty tensor.
    before = past.shape[-2] if past.dim() >= 2 else 0
    return (*new.shape[:-2], before + new.shape[-2], new.shape[-1])


@cache_stub.register_fake
def _cache_stub_fake(past: Tensor, new: Tensor) -> Tensor:
    return _stub_scalar(new).expand(_stub_shape(past, new))


for _op in (load_kv, load_act, recompute_kv, cache_attention, store_cache, cache_step, cache_commit):
    register_ordered_effect(_op._opoverload)

KERNELS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    load_kv._opoverload: _load_kv,
    load_act._opoverload: _load_act,
    recompute_kv._opoverload: _recompute_kv,
    cache_attention._opoverload: _cache_attention,
    store_cache._opoverload: _store_cache,
    cache_step._opoverload: _cache_step,
    cache_commit._opoverload: _cache_commit,
}
"""Each runtime-acting op's body, taking the runtime first (see :mod:`hscompile.ops.kernels`)."""
