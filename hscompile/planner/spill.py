"""Cache blocks on disk or waves: what a call does when the host budget cannot hold its batch.

Today's answer is waves (:func:`~hscompile.planner.budget.admit_waves`): the sequences whose
blocks fit together run to their end, then the next ones. With weights streamed, each decode
step pays the whole model's transfer (and, for layers on disk, its read) whatever the batch
holds, so several small waves pay it several times. :func:`plan_spill` weighs the other answer:
the whole batch at once, the blocks past the host budget in a file of ``offload_dir``, read at
every step. The ``disk_cache`` option decides: ``"off"`` keeps waves, ``"on"`` spills, ``"auto"``
takes whichever the cost model predicts faster: each wave's generation, and the whole batch's
plus its disk traffic (:func:`disk_traffic`, at the profile's disk rate, not overlapped with
anything: the runtime reads on the host thread that drives the step). Where not even one
sequence fits the host budget alone, waves cannot run it: ``"auto"`` spills.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .._env import offload_dir
from ..config import HybridServeConfig, format_bytes
from ..errors import BudgetError, ConfigError
from ..ir.cache import CacheSpec
from ..ir.call import CacheSpill
from .budget import HostBudget, device_budget
from .cost_model import ModelDims, choose
from .hardware import HardwareProfile, tune
from .minibatch import minibatch_count

__all__ = ["disk_traffic", "host_share", "plan_spill"]


def host_share(spec: CacheSpec, kv_blocks: int, act_blocks: int, budget: HostBudget) -> tuple[int, int]:
    """``(KV, ACT)`` blocks the host pools keep of a batch needing ``kv_blocks`` and ``act_blocks``:
    the same share of each kind, the largest whose pools fit ``budget``."""
    def blocks(share: float) -> tuple[int, int]:
        return math.floor(kv_blocks * share), math.floor(act_blocks * share)

    if spec.pool_bytes(kv_blocks, act_blocks, pinned=budget.pinned) <= budget.nbytes:
        return kv_blocks, act_blocks
    low, high = 0.0, 1.0
    for _ in range(48):
        middle = (low + high) / 2
        if spec.pool_bytes(*blocks(middle), pinned=budget.pinned) <= budget.nbytes:
            low = middle
        else:
            high = middle
    return blocks(low)


def disk_traffic(spec: CacheSpec, *, batch: int, prompt: int, new_tokens: int, blocks: tuple[int, int],
                 disk_blocks: tuple[int, int]) -> int:
    """Bytes a spilled call moves to and from its files: every decode step reads each layer's past
    tokens on disk, and each token is written once. A token's chance of being on disk is the
    share of blocks there (``disk_blocks`` of ``blocks``, per kind)."""
    total = blocks[0] + blocks[1]
    if not total:
        return 0
    per_token = (disk_blocks[0] * spec.kv_row_bytes + disk_blocks[1] * spec.act_row_bytes) / total * spec.num_layers
    steps = max(0, new_tokens - 1)
    past_tokens = steps * prompt + steps * (steps - 1) // 2  # summed over the decode steps, per sequence
    return int(batch * per_token * (past_tokens + prompt + new_tokens))


def _directory(config: HybridServeConfig) -> Path:
    directory = offload_dir(config.memory.offload_dir)
    if config.memory.offload_dir is None:
        directory.mkdir(parents=True, exist_ok=True)
    if not directory.is_dir():
        raise ConfigError(f"offload_dir {directory} does not exist or is not a directory; the cache blocks host_memory "
                          "cannot hold go there: create it, leave offload_dir unset, or use disk_cache='off'")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"offload_dir {directory} is not writable by this user; the cache blocks host_memory cannot "
                          "hold go there: give another offload_dir, or use disk_cache='off'")
    return directory


def _seconds(config: HybridServeConfig, dims: ModelDims, profile: HardwareProfile, *, batch: int, prompt: int,
             new_tokens: int, ratio: float, staged: float) -> float | None:
    """The cost model's best time for ``batch`` sequences at ``ratio`` (None: nothing fits the device)."""
    size = config.schedule.mini_batch_size
    try:
        decision = choose(
            dims, profile, batch=batch, prompt=prompt, new_tokens=new_tokens, device_budget=device_budget(config),
            depths=(config.schedule.prefetch_depth,), activations=dims.prefill_activation_bytes(batch, prompt),
            block_size=config.cache.block_size, ratios=(ratio,),
            minibatches=None if size == "auto" else (minibatch_count(batch, size),),
            device_type=config.device.type, staged_ratio=staged)
    except ValueError:
        return None
    return decision.best.seconds


def _layout(spec: CacheSpec, totals: Sequence[int], ratio: float,
            budget: HostBudget) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """``(blocks, kept in host memory, on disk, the files' bytes)`` of a call at ``ratio``."""
    per_sequence = [spec.blocks_for(ratio, tokens) for tokens in totals]
    blocks = (sum(b[0] for b in per_sequence), sum(b[1] for b in per_sequence))
    kept = host_share(spec, *blocks, budget)
    disk = (blocks[0] - kept[0], blocks[1] - kept[1])
    return blocks, kept, disk, disk[0] * spec.kv_block_bytes + disk[1] * spec.act_block_bytes


def plan_spill(config: HybridServeConfig, spec: CacheSpec, dims: ModelDims, *, totals: Sequence[int],
               ratios: Sequence[float], staged: float, waves: Sequence[Sequence[int]] | None, budget: HostBudget,
               prompt: int, new_tokens: int, profile: HardwareProfile | None = None) -> CacheSpill | None:
    """Whether the call of sequences ``totals`` (tokens each when done) runs whole with blocks on
    disk rather than as ``waves`` (None: not even one sequence fits ``budget`` alone), per the
    ``disk_cache`` option (see the module docstring); None: run the waves.

    ``ratios``: the ACT ratio the call chose first (its waves run at it), then any others an
    ``"auto"`` ratio allows: with blocks on disk each is weighed with its disk bytes too (a
    checkpoint is half the bytes of an MHA token's K/V, on disk as over the link), and the spill
    carries the fastest."""
    mode = config.cache.disk_cache
    if mode == "off" or (waves is not None and len(waves) <= 1):
        return None
    directory = _directory(config)
    free = shutil.disk_usage(directory).free
    measured = profile
    if measured is None and (len(ratios) > 1 or (mode == "auto" and waves is not None)):
        measured = tune(config.device, dtypes=(dims.dtype,), width=dims.hidden, quick=True)
    best: tuple[float, float, tuple] | None = None
    smallest = None  # the files' bytes at the ratio that needs the fewest
    for ratio in ratios:
        layout = _layout(spec, totals, ratio, budget)
        blocks, _, disk, nbytes = layout
        smallest = nbytes if smallest is None else min(smallest, nbytes)
        if nbytes > free:
            continue
        seconds = 0.0
        if measured is not None:
            whole = _seconds(config, dims, measured, batch=len(totals), prompt=prompt, new_tokens=new_tokens,
                             ratio=ratio, staged=staged)
            if whole is None:
                continue  # the whole batch does not fit the device at this ratio
            seconds = whole + measured.disk_seconds(disk_traffic(spec, batch=len(totals), prompt=prompt,
                                                                 new_tokens=new_tokens, blocks=blocks,
                                                                 disk_blocks=disk))
        if best is None or seconds < best[0]:
            best = (seconds, ratio, layout)
    if best is None:
        nbytes = smallest or 0
        if nbytes > free and (mode == "on" or waves is None):
            raise BudgetError(f"offload_dir {directory} has {format_bytes(free)} free, and the cache blocks {budget} "
                              f"cannot hold take {format_bytes(nbytes)} ({nbytes} bytes) there: free space, give "
                              "another offload_dir or a larger host_memory" + (", or use disk_cache='off'"
                                                                                 if waves is not None else ""))
        return None  # no room on disk, or the whole batch does not fit the device: waves
    seconds, ratio, (_, kept, disk, nbytes) = best
    spill = CacheSpill(host_blocks=kept, disk_blocks=disk, disk_bytes=nbytes, directory=str(directory),
                       act_ratio=ratio, waves=0 if waves is None else len(waves))
    if mode == "on" or waves is None:
        return dataclasses.replace(spill, seconds=seconds if measured is not None else None)
    assert measured is not None
    parts = [_seconds(config, dims, measured, batch=len(w), prompt=prompt, new_tokens=new_tokens, ratio=ratios[0],
                      staged=staged) for w in waves]
    in_waves = math.inf if any(p is None for p in parts) else sum(p for p in parts if p is not None)
    if seconds >= in_waves:
        return None
    return dataclasses.replace(spill, seconds=seconds, waves_seconds=in_waves)
