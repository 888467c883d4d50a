"""The ``torch.ops.hybridserve.*`` operators: every runtime step a schedule calls.

All hybridserve ops are registered here, in one namespace, each with a fake (meta)
kernel so graphs holding them can be traced and lowered. The weight-streaming ops are
registered as *ordered effects*: ahead-of-time compilation threads an effect token through
them, so neither dead-code elimination nor reordering can touch them even though they
return nothing (or return a buffer no one reads at trace time).

The real kernels act on the runtime of the compiled model that is running: the executor
binds it for the duration of a call (:func:`hscompile.runtime.context.active_runtime`).
Weights are identified by *group*: a decoder layer's index, or
:data:`GLOBAL_GROUP` for the weights outside the layers (embeddings, final norm, head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import GLOBAL_GROUP
from .runtime.context import active_runtime

__all__ = [
    "GLOBAL_GROUP",
    "attention",
    "prefetch_weights",
    "release_weights",
    "to_device",
    "to_host",
    "wait_weights",
]

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
    layout = _attention_output(query, value)
    if out.stride() != layout.stride():
        # SDPA's kernels differ in output layout; compiled partitions downstream were
        # specialised on the declared one.
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
    active_runtime("prefetch_weights").weights.prefetch(group)


@prefetch_weights.register_fake
def _prefetch_weights_fake(group: int, nbytes: int) -> None:
    return None


@torch.library.custom_op("hybridserve::wait_weights", mutates_args=())
def wait_weights(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    """The device buffer (``nbytes`` of uint8) holding ``group``'s weights, once its copy is done.

    ``host_weights`` are the weights as the model holds them (graph inputs): they say which
    tensors the buffer stands for; the schedule carves them out of it with ``as_strided``.
    """
    return active_runtime("wait_weights").weights.wait(group)


@wait_weights.register_fake
def _wait_weights_fake(group: int, host_weights: list[Tensor], device: torch.device, nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@torch.library.custom_op("hybridserve::release_weights", mutates_args=())
def release_weights(group: int, after: list[Tensor]) -> None:
    """Give ``group``'s device slot back once the steps producing ``after`` are done with it."""
    active_runtime("release_weights").weights.release(group)


@release_weights.register_fake
def _release_weights_fake(group: int, after: list[Tensor]) -> None:
    return None


for _op in (prefetch_weights, wait_weights, release_weights):
    _register_ordered_effect(_op._opoverload)


# -- inputs and outputs ---------------------------------------------------------------------


@torch.library.custom_op("hybridserve::to_device", mutates_args=())
def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A user input, copied to the compute device (counted as host-to-device bytes)."""
    return active_runtime("to_device").copy_in(x, device)


@to_device.register_fake
def _to_device_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)


@torch.library.custom_op("hybridserve::to_host", mutates_args=())
def to_host(x: Tensor, device: torch.device) -> Tensor:
    """A graph output, copied back to the device the model was traced on (counted as device-to-host bytes)."""
    return active_runtime("to_host").copy_out(x, device)


@to_host.register_fake
def _to_host_fake(x: Tensor, device: torch.device) -> Tensor:
    return torch.empty_like(x, device=device)
