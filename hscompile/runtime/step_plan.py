"""Step planning: where every past token of a step is, and where every new token goes.

:class:`BlockTables` mirrors the allocator's block tables as index tensors (block ids and ACT
flags per sequence, and the position each pool slot was stored at) and turns a step's request
into a :class:`StepPlan`: the pool slots of every past token split by kind, where each lands in
the attention layout, and the slots the new tokens are stored in. Every layer of the step uses
the same plan; nothing here touches K/V data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .blocks import HybridCache

__all__ = ["BlockTables", "StepPlan"]


@dataclass(slots=True)
class StepPlan:
    """Index plan of one step (one mini-batch of it), shared by every layer."""

    batch: int
    new_tokens: int
    sequences: list[int]
    """The cache's sequence ids of this plan's rows, in row order."""
    past: list[int]
    width: int
    """Past length of the longest sequence: the padded layout's past width."""
    padded: bool
    kv_slots: torch.Tensor
    kv_dest: torch.Tensor
    act_slots: torch.Tensor
    act_dest: torch.Tensor
    act_positions: torch.Tensor
    store_kv_src: torch.Tensor
    store_kv_slots: torch.Tensor
    store_act_src: torch.Tensor
    store_act_slots: torch.Tensor
    new_kv: list[int]
    new_act: list[int]

    @property
    def loaded_tokens(self) -> tuple[int, int]:
        """``(kv_tokens, act_tokens)`` this plan loads per layer."""
        return int(self.kv_slots.numel()), int(self.act_slots.numel())


class BlockTables:
    """Index-tensor mirrors of one batch's block tables (see the module docstring)."""

    def __init__(self, cache: HybridCache, sequences: Sequence[int], device: torch.device) -> None:
        self.cache = cache
        self.device = device
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        size = cache.spec.block_size
        self._pos_kv = torch.zeros(cache.kv_pool.num_blocks * size, dtype=torch.long)
        self._pos_act = torch.zeros(cache.act_pool.num_blocks * size, dtype=torch.long)
        for seq in sequences:
            self.refresh(seq)

    def refresh(self, seq: int) -> None:
        """Re-read a sequence's block table (after admission or growth)."""
        table = self.cache.sequences[seq]
        ids = torch.tensor([b.id for b in table.blocks], dtype=torch.long)
        is_act = torch.tensor([k == "act" for k in table.kinds], dtype=torch.bool)
        self._tables[seq] = (ids, is_act)
        size = self.cache.spec.block_size
        for name, pool in (("_pos_kv", self.cache.kv_pool), ("_pos_act", self.cache.act_pool)):
            current = getattr(self, name)
            if current.numel() < pool.num_blocks * size:
                grown = torch.zeros(pool.num_blocks * size, dtype=torch.long)
                grown[: current.numel()] = current
                setattr(self, name, grown)

    def _slots(self, seq: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots and ACT flags of tokens ``start..start+count-1`` of ``seq``."""
        ids, is_act = self._tables[seq]
        size = self.cache.spec.block_size
        index = torch.arange(start, start + count)
        block = index // size
        return ids[block] * size + index % size, is_act[block]

    def plan(self, real: torch.Tensor, sequences: list[int]) -> StepPlan:
        """The plan of a step whose rows are ``sequences`` and whose new tokens are ``real``
        (``(batch, new)`` bool: False for padding, which is not stored)."""
        cache, device = self.cache, self.device
        batch, new = real.shape
        past = [cache.sequences[s].length for s in sequences]
        width = max(past)
        kv_slots, kv_dest, act_slots, act_dest = [], [], [], []
        st_kv_src, st_kv_slots, st_act_src, st_act_slots, new_kv, new_act = [], [], [], [], [], []
        for b, seq in enumerate(sequences):
            if past[b]:
                slots, is_act = self._slots(seq, 0, past[b])
                dest = b * width + (width - past[b]) + torch.arange(past[b])
                kv_slots.append(slots[~is_act])
                kv_dest.append(dest[~is_act])
                act_slots.append(slots[is_act])
                act_dest.append(dest[is_act])
            columns = real[b].nonzero().flatten()
            count = int(columns.numel())
            capacity = cache.sequences[seq].capacity_tokens
            if past[b] + count > capacity:
                raise RuntimeError(f"sequence {seq} needs {past[b] + count} cache tokens but was admitted for {capacity}")
            slots, is_act = self._slots(seq, past[b], count)
            src = b * new + columns
            st_kv_src.append(src[~is_act])
            st_kv_slots.append(slots[~is_act])
            st_act_src.append(src[is_act])
            st_act_slots.append(slots[is_act])
            new_kv.append(int((~is_act).sum()))
            new_act.append(int(is_act.sum()))

        def cat(parts: list[torch.Tensor], to: torch.device | None = None) -> torch.Tensor:
            out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            return out.to(to) if to is not None else out

        act_slot_tensor = cat(act_slots)
        return StepPlan(
            batch=batch,
            new_tokens=new,
            sequences=sequences,
            past=past,
            width=width,
            padded=any(p != width for p in past),
            kv_slots=cat(kv_slots),
            kv_dest=cat(kv_dest, device),
            act_slots=act_slot_tensor,
            act_dest=cat(act_dest, device),
            act_positions=self._pos_act[act_slot_tensor].to(device),
            store_kv_src=cat(st_kv_src, device),
            store_kv_slots=cat(st_kv_slots),
            store_act_src=cat(st_act_src, device),
            store_act_slots=cat(st_act_slots),
            new_kv=new_kv,
            new_act=new_act,
        )

    def record_positions(self, step: StepPlan, positions: torch.Tensor) -> None:
        """Remember the positions of the step's stored tokens (checkpoints are recomputed at them)."""
        batch, new = step.batch, step.new_tokens
        flat = positions.expand(batch, new).reshape(-1).cpu()
        self._pos_kv.index_copy_(0, step.store_kv_slots, flat[step.store_kv_src.cpu()])
        self._pos_act.index_copy_(0, step.store_act_slots, flat[step.store_act_src.cpu()])
