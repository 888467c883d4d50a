"""The per-call decision: the ACT ratio and mini-batch size one generation call runs with.

Fixed options are used as they are; an ``"auto"`` one is decided by the cost model's search
(:func:`~hscompile.planner.cost_model.choose`) on the device's hardware profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..config import HybridServeConfig
from .budget import device_budget, staged_ratio
from .cost_model import RATIOS, Decision, ModelDims, choose
from .hardware import HardwareProfile

__all__ = ["CallChoice", "choose_call"]


@dataclass(frozen=True, slots=True)
class CallChoice:
    """How one call runs."""

    act_ratio: float
    minibatch_rows: int | None
    """Rows per mini-batch (None: every step runs whole)."""
    decision: Decision | None = None
    """The cost model's search, where an option was ``"auto"`` and some choice fit."""


def choose_call(config: HybridServeConfig, *, batch: int, prompt: int, new_tokens: int, act_ratio: float | None,
                fallback_ratio: float, dims: Callable[[], ModelDims],
                profile: Callable[[ModelDims], HardwareProfile]) -> CallChoice:
    """The ACT ratio (``act_ratio`` overrides the options') and mini-batch rows of a call of
    ``batch`` sequences. ``dims`` and ``profile`` are asked for only when something is ``"auto"``.
    Where nothing fits the budget, the configured values (``fallback_ratio`` for an ``"auto"``
    ratio) are returned: placement then refuses the budget with the minimum that would work."""
    ratio = act_ratio if act_ratio is not None else config.cache.act_ratio
    size = config.schedule.mini_batch_size
    fixed_size = None if size == "auto" or size >= batch else size
    if ratio != "auto" and size != "auto":
        return CallChoice(float(ratio), fixed_size)
    model = dims()
    staged = staged_ratio(config, model.cache_spec(config.cache.block_size))
    try:
        decision = choose(
            model, profile(model), batch=batch, prompt=prompt, new_tokens=new_tokens,
            device_budget=device_budget(config), depths=(config.schedule.prefetch_depth,),
            activations=model.prefill_activation_bytes(batch, prompt),
            block_size=config.cache.block_size,
            ratios=(float(ratio),) if ratio != "auto" else RATIOS,
            minibatches=None if size == "auto" else (math.ceil(batch / size),),
            device_type=config.device.type,
            staged_ratio=max(staged, float(ratio)) if ratio != "auto" else staged,
        )
    except ValueError:
        return CallChoice(fallback_ratio if ratio == "auto" else float(ratio), fixed_size)
    best = decision.best.choice
    chosen = float(ratio) if ratio != "auto" else best.act_ratio
    if size != "auto":
        return CallChoice(chosen, fixed_size, decision)
    return CallChoice(chosen, math.ceil(batch / best.minibatches) if best.minibatches > 1 else None, decision)
