"""Budgets: how much device memory there is, and which sequences the host pools admit together.

The device side: :func:`device_budget` (the option, else free CUDA memory) and
:func:`decode_staging` (the cache staging of a call's longest decode step, which the
placement of its graphs must leave room for). The check against the budget itself is
:func:`hscompile.ir.policy.check_device_budget`. The host side: :func:`admit_waves` splits a
batch into waves whose cache blocks fit ``host_memory`` together; a sequence waits for a later
wave, it is never dropped or cut short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config import HybridServeConfig, format_bytes
from ..errors import BudgetError
from ..ir.cache import CacheSpec, checkpoint_tokens

__all__ = ["admit_waves", "decode_staging", "device_budget", "staged_ratio"]


def device_budget(config: HybridServeConfig) -> int | None:
    """The device budget in bytes: ``device_memory``, else free CUDA memory, else no limit."""
    if config.memory.device_memory is not None:
        return config.memory.device_memory
    if config.device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(config.device)
        return int(free)
    return None  # the CPU as a device: no limit unless one is given


def admit_waves(spec: CacheSpec, act_ratio: float, totals: Sequence[int], host_budget: int | None) -> list[list[int]]:
    """Sequences (indices of ``totals``, each its prompt + new tokens) grouped into waves whose
    blocks fit ``host_budget`` bytes together, in order; one wave without a budget. A sequence
    that cannot fit even alone is a :class:`~hscompile.errors.BudgetError` naming its need."""
    if host_budget is None:
        return [list(range(len(totals)))]
    waves: list[list[int]] = [[]]
    used = 0
    for index, tokens in enumerate(totals):
        need = spec.sequence_bytes(act_ratio, tokens)
        if need > host_budget:
            raise BudgetError(
                f"host_memory={format_bytes(host_budget)} cannot hold even one sequence: sequence {index} needs "
                f"{math.ceil(tokens / spec.block_size)} blocks of {spec.block_size} tokens "
                f"({format_bytes(need)}, {need} bytes) for {tokens} tokens; use host_memory >= {need}"
            )
        if used + need > host_budget:
            waves.append([])
            used = 0
        waves[-1].append(index)
        used += need
    return waves


def decode_staging(spec: CacheSpec, act_ratio: float, *, rows: int, longest: int, overlap: bool) -> int:
    """Device bytes of cache staging for a batch whose mini-batches have at most ``rows``
    sequences and whose longest is ``longest`` tokens when done: the attention buffers are that
    wide from the first decode step on, and at the last step every earlier token is loaded. With
    ``overlap`` the next mini-batch's (or layer's) loads fill a second set of buffers."""
    past = longest - 1
    act = checkpoint_tokens(past, act_ratio, spec.block_size)
    return spec.staging_bytes(rows, longest, 1, rows * act, buffers=2 if overlap else 1)


def staged_ratio(config: HybridServeConfig, spec: CacheSpec) -> float:
    """The ACT ratio the cache staging of new graphs is sized for (beside a call's own): with
    ``act_ratio="auto"`` any ratio the search may pick later (all-ACT stages the most, unless
    checkpoints are no smaller than K/V, when the search keeps all-KV), else the option's. So a
    later call with another ratio needs no new placement."""
    configured = config.cache.act_ratio
    if configured != "auto":
        return float(configured)
    return 1.0 if spec.hidden < spec.kv_values_per_token else 0.0
