"""The block-cache allocator: host KV and ACT block pools, block tables, two-step allocation.

Per-token attention state lives in host memory in fixed-size blocks of ``block_size`` tokens
of one sequence, for every layer:

* a **KV block** holds, per token and layer, ``K`` and ``V`` before GQA replication:
  ``2 * kv_heads * head_dim`` values;
* an **ACT block** holds, per token and layer, the layer's input hidden state (the activation
  checkpoint): ``hidden`` values. K and V of those tokens are recomputed on the device.

Pools are one tensor each, laid out token-major per layer so that the tokens a step needs are
one ``index_select`` (into pinned staging on CUDA) and one copy:
``kv[layers, blocks * block_size, 2, kv_heads, head_dim]`` and ``act[layers, blocks * block_size, hidden]``.

**Two-step allocation** (:meth:`HybridCache.admit`): first each sequence's blocks are *split*
between the kinds by the ACT ratio (``round(act_ratio * n_blocks)`` ACT blocks, holding the
sequence's oldest tokens; the rest KV), for its final length (prompt + new tokens), so a
sequence never needs a block mid-generation; then blocks are *placed*: taken from the two
pools. A sequence that does not fit waits (:meth:`HybridCache.admit` returns False) until
finished sequences give their blocks back; nothing is dropped or truncated.

:class:`BlockPool` follows vLLM's: the pool owns the blocks (id, ref count);
``allocate`` / ``free`` / ``incref`` / ``num_free``; ``ValueError`` on exhaustion and
``RuntimeError`` on misuse (a double free, an unknown block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..passes.plan import ModelPlan

__all__ = ["Block", "BlockPool", "CacheSpec", "HybridCache", "SequenceBlocks"]

Kind = Literal["kv", "act"]


@dataclass(slots=True)
class Block:
    """One block of a pool."""

    id: int
    ref_count: int = 0


class BlockPool:
    """A fixed set of blocks handed out and taken back."""

    def __init__(self, num_blocks: int, kind: str = "block") -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.kind = kind
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Lowest ids first: deterministic placement, and early blocks stay warm.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> Block:
        if not self._free:
            raise ValueError(f"no free {self.kind} blocks: all {self.num_blocks} are in use")
        block = self.blocks[self._free.pop()]
        block.ref_count = 1
        return block

    def incref(self, block: Block) -> None:
        self._check(block)
        if block.ref_count == 0:
            raise RuntimeError(f"incref of free {self.kind} block {block.id}")
        block.ref_count += 1

    def free(self, block: Block) -> None:
        """Drop one reference; the block returns to the pool when none is left."""
        self._check(block)
        if block.ref_count == 0:
            raise RuntimeError(f"double free of {self.kind} block {block.id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free.append(block.id)

    def _check(self, block: Block) -> None:
        if not 0 <= block.id < len(self.blocks) or self.blocks[block.id] is not block:
            raise RuntimeError(f"{self.kind} block {block.id} does not belong to this pool")


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """The model dimensions that size the blocks."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    dtype: torch.dtype
    block_size: int
    heads: int = 0
    """Query heads (attention replicates K/V to this many for GQA); 0 means ``kv_heads``."""

    @classmethod
    def from_plan(cls, plan: ModelPlan, block_size: int) -> CacheSpec:
        site = plan.layers[0].attention
        return cls(
            num_layers=plan.num_layers, kv_heads=site.num_kv_heads, head_dim=site.head_dim,
            hidden=plan.hidden_size, dtype=plan.dtype, block_size=block_size, heads=site.num_heads,
        )

    def staging_bytes(self, batch: int, past: int, new: int, kv_tokens: int, act_tokens: int) -> int:
        """Device bytes one layer's cache steps hold at once, for a step of ``batch`` sequences
        whose longest past is ``past`` tokens (``kv_tokens`` + ``act_tokens`` of them in all),
        with ``new`` new tokens each: loaded K/V, loaded checkpoints and their recomputed K/V,
        the padded past, past + new K/V, their GQA replication, the boolean mask."""
        if past == 0:
            return 0
        item = self.dtype.itemsize
        kv = self.kv_values_per_token * item
        length = past + new
        heads = self.heads or self.kv_heads
        replicated = batch * length * 2 * heads * self.head_dim * item if heads > self.kv_heads else 0
        return (
            kv_tokens * kv + act_tokens * (self.hidden * item + kv)
            + batch * past * kv
            + batch * length * kv
            + replicated
            + batch * new * length
        )

    @property
    def kv_values_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block: every layer, ``block_size`` tokens."""
        return self.num_layers * self.block_size * self.kv_values_per_token * self.dtype.itemsize

    @property
    def act_block_bytes(self) -> int:
        return self.num_layers * self.block_size * self.hidden * self.dtype.itemsize


@dataclass(slots=True)
class SequenceBlocks:
    """A sequence's block table: which block of which kind holds its ``i``-th group of tokens."""

    kinds: list[Kind]
    blocks: list[Block]
    length: int = 0
    """Tokens stored so far."""
    capacity_tokens: int = 0


def split_blocks(num_blocks: int, act_ratio: float) -> list[Kind]:
    """Step one of the allocation: the kinds of a sequence's blocks, ACT first (oldest tokens)."""
    act = min(num_blocks, max(0, round(act_ratio * num_blocks)))
    return ["act"] * act + ["kv"] * (num_blocks - act)


@dataclass(slots=True)
class HybridCache:
    """Host pools and the block tables of the sequences being generated."""

    spec: CacheSpec
    act_ratio: float
    kv_pool: BlockPool
    act_pool: BlockPool
    kv: torch.Tensor
    """``[layers, kv_blocks * block_size, 2, kv_heads, head_dim]`` host tensor (pinned on CUDA)."""
    act: torch.Tensor
    """``[layers, act_blocks * block_size, hidden]`` host tensor."""
    sequences: dict[int, SequenceBlocks] = field(default_factory=dict)

    @classmethod
    def allocate(cls, spec: CacheSpec, act_ratio: float, kv_blocks: int, act_blocks: int, *, pin: bool) -> HybridCache:
        kv = torch.empty(
            (spec.num_layers, kv_blocks * spec.block_size, 2, spec.kv_heads, spec.head_dim), dtype=spec.dtype, pin_memory=pin
        )
        act = torch.empty((spec.num_layers, act_blocks * spec.block_size, spec.hidden), dtype=spec.dtype, pin_memory=pin)
        return cls(spec, act_ratio, BlockPool(kv_blocks, "KV"), BlockPool(act_blocks, "ACT"), kv, act)

    @staticmethod
    def blocks_for(spec: CacheSpec, act_ratio: float, tokens: int) -> tuple[int, int]:
        """``(kv_blocks, act_blocks)`` a sequence of ``tokens`` tokens needs."""
        kinds = split_blocks(math.ceil(tokens / spec.block_size), act_ratio)
        return kinds.count("kv"), kinds.count("act")

    def admit(self, seq: int, tokens: int) -> bool:
        """Reserve blocks for ``tokens`` tokens of sequence ``seq``; False if the pools cannot hold it now."""
        if seq in self.sequences:
            raise RuntimeError(f"sequence {seq} is already in the cache")
        kinds = split_blocks(math.ceil(tokens / self.spec.block_size), self.act_ratio)
        if kinds.count("kv") > self.kv_pool.num_free() or kinds.count("act") > self.act_pool.num_free():
            return False
        blocks = [(self.kv_pool if kind == "kv" else self.act_pool).allocate() for kind in kinds]
        self.sequences[seq] = SequenceBlocks(kinds, blocks, 0, len(kinds) * self.spec.block_size)
        return True

    def extend(self, seq: int, tokens: int, *, limit_bytes: int | None = None) -> None:
        """Grow ``seq``'s capacity to ``tokens`` tokens (used when the final length is not known
        up front), keeping its ACT share at the ratio; the pools grow when needed, up to
        ``limit_bytes`` of pool memory (``ValueError`` beyond)."""
        table = self.sequences[seq]
        size = self.spec.block_size
        total = math.ceil(tokens / size)
        if total <= len(table.kinds):
            return
        act_target = min(total, max(0, round(self.act_ratio * total)))
        act_now = table.kinds.count("act")
        added: list[Kind] = ["act"] * max(0, act_target - act_now)
        added += ["kv"] * (total - len(table.kinds) - len(added))
        for kind in added:
            pool = self.kv_pool if kind == "kv" else self.act_pool
            if pool.num_free() == 0:
                self._grow(kind, max(pool.num_blocks, 4), limit_bytes)
            table.kinds.append(kind)
            table.blocks.append(pool.allocate())
        table.capacity_tokens = len(table.kinds) * size

    def _grow(self, kind: Kind, blocks: int, limit_bytes: int | None) -> None:
        size = self.spec.block_size
        if limit_bytes is not None:
            now = self.kv.numel() * self.kv.element_size() + self.act.numel() * self.act.element_size()
            extra = blocks * (self.spec.kv_block_bytes if kind == "kv" else self.spec.act_block_bytes)
            if now + extra > limit_bytes:
                raise ValueError(f"the {kind.upper()} pool cannot grow by {blocks} blocks within {limit_bytes} bytes")
        old = self.kv if kind == "kv" else self.act
        new = torch.empty((old.shape[0], old.shape[1] + blocks * size, *old.shape[2:]), dtype=old.dtype,
                          pin_memory=old.is_pinned())
        new[:, : old.shape[1]].copy_(old)
        pool = self.kv_pool if kind == "kv" else self.act_pool
        start = pool.num_blocks
        pool.blocks.extend(Block(start + i) for i in range(blocks))
        pool._free[:0] = list(range(start + blocks - 1, start - 1, -1))
        if kind == "kv":
            self.kv = new
        else:
            self.act = new

    def release(self, seq: int) -> None:
        """Give a finished sequence's blocks back."""
        table = self.sequences.pop(seq)
        for kind, block in zip(table.kinds, table.blocks):
            (self.kv_pool if kind == "kv" else self.act_pool).free(block)
