"""Step planning: where every past token of a step is, where it lands, and where new tokens go.

Once per step and mini-batch (never per layer), :func:`plan_step` reads the allocator's block
tables and makes a :class:`StepPlan`:

* the **attention layout**: row ``b`` of the mini-batch's attention buffer holds sequence ``b``'s
  token ``j`` at column ``pad_b + j``, left-padded to the longest past ``width`` (the layout
  transformers' own cache has for a left-padded batch); the step's new tokens are appended at
  columns ``width .. width + new - 1``. In decode every sequence grows by one token a step, so
  ``pad_b`` stays put and a column, once written, keeps holding the same token;
* the **loads** as contiguous runs ``(first pool slot, first buffer token, tokens)``: a sequence's
  blocks of one kind are allocated consecutively, so its past is one run per kind, and a run is
  one copy straight from the pool into the buffer attention reads (no gather);
* the buffer positions of the checkpointed tokens (their recomputed K/V are placed there) and the
  pool slots the new real tokens are stored in;
* the attention mask over ``[past, new]``, built on the device the first time a layer asks and
  reused by every other layer of the step.

Nothing here touches K/V data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import HybridCache

__all__ = ["PositionTable", "StepPlan", "plan_step"]

Run = tuple[int, int, int]
"""``(first pool slot, first destination index, tokens)``: one contiguous copy."""


@dataclass(slots=True)
class StepPlan:
    """The plan of one step (one mini-batch of it), shared by every layer."""

    batch: int
    new_tokens: int
    sequences: list[int]
    """The cache's sequence ids of this plan's rows, in row order."""
    past: list[int]
    width: int
    """Past length of the longest sequence: the column the new tokens are appended at."""
    columns: int
    """Columns of the attention buffer the token indices below were computed for."""
    padded: bool
    kv_runs: list[Run]
    """Past K/V: pool slot -> buffer token (``row * columns + column``)."""
    act_runs: list[Run]
    """Past checkpoints: pool slot -> position in the checkpoint buffer."""
    act_tokens: int
    act_dest: torch.Tensor
    """Buffer token of each checkpoint (in ``act_runs`` order): where its recomputed K/V go."""
    act_slots: torch.Tensor
    """Pool slot of each checkpoint (in ``act_runs`` order), on the device: looks up its position."""
    store_kv_src: torch.Tensor
    """New tokens stored as K/V: their index in the step's ``batch * new`` tokens (device)."""
    store_kv_runs: list[Run]
    """Their pool slots, as runs over the packed new tokens: ``(slot, packed index, tokens)``."""
    store_kv_slots: torch.Tensor
    store_act_src: torch.Tensor
    store_act_runs: list[Run]
    store_act_slots: torch.Tensor
    store_act_slots_device: torch.Tensor
    past_device: torch.Tensor
    """``past`` on the device (the mask's padding)."""
    new_kv: list[int]
    new_act: list[int]
    every_new_token_is_kv: bool
    """All ``batch * new`` new tokens are real and stored as K/V, in row order (a decode step
    without checkpoints): they can be stored straight from the attention buffer."""
    _mask_key: Any = None
    _mask: tuple[torch.Tensor | None, bool] | None = field(default=None)

    def mask(self, attn_mask: torch.Tensor | None, is_causal: bool, device: torch.device,
             check: Any) -> tuple[torch.Tensor | None, bool]:
        """The mask over ``[past, new]`` (and the causal flag) for SDPA, or None where
        transformers would pass none. Built once per step: every layer passes the model's same
        mask. ``check(tensor) -> bool`` reads a device boolean (a counted host wait)."""
        if self._mask is not None and self._mask_key[0] is attn_mask and self._mask_key[1] == is_causal:
            return self._mask
        self._mask_key = (attn_mask, is_causal)
        self._mask = _mask(self, attn_mask, is_causal, device, check)
        return self._mask


def _mask(step: StepPlan, attn_mask: torch.Tensor | None, is_causal: bool, device: torch.device,
          check: Any) -> tuple[torch.Tensor | None, bool]:
    batch, new, width = step.batch, step.new_tokens, step.width
    if attn_mask is not None and attn_mask.shape[-1] == width + new:
        # The model's own mask already covers its cache (transformers' loop): same layout.
        return attn_mask.expand(batch, 1, new, width + new), is_causal
    if attn_mask is not None and attn_mask.dtype == torch.bool and not step.padded:
        # One new token attends to every (unpadded) past token and to itself; several read the
        # model's mask among themselves, which may be all True.
        if new == 1 or check(attn_mask.all()):
            attn_mask = None
    if attn_mask is None and not step.padded and (new == 1 or not is_causal):
        return None, False
    past = step.past_device
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


def _merge(runs: list[Run], slot: int, dest: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == dest:
        first = runs[-1]
        runs[-1] = (first[0], first[1], first[2] + count)
    else:
        runs.append((slot, dest, count))


def plan_step(cache: HybridCache, real: torch.Tensor, sequences: list[int], columns: int,
              upload: Callable[[torch.Tensor], torch.Tensor]) -> StepPlan:
    """The plan of a step whose rows are ``sequences`` and whose new tokens are ``real``
    (``(batch, new)`` bool: False for padding, which is not stored), for an attention buffer of
    ``columns`` columns (see the module docstring). ``upload`` puts a host tensor on the device
    without a host wait (:meth:`~hscompile.runtime.device_base.DeviceBackend.upload`): the plan's
    device indices travel in one copy."""
    batch, new = real.shape
    past = [cache.sequences[s].length for s in sequences]
    width = max(past)
    kv_runs: list[Run] = []
    act_runs: list[Run] = []
    act_dest: list[int] = []
    act_slots: list[int] = []
    store_kv_src: list[int] = []
    store_act_src: list[int] = []
    store_kv_runs: list[Run] = []
    store_act_runs: list[Run] = []
    store_kv_slots: list[int] = []
    store_act_slots: list[int] = []
    new_kv: list[int] = []
    new_act: list[int] = []
    all_real = bool(real.all())
    for b, seq in enumerate(sequences):
        base = b * columns + width - past[b]
        for kind, slot, token, count in cache.pieces(seq, 0, past[b]):
            if kind == "kv":
                _merge(kv_runs, slot, base + token, count)
            else:
                _merge(act_runs, slot, len(act_dest), count)
                act_dest.extend(range(base + token, base + token + count))
                act_slots.extend(range(slot, slot + count))
        columns_real = range(new) if all_real else real[b].nonzero().flatten().tolist()
        stored = len(columns_real)
        capacity = cache.sequences[seq].capacity_tokens
        if past[b] + stored > capacity:
            raise RuntimeError(f"sequence {seq} needs {past[b] + stored} cache tokens but was admitted for {capacity}")
        kv_here = act_here = 0
        for kind, slot, token, count in cache.pieces(seq, past[b], past[b] + stored):
            sources = [b * new + columns_real[token - past[b] + i] for i in range(count)]
            if kind == "kv":
                _merge(store_kv_runs, slot, len(store_kv_src), count)
                store_kv_src.extend(sources)
                store_kv_slots.extend(range(slot, slot + count))
                kv_here += count
            else:
                _merge(store_act_runs, slot, len(store_act_src), count)
                store_act_src.extend(sources)
                store_act_slots.extend(range(slot, slot + count))
                act_here += count
        new_kv.append(kv_here)
        new_act.append(act_here)

    # The indices the device needs, in one host tensor and one copy (a pageable copy apiece would
    # each make the host wait for the compute stream on CUDA).
    on_device = (act_dest, act_slots, store_kv_src, store_act_src, store_act_slots, past)
    ends = list(itertools.accumulate(len(v) for v in on_device))
    uploaded = upload(torch.tensor([i for values in on_device for i in values], dtype=torch.long))
    act_dest_d, act_slots_d, store_kv_src_d, store_act_src_d, store_act_slots_d, past_d = (
        uploaded[end - len(values):end] for values, end in zip(on_device, ends, strict=True))

    def tensor(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return StepPlan(
        batch=batch,
        new_tokens=new,
        sequences=sequences,
        past=past,
        width=width,
        columns=columns,
        padded=any(p != width for p in past),
        kv_runs=kv_runs,
        act_runs=act_runs,
        act_tokens=len(act_dest),
        act_dest=act_dest_d,
        act_slots=act_slots_d,
        store_kv_src=store_kv_src_d,
        store_kv_runs=store_kv_runs,
        store_kv_slots=tensor(store_kv_slots),
        store_act_src=store_act_src_d,
        store_act_runs=store_act_runs,
        store_act_slots=tensor(store_act_slots),
        store_act_slots_device=store_act_slots_d,
        past_device=past_d,
        new_kv=new_kv,
        new_act=new_act,
        every_new_token_is_kv=all_real and len(store_kv_src) == batch * new
        and store_kv_src == list(range(batch * new)),
    )


class PositionTable:
    """The position each checkpoint slot of the ACT pool was stored at, on the device: recompute
    applies rotary at it. (A token's position is its index among the sequence's real tokens on
    the generator's path, but transformers' own loop stores padding too, with its own positions.)"""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)

    def grow(self, slots: int) -> None:
        if self.positions.numel() < slots:
            grown = self.positions.new_zeros(slots)
            grown[: self.positions.numel()] = self.positions
            self.positions = grown

    def record(self, step: StepPlan, positions: torch.Tensor) -> None:
        """Remember the positions of the step's tokens stored as checkpoints."""
        if step.store_act_src.numel():
            flat = positions.expand(step.batch, step.new_tokens).reshape(-1)
            self.positions.index_copy_(0, step.store_act_slots_device, flat[step.store_act_src])

    def of(self, step: StepPlan) -> torch.Tensor:
        """Positions of the step's past checkpoints, in ``act_runs`` order."""
        return self.positions[step.act_slots]
