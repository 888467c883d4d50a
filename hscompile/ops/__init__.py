"""The ``torch.ops.hybridserve.*`` operators: every runtime step a schedule calls.

All hybridserve ops are registered here, in one namespace, each with a fake (meta)
kernel so graphs holding them can be traced and lowered. The weight-streaming ops are
registered as *ordered effects*: ahead-of-time compilation threads an effect token through
them, so neither dead-code elimination nor reordering can touch them even though they
return nothing (or return a buffer no one reads at trace time).

The real kernels act on the runtime of the compiled model that is running: the executor
binds it for the duration of a call (:func:`hscompile.ops.context.active_runtime`).
Weights are identified by *group*: a decoder layer's index, or
:data:`GLOBAL_GROUP` for the weights outside the layers (embeddings, final norm, head).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ir.layout import GLOBAL_GROUP
from .context import OpRuntime, active_runtime

__all__ = [
    "GLOBAL_GROUP",
    "bound_kernels",
    "attention",
    "cache_attention",
    "cache_commit",
    "cache_step",
    "cache_stub",
    "load_act",
    "load_kv",
    "recompute_kv",
    "store_cache",
    "prefetch_weights",
    "release_weights",
    "to_device",
    "to_host",
    "wait_weights",
]

# -- what each op does to the runtime it acts on --------------------------------------------
#
# One function per op, taking the runtime first: the registered kernels call them with the
# runtime the executor bound, and an interpreter of a schedule may call them directly
# (:func:`bound_kernels`), skipping the dispatcher on the hot path.


def _prefetch_weights(rt: OpRuntime, group: int, nbytes: int) -> None:
    rt.weights.prefetch(group)


def _wait_weights(rt: OpRuntime, group: int, host_weights: Any, device: Any, nbytes: int) -> Tensor:
    return rt.weights.wait(group)


def _release_weights(rt: OpRuntime, group: int, after: Any) -> None:
    rt.weights.release(group)


def _to_device(rt: OpRuntime, x: Tensor, device: torch.device) -> Tensor:
    return rt.copy_in(x, device)


def _to_host(rt: OpRuntime, x: Tensor, device: torch.device) -> Tensor:
    return rt.copy_out(x, device)


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


def _register_ordered_effect(op: torch._ops.OpOverload) -> None:
    register = getattr(torch.library, "_register_effectful_op", None)
    if register is not None:
        register(op, torch.library.EffectType.ORDERED)
    else:  # torch < 2.12 keeps it with the effects machinery
        from torch._higher_order_ops import effects

        effects._register_effectful_op(op, effects._EffectType.ORDERED)


# -- attention ---------------------------------------------------------------------------


@torch.library.custom_op("hybridserve::attention", mutates_args=())
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> Tensor:
    """Scaled dot-product attention of one layer.

    ``query`` is ``(batch, heads, q_len, head_dim)``; ``key``/``value`` are
    ``(batch, kv_heads, kv_len, head_dim)`` with ``kv_heads`` dividing ``heads`` (GQA):
    heads are replicated here, the way transformers' ``repeat_kv`` does, so the result is
    bit-identical to the model's own attention.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return in_attention_layout(out, query, value)


def in_attention_layout(out: Tensor, query: Tensor, value: Tensor) -> Tensor:
    """``out`` in the layout every hybridserve attention op declares (see :func:`_attention_output`).

    SDPA's kernels differ in output layout; compiled partitions downstream were specialised on
    the declared one, so anything else is copied into it.
    """
    layout = _attention_output(query, value)
    if out.stride() != layout.stride():
        layout.copy_(out)
        return layout
    return out


def _attention_output(query: Tensor, value: Tensor) -> Tensor:
    """An empty attention output in the layout of the flash kernels: ``(batch, seq, heads, dim)``
    in memory, viewed as ``(batch, heads, seq, dim)``. The next op (``transpose(1, 2)`` then
    a reshape to ``(batch, seq, hidden)``) is then free."""
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1])).transpose(1, 2)


@attention.register_fake
def _attention_fake(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> Tensor:
    return _attention_output(query, value)


# -- weight streaming ----------------------------------------------------------------------


@torch.library.custom_op("hybridserve::prefetch_weights", mutates_args=())
def prefetch_weights(group: int, nbytes: int) -> None:
    """Start copying ``group``'s weights (``nbytes``) from host memory into its device slot.

    On CUDA the copy runs on the copy stream, after the slot's previous occupant was
    released; on CPU it is a synchronous copy.
    """
    _prefetch_weights(active_runtime("prefetch_weights"), group, nbytes)


@prefetch_weights.register_fake
def _prefetch_weights_fake(group: int, nbytes: int) -> None:
    return None


@torch.library.custom_op("hybridserve::wait_weights", mutates_args=())
def wait_weights(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    """The device buffer (``nbytes`` of uint8) holding ``group``'s weights, once its copy is done.

    ``host_weights`` are the weights as the model holds them (graph inputs): they say which
    tensors the buffer stands for; the schedule carves them out of it with ``as_strided``.
    """
    return _wait_weights(active_runtime("wait_weights"), group, host_weights, device, nbytes)


@wait_weights.register_fake
def _wait_weights_fake(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@torch.library.custom_op("hybridserve::release_weights", mutates_args=())
def release_weights(group: int, after: list[Tensor]) -> None:
    """Give ``group``'s device slot back once the steps producing ``after`` are done with it."""
    _release_weights(active_runtime("release_weights"), group, after)


@release_weights.register_fake
def _release_weights_fake(group: int, after: list[Tensor]) -> None:
    return None


for _op in (prefetch_weights, wait_weights, release_weights):
    _register_ordered_effect(_op._opoverload)


# -- inputs and outputs ---------------------------------------------------------------------


@torch.library.custom_op("hybridserve::to_device", mutates_args=())
def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A user input, copied to the compute device (counted as host-to-device bytes)."""
    return _to_device(active_runtime("to_device"), x, device)


@to_device.register_fake
def _to_device_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)


@torch.library.custom_op("hybridserve::to_host", mutates_args=())
def to_host(x: Tensor, device: torch.device) -> Tensor:
    """A graph output, copied back to the device the model was traced on (counted as device-to-host bytes)."""
    return _to_host(active_runtime("to_host"), x, device)


@to_host.register_fake
def _to_host_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)


# -- the hybrid KV/ACT cache ------------------------------------------------------------------
#
# These run per layer in generation graphs, in this order: load the past tokens' K/V (KV
# blocks) and checkpoints (ACT blocks) from host memory, recompute K/V of the latter, attend
# over past + new tokens, store the new tokens' state. Past-token tensors have a size known
# only at run time; no compiled partition reads them, and their fake kernels return 0 tokens.


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
    return _attention_output(query, value)


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
    _register_ordered_effect(_op._opoverload)


_KERNELS: MappingProxyType[torch._ops.OpOverload, Callable[..., Any]] = MappingProxyType({
    prefetch_weights._opoverload: _prefetch_weights,
    wait_weights._opoverload: _wait_weights,
    release_weights._opoverload: _release_weights,
    to_device._opoverload: _to_device,
    to_host._opoverload: _to_host,
    load_kv._opoverload: _load_kv,
    load_act._opoverload: _load_act,
    recompute_kv._opoverload: _recompute_kv,
    cache_attention._opoverload: _cache_attention,
    store_cache._opoverload: _store_cache,
    cache_step._opoverload: _cache_step,
    cache_commit._opoverload: _cache_commit,
})
"""Each runtime-acting op's body (a constant table, built once at import)."""


def bound_kernels(runtime: OpRuntime) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """Each op a schedule calls, as a plain function acting on ``runtime``: what the registered
    kernel would do under :func:`~hscompile.ops.context.bind`, without the dispatcher and the
    context lookup (several microseconds a call, hundreds of calls a step)."""
    return {op: _bind(kernel, runtime, op.name()) for op, kernel in _KERNELS.items()}


def _bind(kernel: Callable[..., Any], runtime: OpRuntime, name: str) -> Callable[..., Any]:
    profiler = torch.autograd.profiler

    def call(*args: Any, **kwargs: Any) -> Any:
        if profiler._is_profiler_enabled:  # a profile still names the op (the dispatcher would)
            with profiler.record_function(name):
                return kernel(runtime, *args, **kwargs)
        return kernel(runtime, *args, **kwargs)

    call.__name__ = kernel.__name__.lstrip("_")
    return call
