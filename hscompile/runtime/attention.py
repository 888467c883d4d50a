"""Attention over the hybrid cache: a step's past K/V assembled beside its new tokens.

Past K/V (loaded, and recomputed from checkpoints) are placed per sequence, left-padded to the
longest past (the layout transformers' own cache has for a left-padded batch), concatenated
with the new tokens' K/V, and attended with the padding mask. Pure functions of a
:class:`~hscompile.runtime.step_plan.StepPlan` and tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import in_attention_layout
from .step_plan import StepPlan

__all__ = ["attend"]


def attend(step: StepPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_kv: torch.Tensor,
           recomputed: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None,
           is_causal: bool) -> torch.Tensor:
    """Attention of the new tokens over past + new K/V, in the layout the model expects."""
    batch, heads, new, _ = query.shape
    kv_heads, head_dim = key.shape[1], key.shape[3]
    width = step.width
    if attn_mask is not None and width and attn_mask.shape[-1] == width + new:
        # The model's own mask already covers its cache (transformers' loop): same layout.
        attn_mask = attn_mask.expand(batch, 1, new, width + new)
        full_mask = True
    else:
        full_mask = False
    if width:
        past = key.new_zeros((batch * width, 2, kv_heads, head_dim))
        if past_kv.numel():
            past.index_copy_(0, step.kv_dest, past_kv.to(key.dtype))
        if recomputed.numel():
            past.index_copy_(0, step.act_dest, recomputed.to(key.dtype))
        past = past.view(batch, width, 2, kv_heads, head_dim)
        key = torch.cat((past[:, :, 0].transpose(1, 2), key), dim=2)
        value = torch.cat((past[:, :, 1].transpose(1, 2), value), dim=2)
        if not full_mask:
            attn_mask, is_causal = _mask(step, attn_mask, is_causal, batch, new, width, query.device)
    groups = heads // kv_heads
    if groups > 1:  # as transformers' repeat_kv: expand, then reshape
        length = key.shape[2]
        key = key[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        value = value[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return in_attention_layout(out, query, value)


def _mask(step: StepPlan, attn_mask: torch.Tensor | None, is_causal: bool, batch: int, new: int, width: int,
          device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The mask over ``[past, new]``, or None where transformers would pass none."""
    if attn_mask is not None and attn_mask.dtype == torch.bool and not step.padded and bool(attn_mask.all()):
        attn_mask = None
    if attn_mask is None and not step.padded and (new == 1 or not is_causal):
        return None, False
    past = torch.tensor(step.past, device=device)
    valid = torch.arange(width, device=device)[None, :] >= (width - past)[:, None]  # (batch, width)
    if attn_mask is None:
        rows = torch.ones(new, new, dtype=torch.bool, device=device)
        current = (rows.tril() if is_causal else rows).expand(batch, 1, new, new)
    else:
        current = attn_mask.expand(batch, 1, new, new)
    before = valid[:, None, None, :].expand(batch, 1, new, width)
    if current.dtype != torch.bool:  # an additive mask
        before = torch.where(before, 0.0, torch.finfo(current.dtype).min).to(current.dtype)
    return torch.cat((before, current), dim=-1), False
