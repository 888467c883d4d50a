"""The placement and caching decisions a compiled model runs with, and the device-memory
arithmetic behind them: one home for the workspace reserve (:func:`workspace_reserve`), the
device memory a plan or a call needs (:class:`DeviceMemoryPlan`) and the check of the budget
(:func:`check_device_budget`), which placement, the generator and the runtime all call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import format_bytes
from ..errors import BudgetError
from .layout import GLOBAL_GROUP
from .quant import QuantScheme

__all__ = ["CUDA_WORKSPACE_RESERVE", "DeviceMemoryPlan", "Policy", "check_device_budget",
           "workspace_reserve"]

CUDA_WORKSPACE_RESERVE = 64 * 2**20
"""Device bytes kept free on CUDA for library workspaces (cuBLAS, attention kernels) that no
graph shows, plus a tenth of the activation estimate. A conservative choice, not a measurement."""


def workspace_reserve(device_type: str, transient_bytes: int) -> int:
    """Device bytes kept free beside ``transient_bytes`` of activations and cache staging: on
    CUDA :data:`CUDA_WORKSPACE_RESERVE` plus a tenth of them; nothing elsewhere."""
    return CUDA_WORKSPACE_RESERVE + transient_bytes // 10 if device_type == "cuda" else 0


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
    dequantized: int = 0
    """Full-precision copies of one layer's quantized weights (``weight_quant``), which its
    partitions make from the parts and drop when they return: at most a layer's worth at once."""

    @classmethod
    def build(cls, device_type: str, *, global_weights: int, resident_layers: int, ring: int, activations: int,
              cache_staging: int = 0, dequantized: int = 0) -> DeviceMemoryPlan:
        """The plan with its workspace reserve for ``device_type`` (:func:`workspace_reserve`)."""
        return cls(global_weights=global_weights, resident_layers=resident_layers, ring=ring, activations=activations,
                   reserve=workspace_reserve(device_type, activations + cache_staging), cache_staging=cache_staging,
                   dequantized=dequantized)

    def for_call(self, device_type: str, *, activations: int, cache_staging: int) -> DeviceMemoryPlan:
        """The same weights with one call's activations and cache staging."""
        return DeviceMemoryPlan.build(device_type, global_weights=self.global_weights,
                                      resident_layers=self.resident_layers, ring=self.ring, activations=activations,
                                      cache_staging=cache_staging, dequantized=self.dequantized)

    @property
    def weights(self) -> int:
        return self.global_weights + self.resident_layers + self.ring + self.dequantized

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.reserve + self.cache_staging

    def describe(self) -> str:
        """The parts, as a sum of sizes."""
        parts = [f"global weights {format_bytes(self.global_weights)}"]
        if self.resident_layers:
            parts.append(f"resident layers {format_bytes(self.resident_layers)}")
        if self.ring:
            parts.append(f"a slot ring {format_bytes(self.ring)}")
        if self.dequantized:
            parts.append(f"dequantized weights {format_bytes(self.dequantized)}")
        parts.append(f"activations {format_bytes(self.activations)}")
        if self.cache_staging:
            parts.append(f"cache staging {format_bytes(self.cache_staging)}")
        if self.reserve:
            parts.append(f"workspace reserve {format_bytes(self.reserve)}")
        return " + ".join(parts)


def check_device_budget(memory: DeviceMemoryPlan, budget: int | None, *, what: str, advice: str) -> None:
    """Raise :class:`~hscompile.errors.BudgetError` when ``memory`` does not fit ``budget`` (None: no
    limit). The one check of the device budget: placement, the generator and the runtime call it;
    ``what`` names what needs the memory, ``advice`` says what would fit."""
    if budget is None or memory.total <= budget:
        return
    raise BudgetError(
        f"{what} needs {format_bytes(memory.total)} ({memory.total} bytes) of device memory ({memory.describe()}), "
        f"above device_memory={format_bytes(budget)} ({budget} bytes); {advice}"
    )


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
    """The cost model's :class:`~hscompile.planner.cost_model.StepEstimate` of the longest decode
    step (generation graphs compiled with a profile), or None."""
    weight_format: QuantScheme | None = None
    """How the layers' projections are stored and moved (``weight_quant``), or None: as the model
    holds them. The layouts (:func:`~hscompile.ir.layout.group_layouts`) follow it."""
    disk_layers: tuple[int, ...] = ()
    """Streamed layers whose weights stay on disk (in the checkpoint's files) and are read into
    host staging slots at every step, ahead of their copies (the disk tier; a subset of
    :attr:`streamed_layers`). A resident layer on disk is read once, when the graph is built."""
    disk_slots: int = 0
    """Host staging slots the disk tier reads into (0: no layer on disk)."""
    disk_slot_bytes: int = 0
    """Bytes of one staging slot: the largest on-disk layer's reads, with their alignment."""
    offload_dir: str | None = None
    """Where layers on disk stored quantized (``weight_format``) are written once, packed, and read
    from; None when no layer needs it."""

    @property
    def copied_groups(self) -> tuple[int, ...]:
        """Groups copied once into resident device buffers (global group first)."""
        if self.weights_in_place:
            return ()
        return (GLOBAL_GROUP, *self.resident_layers)
