"""Budgets: how much device memory there is, and which sequences the host pools admit together.

The device side: :func:`device_budget` (the option, else free CUDA memory) and
:func:`decode_staging` (the cache staging of a call's longest decode step, which the
placement of its graphs must leave room for). The check against the budget itself is
:func:`hscompile.ir.policy.check_device_budget`. The host side: :func:`machine_budget` (what this
machine has available now), :func:`check_host_weights` (a model whose layer, or whose weights
together, cannot live in that memory is refused before any weight is allocated),
:func:`host_budget` (the cache pools': ``host_memory``, else the machine's) and
:func:`admit_waves`, which refuses a sequence the pools cannot hold even alone and splits a batch
into waves whose cache blocks fit ``host_memory`` together; a sequence waits for a later wave, it
is never dropped or cut short.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import HybridServeConfig, format_bytes
from ..errors import BudgetError
from ..ir.cache import CacheSpec, checkpoint_tokens
from .hardware import host_memory_available

__all__ = ["HOST_WEIGHT_SHARE", "HostBudget", "admit_waves", "check_host_weights", "decode_staging", "device_budget",
           "host_budget", "host_layers", "machine_budget", "staged_ratio"]


def device_budget(config: HybridServeConfig) -> int | None:
    """The device budget in bytes: ``device_memory``, else free CUDA memory, else no limit."""
    if config.memory.device_memory is not None:
        return config.memory.device_memory
    if config.device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(config.device)
        return int(free)
    return None  # the CPU as a device: no limit unless one is given


@dataclass(frozen=True, slots=True)
class HostBudget:
    """Host memory the weight store and the cache pools may use, and where the figure comes from."""

    nbytes: int
    option: bool
    """True: the ``host_memory`` option; False: what this machine has available (see :func:`host_budget`)."""
    pinned: bool = False
    """The pools are allocated pinned (CUDA): each rounded up to a power of two (:func:`~hscompile.ir.cache.pinned_bytes`)."""

    def __str__(self) -> str:
        if self.option:
            return f"host_memory={format_bytes(self.nbytes)}"
        return f"the {format_bytes(self.nbytes)} ({self.nbytes} bytes) of host memory available on this machine"

    @property
    def advice(self) -> str:
        """What raises the budget."""
        return "a larger host_memory" if self.option else "a machine with more memory"


def machine_budget(*, held: int = 0) -> HostBudget | None:
    """The memory this machine has available now (:func:`~hscompile.planner.hardware.host_memory_available`)
    plus ``held``, bytes hscompile holds now and replaces before it needs more (the last call's
    cache pools); None where it cannot be read. A model's weights are checked against this figure
    when it is loaded or planned (:func:`check_host_weights`); the ``host_memory`` option bounds the
    cache pools and, at placement, the streamed layers' host buffers."""
    available = host_memory_available()
    return HostBudget(available + held, option=False) if available is not None else None


def host_budget(config: HybridServeConfig, *, held: int = 0, pinned: bool = False,
                weights: int = 0) -> HostBudget | None:
    """The budget of the cache pools: ``host_memory``, else :func:`machine_budget`; ``pinned``: the
    pools are allocated pinned (their sizes round up). ``weights``: host bytes a loader that kept
    layers on disk gave the weights (:func:`host_layers`): then ``host_memory`` bounds weights and
    pools together, and the pools get what the weights leave."""
    if config.memory.host_memory is not None:
        return HostBudget(max(0, config.memory.host_memory - weights), option=True, pinned=pinned)
    budget = machine_budget(held=held)
    return None if budget is None else dataclasses.replace(budget, pinned=pinned)


def check_host_weights(layer_bytes: Sequence[int], global_bytes: int, budget: HostBudget | None, *,
                       what: str) -> None:
    """Refuse weights that cannot live in host memory, before any is allocated: hscompile keeps
    every weight there (and streams layers from there), so each layer (``layer_bytes``, one
    figure per layer, as packed for streaming) must fit ``budget`` alone, and all of them with the
    ``global_bytes`` (embeddings, head, final norm) together. ``what`` names the model. A
    :class:`~hscompile.errors.BudgetError` gives the numbers."""
    if budget is None or not layer_bytes:
        return
    largest = max(range(len(layer_bytes)), key=layer_bytes.__getitem__)
    layer = layer_bytes[largest]
    if layer > budget.nbytes:
        raise BudgetError(
            f"{what}: layer {largest} alone holds {format_bytes(layer)} ({layer} bytes) of weights, more than "
            f"{budget}; hscompile keeps each layer's weights in host memory and streams them from there: use a "
            f"smaller model or dtype, or {budget.advice}"
        )
    total = sum(layer_bytes) + global_bytes
    if total > budget.nbytes:
        raise BudgetError(
            f"{what}: its weights take {format_bytes(total)} ({total} bytes: {len(layer_bytes)} layers of up to "
            f"{format_bytes(layer)} and {format_bytes(global_bytes)} outside them), more than {budget}; hscompile "
            f"keeps every weight in host memory: use a smaller model or dtype, or {budget.advice}"
        )


HOST_WEIGHT_SHARE = 0.5
"""Of a host budget too small for a model's weights, the share its weights may take (host-resident
layers, the weights outside the layers, the disk tier's staging slots); the rest is the cache
pools'. A choice, not a measurement: the cost model does not weigh weights on disk against the
batch yet."""


def host_layers(layer_bytes: Sequence[int], global_bytes: int, budget: HostBudget | None, *, staging: int,
                what: str) -> int:
    """How many layers, from the first, host memory keeps; the others stay on disk and are read at
    every step (the disk tier). All of them when the weights fit ``budget`` together; else as many
    as fit :data:`HOST_WEIGHT_SHARE` of it beside the weights outside the layers and ``staging``
    (the disk tier's slots). A :class:`~hscompile.errors.BudgetError` naming the smallest budget
    when not even those fit. ``layer_bytes``: each layer as packed for streaming."""
    total = sum(layer_bytes) + global_bytes
    if budget is None or total <= budget.nbytes:
        return len(layer_bytes)
    share = int(budget.nbytes * HOST_WEIGHT_SHARE)
    room = share - global_bytes - staging
    if room < 0:
        need = math.ceil((global_bytes + staging) / HOST_WEIGHT_SHARE)
        raise BudgetError(
            f"{what}: its weights take {format_bytes(total)} ({total} bytes), more than {budget}, so its layers stay "
            f"on disk; host memory must still hold the weights outside the layers ({format_bytes(global_bytes)}) "
            f"and the staging slots layers are read into ({format_bytes(staging)}) in {HOST_WEIGHT_SHARE:.0%} of "
            f"it (the rest is the cache's): use host_memory >= {need}" + ("" if budget.option else " on a machine "
                                                                           "with that much memory available")
        )
    count = 0
    for nbytes in layer_bytes:
        if nbytes > room:
            break
        room -= nbytes
        count += 1
    return count


def admit_waves(spec: CacheSpec, act_ratio: float, totals: Sequence[int],
                budget: HostBudget | int | None) -> list[list[int]]:
    """Sequences (indices of ``totals``, each its prompt + new tokens) grouped into waves whose
    blocks fit ``budget`` (a :func:`host_budget`, or ``host_memory``'s bytes) together, in order.
    A sequence that cannot fit even alone is a :class:`~hscompile.errors.BudgetError` naming its
    need, before anything is allocated.

    Only the ``host_memory`` option forms waves: memory this machine has available only refuses
    a sequence that cannot fit it alone (the figure moves as other work runs, and a refusal near
    it is better than a run killed hours in); without a budget, one wave."""
    if budget is None:
        return [list(range(len(totals)))]
    if isinstance(budget, int):
        budget = HostBudget(budget, option=True)
    blocks = [spec.blocks_for(act_ratio, tokens) for tokens in totals]
    needs = [spec.pool_bytes(kv, act, pinned=budget.pinned) for kv, act in blocks]
    for index, (tokens, need) in enumerate(zip(totals, needs)):
        if need > budget.nbytes:
            advice = f"use host_memory >= {need}" if budget.option else "use fewer tokens or a machine with more memory"
            advice += " (or disk_cache='auto' or 'on': its blocks past the budget then go to disk)"
            raise BudgetError(
                f"{budget} cannot hold even one sequence: sequence {index} needs "
                f"{math.ceil(tokens / spec.block_size)} blocks of {spec.block_size} tokens "
                f"({format_bytes(need)}, {need} bytes) for {tokens} tokens; {advice}"
            )
    if not budget.option:
        return [list(range(len(totals)))]
    # A wave's pools are two allocations: what they take (rounded, when pinned) must fit.
    waves: list[list[int]] = [[]]
    kv_used = act_used = 0
    for index, (kv, act) in enumerate(blocks):
        if waves[-1] and spec.pool_bytes(kv_used + kv, act_used + act, pinned=budget.pinned) > budget.nbytes:
            waves.append([])
            kv_used = act_used = 0
        waves[-1].append(index)
        kv_used, act_used = kv_used + kv, act_used + act
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
    return 1.0 if spec.checkpoints_save_bytes else 0.0
