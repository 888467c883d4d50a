"""The placement and caching decisions a compiled model runs with."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """What the planner chose, and why. Shown by ``hscompile.inspect(...).policy``."""

    device: str
    """Where compute runs."""
    resident_layers: tuple[int, ...]
    """Layers whose weights stay on the device for the model's lifetime."""
    streamed_layers: tuple[int, ...]
    """Layers whose weights are copied from host memory at every step."""
    prefetch_depth: int
    """The copy of streamed layer ``l + prefetch_depth`` is issued before layer ``l`` computes."""
    act_ratio: float | None
    """Fraction of cached tokens kept as activation checkpoints; None when the graph keeps
    no cache (a plain forward pass over whole sequences)."""
    block_size: int
    """Tokens per KV/ACT block."""
    reason: str
    """Why: which budget or resource decided it."""
