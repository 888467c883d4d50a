"""Attention over the hybrid cache, reading the past where it landed.

The loads put each sequence's past K/V in the mini-batch's attention buffer (left-padded,
see :mod:`~hscompile.runtime.step_plan`); here the recomputed K/V of checkpointed tokens are
placed beside them and the new tokens' K/V appended in place, each written once. SDPA then reads
the buffer as strided views, grouped-query heads included (``enable_gqa``: no head is copied).
Pure functions of a plan and tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..ops import in_attention_layout
from .step_plan import StepPlan

__all__ = ["attend", "read_bytes"]


def read_bytes(step: StepPlan, key: torch.Tensor) -> int:
    """Bytes of K and V one layer's attention reads: past + new tokens of every row."""
    batch, kv_heads, new, head_dim = key.shape
    return batch * (step.width + new) * 2 * kv_heads * head_dim * key.element_size()


def attend(step: StepPlan, buffer: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           recomputed: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None, is_causal: bool,
           check: Any) -> tuple[torch.Tensor, int]:
    """Attention of the new tokens over past + new K/V, in the layout the model expects, and the
    bytes written to assemble its inputs (recomputed K/V placed, new K/V appended). ``buffer`` is
    the mini-batch's attention buffer with the past loaded (unused when the step has no past)."""
    batch, heads, new, _ = query.shape
    kv_heads = key.shape[1]
    width = step.width
    written = 0
    if width == 0:
        # No past (a prefill): the new tokens' K/V as the partition produced them.
        past_key, past_value = key, value
    else:
        rows = buffer[:batch]
        if recomputed.numel():
            rows.view(-1, *rows.shape[2:]).index_copy_(0, step.act_dest, recomputed.to(rows.dtype))
            written += recomputed.numel() * rows.element_size()
        appended = rows[:, width:width + new]
        appended[:, :, 0].copy_(key.transpose(1, 2))
        appended[:, :, 1].copy_(value.transpose(1, 2))
        written += 2 * key.numel() * rows.element_size()
        past_key = rows[:, : width + new, 0].transpose(1, 2)
        past_value = rows[:, : width + new, 1].transpose(1, 2)
        attn_mask, is_causal = step.mask(attn_mask, is_causal, query.device, check)
    out = F.scaled_dot_product_attention(query, past_key, past_value, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=heads != kv_heads)
    return in_attention_layout(out, query, past_value), written
