"""The per-call plan: every decision one generation call runs with, made once before any work.

:func:`hscompile.planner.choice.plan_call` builds it; the generator, the placement of graphs
compiled during the call (:func:`hscompile.passes.place.place`), the budget checks and the
cache runtime (:meth:`hscompile.runtime.cache.CacheRuntime.use`) read it and never decide again.
It lives here, as plain data, because both ``passes/`` and ``runtime/`` read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CacheSpill", "CallPlan"]


@dataclass(frozen=True, slots=True)
class CacheSpill:
    """A call whose batch runs whole although the host budget cannot hold its cache blocks: the
    blocks past ``host_blocks`` live in files of ``directory`` and are read at every step
    (:mod:`hscompile.runtime.spill`)."""

    host_blocks: tuple[int, int]
    """``(KV, ACT)`` blocks the host pools keep (the call's first blocks of each kind)."""
    disk_blocks: tuple[int, int]
    """``(KV, ACT)`` blocks on disk."""
    disk_bytes: int
    """The files' size."""
    directory: str
    """``offload_dir``."""
    act_ratio: float
    """The call's ACT ratio: with an ``"auto"`` one, chosen with the disk bytes counted."""
    seconds: float | None = None
    """The cost model's prediction for the call run this way (None: ``disk_cache="on"`` decided,
    with no hardware profile at hand)."""
    waves_seconds: float | None = None
    """Its prediction for the waves the host budget would otherwise form."""
    waves: int = 1
    """How many waves that would have been (0: not even one sequence fits the host budget alone)."""


@dataclass(frozen=True, slots=True)
class CallPlan:
    """How one call runs (see the module docstring)."""

    act_ratio: float
    """Fraction of each sequence's cached tokens kept as activation checkpoints."""
    staged_ratio: float
    """The ACT ratio the cache staging of graphs compiled in this call is sized for: at least
    ``act_ratio``, and with ``act_ratio="auto"`` the most any later call's search may pick, so a
    later call with another ratio needs no new placement."""
    minibatch_rows: int | None = None
    """Rows per mini-batch a step is split into (None: every step runs whole)."""
    minibatches: int = 1
    """Mini-batches a step of the largest wave runs as (what the runtime forms at
    ``minibatch_rows``: :func:`~hscompile.planner.minibatch.minibatch_count`)."""
    waves: tuple[tuple[int, ...], ...] = ()
    """Sequences (indices of the call's batch) whose cache blocks fit the host budget together,
    largest wave first: each runs to its end before the next is admitted."""
    staging_bytes: int = 0
    """Device bytes one layer's cache steps hold at the call's longest decode step (the placement
    of a graph compiled in this call leaves room for it)."""
    workload: tuple[int, int, int] | None = None
    """``(batch, prompt, new_tokens)`` of the largest wave, for the placement's prediction."""
    profile: Any = None
    """The :class:`~hscompile.planner.hardware.HardwareProfile` the call was searched on (None:
    nothing was ``"auto"``)."""
    decision: Any = None
    """The cost model's :class:`~hscompile.planner.cost_model.Decision` (alternatives and why),
    where something was ``"auto"`` and some choice fit the budget."""
    spill: CacheSpill | None = None
    """Where the call keeps cache blocks on disk (None: all in host memory)."""
    sampling: Any = None
    """How the call picks tokens, every default applied
    (:class:`~hscompile.generation.params.Sampling`; None outside a generator's call)."""

    @classmethod
    def fixed(cls, act_ratio: float) -> CallPlan:
        """A plan that only sets the ratio: transformers' own generation loop drives the model,
        so nothing about the call is known ahead (no staging is reserved, no waves)."""
        return cls(act_ratio=act_ratio, staged_ratio=act_ratio)

    @property
    def largest_minibatch(self) -> int:
        """Rows of the largest mini-batch of the largest wave (0 without a workload)."""
        if self.workload is None:
            return 0
        return -(-self.workload[0] // self.minibatches)
