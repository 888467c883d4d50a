"""The block-cache allocator: host KV and ACT block pools, block tables, two-step allocation.

Per-token attention state lives in host memory in fixed-size blocks of ``block_size`` tokens
of one sequence, for every layer:

* a **KV block** holds, per token and layer, ``K`` and ``V`` before GQA replication:
  ``2 * kv_heads * head_dim`` values;
* an **ACT block** holds, per token and layer, the layer's input hidden state (the activation
  checkpoint): ``hidden`` values. K and V of those tokens are recomputed on the device.

Pools are one tensor each (pinned on CUDA), laid out token-major per layer:
``kv[layers, blocks * block_size, 2, kv_heads, head_dim]`` and ``act[layers, blocks * block_size, hidden]``.
Pools hand out their lowest free blocks first, so a sequence admitted whole gets consecutive
blocks of each kind: its past in a layer is one contiguous run per kind
(:meth:`HybridCache.pieces`), which one copy moves straight into the buffer attention reads.

**Two-step allocation** (:meth:`HybridCache.admit`): first each sequence's blocks are *split*
between the kinds by the ACT ratio (``round(act_ratio * n_blocks)`` ACT blocks, holding the
sequence's oldest tokens; the rest KV), for its final length (prompt + new tokens), so a
sequence never needs a block mid-generation; then blocks are *placed*: taken from the two
pools. A sequence that does not fit waits (:meth:`HybridCache.admit` returns False) until
finished sequences give their blocks back; nothing is dropped or truncated.

:class:`BlockPool` follows vLLM's: the pool owns the blocks (id, ref count);
``allocate`` / ``free`` / ``incref`` / ``num_free``; ``ValueError`` on exhaustion and
``RuntimeError`` on misuse (a double free, an unknown block).

**Blocks on disk** (a call whose plan spills, :mod:`hscompile.runtime.spill`): a pool may number
more blocks than its host tensor holds; the blocks past it live in a
:class:`~hscompile.runtime.spill.CacheFile` laid out the same way. Lowest-first allocation fills
the host part first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..ir.cache import CacheSpec, Kind, act_blocks, split_blocks
from .spill import CacheFile

__all__ = ["Block", "BlockPool", "HybridCache", "SequenceBlocks"]


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


@dataclass(slots=True)
class SequenceBlocks:
    """A sequence's block table: which block of which kind holds its ``i``-th group of tokens."""

    kinds: list[Kind]
    blocks: list[Block]
    length: int = 0
    """Tokens stored so far."""
    capacity_tokens: int = 0


class HostMemory(Protocol):
    """How the pools are allocated: a device backend (pinned where copies are asynchronous)."""

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def host_bytes(self, nbytes: int) -> int: ...


class _Pageable:
    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def host_bytes(self, nbytes: int) -> int:
        return nbytes


PAGEABLE: HostMemory = _Pageable()


@dataclass(slots=True)
class HybridCache:
    """Host pools and the block tables of the sequences being generated."""

    spec: CacheSpec
    act_ratio: float
    kv_pool: BlockPool
    act_pool: BlockPool
    kv: torch.Tensor
    """``[layers, kv_blocks * block_size, 2, kv_heads, head_dim]`` host tensor (pinned on CUDA);
    with int8 blocks ``[layers, kv_blocks * block_size, kv_row_bytes]`` bytes."""
    act: torch.Tensor
    """``[layers, act_blocks * block_size, hidden]`` host tensor (int8 blocks: ``act_row_bytes`` a token)."""
    sequences: dict[int, SequenceBlocks] = field(default_factory=dict)
    host: HostMemory = PAGEABLE
    """What the pools are allocated (and grown) with."""
    kv_file: CacheFile | None = None
    """KV blocks past the host pool's (None: every block is in ``kv``)."""
    act_file: CacheFile | None = None

    @classmethod
    def allocate(cls, spec: CacheSpec, act_ratio: float, kv_blocks: int, act_blocks: int, *,
                 host: HostMemory = PAGEABLE, host_blocks: tuple[int, int] | None = None,
                 spill_dir: str | None = None) -> HybridCache:
        """Pools of ``kv_blocks`` and ``act_blocks`` blocks, allocated by ``host`` (the device
        backend's :meth:`~hscompile.runtime.device_base.DeviceBackend.host_tensor`: pinned where copies
        are asynchronous). ``host_blocks``: at most this many ``(KV, ACT)`` blocks in host memory,
        the rest in files of ``spill_dir``."""
        kv_host, act_host = kv_blocks, act_blocks
        if host_blocks is not None:
            kv_host, act_host = min(kv_blocks, host_blocks[0]), min(act_blocks, host_blocks[1])
        alloc = host.host_tensor
        if spec.quantized:  # a row of bytes per token (ops.quant.quantize_rows)
            kv = alloc((spec.num_layers, kv_host * spec.block_size, spec.kv_row_bytes), torch.uint8)
            act = alloc((spec.num_layers, act_host * spec.block_size, spec.act_row_bytes), torch.uint8)
        else:
            kv = alloc((spec.num_layers, kv_host * spec.block_size, 2, spec.kv_heads, spec.head_dim), spec.dtype)
            act = alloc((spec.num_layers, act_host * spec.block_size, spec.hidden), spec.dtype)
        files: list[CacheFile | None] = []
        for kind, total, kept, row in (("kv", kv_blocks, kv_host, spec.kv_row_bytes),
                                       ("act", act_blocks, act_host, spec.act_row_bytes)):
            if total > kept:
                assert spill_dir is not None, "blocks past the host pools need a directory"
                files.append(CacheFile(spill_dir, kind=kind, layers=spec.num_layers,
                                       slots=(total - kept) * spec.block_size, row_bytes=row))
            else:
                files.append(None)
        return cls(spec, act_ratio, BlockPool(kv_blocks, "KV"), BlockPool(act_blocks, "ACT"), kv, act, host=host,
                   kv_file=files[0], act_file=files[1])

    def host_slots(self, kind: Kind) -> int:
        """Slots of ``kind`` in host memory: the pool slots at and past it are in its file."""
        return (self.kv if kind == "kv" else self.act).shape[1]

    def slots(self, kind: Kind) -> int:
        """Every slot of ``kind``, host and disk."""
        pool = self.kv_pool if kind == "kv" else self.act_pool
        return pool.num_blocks * self.spec.block_size

    def file(self, kind: Kind) -> CacheFile | None:
        return self.kv_file if kind == "kv" else self.act_file

    @property
    def disk_blocks(self) -> int:
        """Blocks of both kinds in files."""
        return sum(self.slots(k) - self.host_slots(k) for k in ("kv", "act")) // self.spec.block_size

    def rows(self, kind: Kind, slot: int, count: int) -> torch.Tensor:
        """Slots ``slot .. slot + count`` of every layer (a host copy where any is on disk)."""
        pool, boundary, file = (self.kv if kind == "kv" else self.act), self.host_slots(kind), self.file(kind)
        if slot + count <= boundary:
            return pool[:, slot:slot + count]
        assert file is not None
        out = torch.empty((pool.shape[0], count, *pool.shape[2:]), dtype=pool.dtype)
        head = max(0, boundary - slot)
        out[:, :head] = pool[:, slot:slot + head]
        for layer in range(pool.shape[0]):
            file.read(layer, slot + head - boundary, count - head, out[layer, head:])
        return out

    def set_rows(self, kind: Kind, slot: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (``[layers, count, ...]``, host) into slots from ``slot`` of every layer."""
        pool, boundary, file = (self.kv if kind == "kv" else self.act), self.host_slots(kind), self.file(kind)
        count = rows.shape[1]
        head = max(0, min(count, boundary - slot))
        pool[:, slot:slot + head].copy_(rows[:, :head])
        if head < count:
            assert file is not None
            for layer in range(pool.shape[0]):
                file.write(layer, slot + head - boundary, rows[layer, head:].contiguous())

    def close(self) -> None:
        """Close the files of the blocks on disk (their space returns to the filesystem)."""
        for file in (self.kv_file, self.act_file):
            if file is not None:
                file.close()

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

    def extend(self, seq: int, tokens: int, *, limit_bytes: int | None = None,
               settle: Callable[[], None] = lambda: None) -> None:
        """Grow ``seq``'s capacity to ``tokens`` tokens (used when the final length is not known
        up front), keeping its ACT share at the ratio; the pools grow when needed, up to
        ``limit_bytes`` of pool memory (``ValueError`` beyond). ``settle()`` runs before a pool
        is copied into a larger one: the host reads it, so stores still in flight must be done."""
        table = self.sequences[seq]
        size = self.spec.block_size
        total = math.ceil(tokens / size)
        if total <= len(table.kinds):
            return
        act_target = act_blocks(total, self.act_ratio)
        act_now = table.kinds.count("act")
        added: list[Kind] = ["act"] * max(0, act_target - act_now)
        added += ["kv"] * (total - len(table.kinds) - len(added))
        for kind in added:
            pool = self.kv_pool if kind == "kv" else self.act_pool
            if pool.num_free() == 0:
                settle()
                self._grow(kind, max(pool.num_blocks, 4), limit_bytes)
            table.kinds.append(kind)
            table.blocks.append(pool.allocate())
        table.capacity_tokens = len(table.kinds) * size

    def _grow(self, kind: Kind, blocks: int, limit_bytes: int | None) -> None:
        size = self.spec.block_size
        if self.file(kind) is not None:  # pragma: no cover - growing pools serve transformers' loop, never spilled
            raise RuntimeError("a pool with blocks on disk cannot grow")
        if limit_bytes is not None:
            kv, act = self.kv_pool.num_blocks, self.act_pool.num_blocks
            kv, act = (kv + blocks, act) if kind == "kv" else (kv, act + blocks)
            spec, taken = self.spec, self.host.host_bytes  # what each pool's allocation really takes
            if taken(kv * spec.kv_block_bytes) + taken(act * spec.act_block_bytes) > limit_bytes:
                raise ValueError(f"the {kind.upper()} pool cannot grow by {blocks} blocks within {limit_bytes} bytes")
        old = self.kv if kind == "kv" else self.act
        new = self.host.host_tensor((old.shape[0], old.shape[1] + blocks * size, *old.shape[2:]), old.dtype)
        new[:, : old.shape[1]].copy_(old)
        pool = self.kv_pool if kind == "kv" else self.act_pool
        start = pool.num_blocks
        pool.blocks.extend(Block(start + i) for i in range(blocks))
        pool._free[:0] = list(range(start + blocks - 1, start - 1, -1))
        if kind == "kv":
            self.kv = new
        else:
            self.act = new

    def pieces(self, seq: int, start: int, end: int) -> list[tuple[Kind, int, int, int]]:
        """Tokens ``start..end-1`` of ``seq`` as maximal runs ``(kind, first pool slot, first token,
        tokens)`` that are contiguous in their pool: what one copy can move. A sequence's blocks of
        one kind are allocated consecutively where the pool allows, so its past is a run or two."""
        table = self.sequences[seq]
        size = self.spec.block_size
        runs: list[tuple[Kind, int, int, int]] = []
        token = start
        while token < end:
            index, offset = divmod(token, size)
            count = min(size - offset, end - token)
            kind, slot = table.kinds[index], table.blocks[index].id * size + offset
            if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][3] == slot:
                last = runs[-1]
                runs[-1] = (kind, last[1], last[2], last[3] + count)
            else:
                runs.append((kind, slot, token, count))
            token += count
        return runs

    def held_tokens(self, seq: int) -> tuple[int, int]:
        """``(kv_tokens, act_tokens)`` sequence ``seq`` holds now."""
        table = self.sequences[seq]
        size = self.spec.block_size
        act = sum(min(size, max(0, table.length - i * size)) for i, k in enumerate(table.kinds) if k == "act")
        return table.length - act, act

    def release(self, seq: int) -> None:
        """Give a finished sequence's blocks back."""
        table = self.sequences.pop(seq)
        for kind, block in zip(table.kinds, table.blocks):
            (self.kv_pool if kind == "kv" else self.act_pool).free(block)
