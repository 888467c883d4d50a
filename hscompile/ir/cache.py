"""The cache's dimensions: what sizes a KV or ACT block, and how a ratio splits a sequence.

One home for the numbers the allocator, the cost model, the budgets and the generator all
need: a model's attention sizes (from its config, :class:`ConfigDims`, or from an analysis
plan), the block split of a sequence at an ACT ratio (:func:`act_blocks`), and the bytes a
layer's cache steps stage on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UnsupportedModelError
from .plan import ModelPlan

__all__ = ["CacheSpec", "ConfigDims", "Kind", "act_blocks", "checkpoint_tokens", "max_positions", "split_blocks"]

Kind = Literal["kv", "act"]


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
    quant: str = "none"
    """``"int8"``: the pools hold each token as a row of bytes (:meth:`kv_row_bytes`,
    :meth:`act_row_bytes`): int8 values, then one scale per K/V head (per checkpoint), in ``dtype``."""

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype, block_size: int, quant: str = "none") -> CacheSpec:
        """The dimensions a transformers config declares (each compiled graph checks them against
        what its analysis found, :meth:`from_plan`)."""
        dims = ConfigDims.of(config)
        return cls(num_layers=dims.layers, kv_heads=dims.kv_heads, head_dim=dims.head_dim, hidden=dims.hidden,
                   dtype=dtype, block_size=block_size, heads=dims.heads, quant=quant)

    @classmethod
    def from_plan(cls, plan: ModelPlan, block_size: int, quant: str = "none") -> CacheSpec:
        site = plan.layers[0].attention
        return cls(
            num_layers=plan.num_layers, kv_heads=site.num_kv_heads, head_dim=site.head_dim,
            hidden=plan.hidden_size, dtype=plan.dtype, block_size=block_size, heads=site.num_heads, quant=quant,
        )

    @property
    def quantized(self) -> bool:
        return self.quant != "none"

    @property
    def kv_row_bytes(self) -> int:
        """Host bytes of one token's K/V in one layer (what a load moves per token)."""
        if self.quantized:
            return self.kv_values_per_token + 2 * self.kv_heads * self.dtype.itemsize
        return self.kv_values_per_token * self.dtype.itemsize

    @property
    def act_row_bytes(self) -> int:
        """Host bytes of one token's checkpoint in one layer."""
        return self.hidden + self.dtype.itemsize if self.quantized else self.hidden * self.dtype.itemsize

    @property
    def checkpoints_save_bytes(self) -> bool:
        """Whether a token's checkpoint moves fewer bytes than its K/V, as the pools hold them
        (int8 rows and their scales included). The one statement of the ``"auto"`` rule: where it
        is False (GQA with ``2 * kv_heads * head_dim <= hidden``), recompute cannot save link
        bytes, so an automatic ratio keeps every token as K/V."""
        return self.act_row_bytes < self.kv_row_bytes

    def staging_bytes(self, rows: int, columns: int, new: int, act_tokens: int, *, buffers: int = 1) -> int:
        """Device bytes the cache steps of a mini-batch of ``rows`` sequences hold, with attention
        buffers ``columns`` tokens wide (the longest sequence's past + new tokens) and
        ``act_tokens`` checkpoints loaded per layer: ``buffers`` attention buffers
        (``rows x columns`` K/V) and checkpoint buffers (two when loads are issued ahead), the
        recomputed K/V of one layer, and the boolean mask over ``columns``. Quantized pools also
        stage the loaded rows as they are before dequantizing them (:meth:`kv_row_bytes` per token)."""
        item = self.dtype.itemsize
        kv = self.kv_values_per_token * item
        rows_staged = rows * columns * self.kv_row_bytes + act_tokens * self.act_row_bytes if self.quantized else 0
        return (
            buffers * (rows * columns * kv + act_tokens * self.hidden * item + rows_staged)
            + act_tokens * kv
            + rows * new * columns
        )

    def blocks_for(self, act_ratio: float, tokens: int) -> tuple[int, int]:
        """``(kv_blocks, act_blocks)`` a sequence of ``tokens`` tokens needs."""
        total = math.ceil(tokens / self.block_size)
        act = act_blocks(total, act_ratio)
        return total - act, act

    def sequence_bytes(self, act_ratio: float, tokens: int) -> int:
        """Host bytes of the blocks a sequence of ``tokens`` tokens needs."""
        kv, act = self.blocks_for(act_ratio, tokens)
        return kv * self.kv_block_bytes + act * self.act_block_bytes

    def pool_bytes(self, kv_blocks: int, act_blocks: int, *, pinned: bool) -> int:
        """Host memory the two pools of ``kv_blocks`` and ``act_blocks`` blocks take; ``pinned``:
        each allocated pinned, which torch's allocator rounds up (:func:`pinned_bytes`)."""
        kv, act = kv_blocks * self.kv_block_bytes, act_blocks * self.act_block_bytes
        return pinned_bytes(kv) + pinned_bytes(act) if pinned else kv + act

    @property
    def kv_values_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block: every layer, ``block_size`` tokens."""
        return self.num_layers * self.block_size * self.kv_row_bytes

    @property
    def act_block_bytes(self) -> int:
        return self.num_layers * self.block_size * self.act_row_bytes


def pinned_bytes(nbytes: int) -> int:
    """What torch's pinned (caching host) allocator takes for ``nbytes``: the next power of two
    (it keeps freed blocks for reuse, by size class)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def act_blocks(num_blocks: int, act_ratio: float) -> int:
    """How many of a sequence's ``num_blocks`` blocks are ACT blocks at ``act_ratio``: the one
    rounding the allocator, the cost model and the budgets share."""
    return min(num_blocks, max(0, round(act_ratio * num_blocks)))


def split_blocks(num_blocks: int, act_ratio: float) -> list[Kind]:
    """Step one of the allocation: the kinds of a sequence's blocks, ACT first (oldest tokens)."""
    act = act_blocks(num_blocks, act_ratio)
    return ["act"] * act + ["kv"] * (num_blocks - act)


def checkpoint_tokens(tokens: int, act_ratio: float, block_size: int) -> int:
    """Tokens of a ``tokens``-token sequence held as checkpoints: its first ACT blocks' tokens."""
    return min(tokens, act_blocks(math.ceil(tokens / block_size), act_ratio) * block_size)


@dataclass(frozen=True, slots=True)
class ConfigDims:
    """The attention sizes a transformers config declares."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> ConfigDims:
        """Read from a ``transformers.PretrainedConfig`` (``num_key_value_heads`` defaults to the
        heads, ``head_dim`` to ``hidden // heads``, as transformers' models do)."""
        try:
            layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
        except AttributeError as error:
            raise UnsupportedModelError(f"the model's config does not describe its layers: {error}") from None
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def max_positions(config: Any) -> tuple[int, str] | None:
    """The most positions (prompt + generated tokens) a model of ``config`` takes, and the
    ``config.json`` key that says so; None where its config names no limit."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value, dict(getattr(type(config), "attribute_map", {})).get(name, name)
    return None
