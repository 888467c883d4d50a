"""Ordered effects: how a hybridserve op that returns nothing survives compilation.

Ahead-of-time compilation threads an effect token through an op registered here, so neither
dead-code elimination nor reordering can touch it even though it returns nothing (or returns a
buffer no one reads at trace time).
"""

from __future__ import annotations

import torch

__all__ = ["register_ordered_effect"]


def register_ordered_effect(op: torch._ops.OpOverload) -> None:
    """Register ``op`` as an ordered effect (once per op: the op modules call it at import)."""
    register = getattr(torch.library, "_register_effectful_op", None)
    if register is not None:
        register(op, torch.library.EffectType.ORDERED)
    else:  # torch < 2.12 keeps it with the effects machinery
        from torch._higher_order_ops import effects

        effects._register_effectful_op(op, effects._EffectType.ORDERED)
