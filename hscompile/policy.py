"""The placement and caching decisions a compiled model runs with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import GLOBAL_GROUP

__all__ = ["CacheBudget", "DeviceMemoryPlan", "Policy"]


@dataclass(frozen=True, slots=True)
class CacheBudget:
    """What a generation graph's placement must leave room for."""

    act_ratio: float
    """Fraction of cached tokens kept as activation checkpoints."""
    staging_bytes: int
    """Device bytes one layer's cache steps hold at once at the longest context this graph will
    see (loaded K/V and checkpoints, recomputed K/V, the padded past, the mask)."""
    workload: tuple[int, int, int] | None = None
    """``(batch, prompt, new_tokens)`` of the generation that compiles the graph, for predictions."""
    profile: Any = None
    """The :class:`~hscompile.runtime.tuner.HardwareProfile` predictions use."""
    minibatches: int = 1
    """Mini-batches a step of that generation runs as."""


@dataclass(frozen=True, slots=True)
class DeviceMemoryPlan:
    """What the device budget is spent on, in bytes."""

    global_weights: int
    """Weights outside the layers (embeddings, final norm, head), always resident."""
    resident_layers: int
    ring: int
    """The slot ring streamed layers pass through."""
    activations: int
    """Estimated activation peak of the call the plan was made for (eager liveness bound)."""
    reserve: int
    """Headroom for library workspaces (cuBLAS, attention kernels) that no graph shows."""
    cache_staging: int = 0
    """Device bytes for the cache steps of one layer (generation graphs only)."""

    @property
    def total(self) -> int:
        return self.global_weights + self.resident_layers + self.ring + self.activations + self.reserve + self.cache_staging


@dataclass(frozen=True, slots=True)
class Policy:
    """What the planner chose, and why. Shown by ``hscompile.inspect(...).policy``."""

    device: str
    """Where compute runs."""
    weights_device: str
    """Where the model's weights live (``"cpu"`` for host-resident models)."""
    device_budget: int | None
    """The ``device_memory`` promise in bytes (None: no limit was set or measured)."""
    resident_layers: tuple[int, ...]
    """Layers whose weights stay on the device for the model's lifetime."""
    streamed_layers: tuple[int, ...]
    """Layers whose weights are copied from host memory at every call, in streaming order."""
    weights_in_place: bool
    """Resident weights are used where the model holds them (already on the compute device),
    rather than copied into device buffers."""
    prefetch_depth: int
    """The copy of streamed layer ``i + prefetch_depth`` (in streaming order) is issued before
    streamed layer ``i`` computes."""
    ring_slots: int
    """Device slots streamed layers rotate through (``prefetch_depth + 1``, fewer if fewer layers stream)."""
    slot_bytes: int
    """Bytes of one slot: the largest streamed layer, packed."""
    memory: DeviceMemoryPlan
    minimum_device_bytes: int
    """The smallest budget that would run this graph (everything streamed through the ring)."""
    act_ratio: float | None
    """Fraction of cached tokens kept as activation checkpoints; None when the graph keeps
    no cache (a plain forward pass over whole sequences)."""
    block_size: int
    """Tokens per KV/ACT block."""
    reason: str
    """Why: which budget or resource decided it."""
    minibatches: int = 1
    """Mini-batches a step of the generation that compiled this graph runs as (1 for other graphs)."""
    predicted: Any = None
    """The cost model's :class:`~hscompile.runtime.cost_model.StepEstimate` of the longest decode
    step (generation graphs compiled with a profile), or None."""

    @property
    def copied_groups(self) -> tuple[int, ...]:
        """Groups copied once into resident device buffers (global group first)."""
        if self.weights_in_place:
            return ()
        return (GLOBAL_GROUP, *self.resident_layers)
