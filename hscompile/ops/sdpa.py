"""``hybridserve::attention``: one layer's scaled dot-product attention, and the output layout
every hybridserve attention op declares (:func:`in_attention_layout`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "attention_output", "in_attention_layout"]


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
    """``out`` in the layout every hybridserve attention op declares (see :func:`attention_output`).

    SDPA's kernels differ in output layout; compiled partitions downstream were specialised on
    the declared one, so anything else is copied into it.
    """
    layout = attention_output(query, value)
    if out.stride() != layout.stride():
        layout.copy_(out)
        return layout
    return out


def attention_output(query: Tensor, value: Tensor) -> Tensor:
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
    return attention_output(query, value)
