"""The cache runtime: what the cache ops do during one generation step.

The generator admits sequences into a :class:`~hscompile.runtime.blocks.HybridCache` and,
before each call of a compiled graph, tells this runtime which new tokens are real (a
:class:`StepRequest`). :class:`CacheRuntime` owns the batch's lifecycle and serves each op,
delegating to parts with one job each:

* :class:`~hscompile.runtime.step_plan.BlockTables` plans the step (one
  :class:`~hscompile.runtime.step_plan.StepPlan` per mini-batch, shared by every layer);
* :class:`~hscompile.runtime.loads.LoadPipeline` serves ``load_kv`` / ``load_act``: the past
  tokens' slots gathered from the host pool (into pinned staging on CUDA) and copied to the device;
* ``recompute_kv`` runs the best recompute program any graph of the model offered on the ACT
  tokens' checkpoints at their positions;
* :func:`~hscompile.runtime.attention.attend` serves ``cache_attention``;
* ``store_cache`` copies the new real tokens' K/V (KV slots) or layer input (ACT slots) to the
  host pools.

The driver sees the cache through :meth:`CacheRuntime.held_tokens`, never its block tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError, UnsupportedModelError
from ..ir.cache import CacheSpec
from ..ops.context import KVRecompute
from .attention import attend
from .blocks import HybridCache
from .loads import LoadPipeline
from .step_plan import BlockTables, StepPlan

__all__ = ["CacheCounters", "CacheRuntime", "StepRequest"]

# When transformers' own loop drives the model, the final length is unknown: sequences are
# admitted for the prompt and grow a block at a time, which keeps the ACT share of the tokens
# actually stored at the ratio (the pools double when they run out).


@dataclass(slots=True)
class StepRequest:
    """What the next call of a generation graph is, set by the driver before the call."""

    real: torch.Tensor
    """``(batch, new_tokens)`` bool: False marks padding, which is not stored."""
    admit: list[int] | None = None
    """For the first step of a batch: the token capacity of each sequence (prompt + new tokens).
    The batch replaces whatever the cache held."""
    groups: list[list[int]] | None = None
    """Mini-batches: row indices of the batch, in the order they run (None: one mini-batch). The
    executor runs the step whole, and resets this to None, when its graph cannot be split."""


@dataclass(slots=True)
class CacheCounters:
    kv_tokens: int = 0
    """Tokens stored as K/V (each once, for all layers)."""
    act_tokens: int = 0
    """Tokens stored as activation checkpoints."""
    recomputed_tokens: int = 0
    """Token-layers whose K/V were recomputed from a checkpoint (a token recomputed in 32 layers counts 32)."""
    cache_h2d_bytes: int = 0
    cache_d2h_bytes: int = 0
    steps: int = 0
    minibatches: int = 0
    """Mini-batches run, summed over steps (a step run whole counts one)."""

    def as_stats(self) -> dict[str, int]:
        """The counters under the names ``inspect(...).stats`` uses."""
        return {
            "kv_tokens": self.kv_tokens,
            "act_tokens": self.act_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "cache_h2d_bytes": self.cache_h2d_bytes,
            "cache_d2h_bytes": self.cache_d2h_bytes,
            "cache_steps": self.steps,
            "minibatches": self.minibatches,
        }


@dataclass(slots=True)
class CacheRuntime:
    """Serves the cache ops (see the module docstring)."""

    device: torch.device
    act_ratio: float = 0.0
    host_budget: int | None = None
    """Bytes the pools may use (``host_memory``)."""
    program: KVRecompute | None = None
    """The best recompute program a generation graph offered (see :meth:`offer`)."""
    no_program: str | None = None
    """Why a graph offered none; until one does, tokens are stored as K/V only."""
    spec: CacheSpec | None = None
    request: StepRequest | None = None
    cache: HybridCache | None = None
    sequences: list[int] = field(default_factory=list)
    step: StepPlan | None = None
    """The plan of the mini-batch running now (see :meth:`select`)."""
    plans: list[StepPlan] = field(default_factory=list)
    """One plan per mini-batch of the step in progress (empty between steps)."""
    index: int = 0
    """The mini-batch running now."""
    counters: CacheCounters = field(default_factory=CacheCounters)
    loads: LoadPipeline = field(init=False)
    tables: BlockTables | None = None

    def __post_init__(self) -> None:
        self.loads = LoadPipeline(self.device, self.counters)

    # -- configuration -------------------------------------------------------------------

    def configure(self, spec: CacheSpec) -> None:
        """Adopt the dimensions a compiled graph found; every graph of a model must agree."""
        if self.spec is None:
            self.spec = spec
        elif self.spec != spec:
            raise UnsupportedModelError(f"two graphs of one model disagree on its cache dimensions: {self.spec} vs {spec}")

    def offer(self, program: KVRecompute) -> None:
        """Keep the program that recomputes the most tokens per call (shape-generic ones first)."""
        def reach(p: KVRecompute) -> float:
            return float("inf") if p.tokens_per_call is None else p.tokens_per_call

        if self.program is None or reach(program) > reach(self.program):
            self.program = program

    @property
    def effective_act_ratio(self) -> float:
        """The ACT ratio new blocks get: the configured one once a recompute program exists, else 0."""
        return self.act_ratio if self.program is not None else 0.0

    @property
    def overlap_loads(self) -> bool:
        """Whether the next mini-batch's (or layer's) loads are in flight while one computes.
        Default: on CUDA, where they run on a copy stream beside the compute; setting it forces
        either order (tests run the CUDA order with synchronous copies)."""
        return self.loads.overlapping

    @overlap_loads.setter
    def overlap_loads(self, value: bool | None) -> None:
        self.loads.overlap = value

    def held_tokens(self) -> list[tuple[int, int]]:
        """``(kv_tokens, act_tokens)`` each sequence of the running batch holds, in batch order
        (empty without a batch)."""
        if self.cache is None:
            return []
        return [self.cache.held_tokens(seq) for seq in self.sequences]

    # -- lifecycle -----------------------------------------------------------------------

    def step_begin(self, hidden: torch.Tensor, past: torch.Tensor | None) -> None:
        """Start a step (the ``cache_step`` op): from the driver's request, else from the inputs."""
        if self.plans:  # a later mini-batch of a step already planned
            if hidden.shape[0] != self.plans[self.index].batch:
                raise RuntimeError(f"mini-batch {self.index} has {self.plans[self.index].batch} rows, graph got "
                                   f"{hidden.shape[0]}")
            return
        request, self.request = self.request, None
        batch, new = hidden.shape[0], hidden.shape[1]
        if request is not None:
            groups = request.groups or [list(range(request.real.shape[0]))]
            if (request.real.shape[0], request.real.shape[1]) != (sum(map(len, groups)), new) \
                    or len(groups[self.index]) != batch:
                raise RuntimeError(f"step request for {tuple(request.real.shape)} tokens in mini-batches of "
                                   f"{[len(g) for g in groups]} rows, graph got {(batch, new)}")
            if request.admit is not None:
                self._start_batch(request.admit, growable=False)
            self.begin_step(request.real.cpu(), groups=groups)
            return
        # transformers' own loop: it stores every token, padding included, and passes its cache
        # length as the past's size; mirror that layout exactly.
        length = int(past.shape[-2]) if past is not None else 0
        if length == 0:
            self._start_batch([new] * batch, growable=True)
        else:
            self._grow_for_loop(batch, length, new)
        self.begin_step(torch.ones(batch, new, dtype=torch.bool))

    def _grow_for_loop(self, batch: int, length: int, new: int) -> None:
        """Check that transformers' cache and ours agree, and give every sequence room for ``new`` tokens."""
        cache, tables = self.cache, self.tables
        assert cache is not None and tables is not None
        lengths = [cache.sequences[s].length for s in self.sequences]
        if len(self.sequences) != batch or any(n != length for n in lengths):
            raise RuntimeError(
                f"the transformers cache says {batch} sequences of {length} tokens but hscompile's cache holds "
                f"{len(self.sequences)} of {sorted(set(lengths))}: only one generation at a time, without beam "
                "search or cache reordering, is supported on this path"
            )
        cache.act_ratio = self.effective_act_ratio
        for seq in self.sequences:
            if length + new > cache.sequences[seq].capacity_tokens:
                try:
                    cache.extend(seq, length + new, limit_bytes=self.host_budget)
                except ValueError as error:
                    raise BudgetError(f"host_memory cannot hold the growing cache: {error}") from None
                tables.refresh(seq)

    def _start_batch(self, capacities: Sequence[int], *, growable: bool) -> None:
        assert self.spec is not None, "a compiled graph configures the cache before it runs"
        ratio = self.effective_act_ratio
        blocks = [self.spec.blocks_for(ratio, t) for t in capacities]
        cache = HybridCache.allocate(
            self.spec, ratio, sum(b[0] for b in blocks), sum(b[1] for b in blocks),
            pin=self.device.type == "cuda",
        )
        for seq, tokens in enumerate(capacities):
            if not cache.admit(seq, tokens):  # pragma: no cover - the pools are sized for the batch
                raise RuntimeError(f"sequence {seq} did not fit pools sized for it")
        self.start(cache, range(len(capacities)))

    def end_batch(self) -> None:
        """Give every sequence's blocks back (the driver's batch is done)."""
        if self.cache is not None:
            for seq in list(self.cache.sequences):
                self.cache.release(seq)
        self._end_plans()
        self.request = None

    def start(self, cache: HybridCache, sequences: Sequence[int]) -> None:
        """Begin generating ``sequences`` (admitted in ``cache``), in batch order."""
        self.cache = cache
        self.sequences = list(sequences)
        self.tables = BlockTables(cache, self.sequences, self.device)

    def select(self, index: int) -> None:
        """Make mini-batch ``index`` of the step the one the cache ops act on."""
        self.index = index
        if self.plans:
            self.step = self.plans[index]

    def begin_step(self, real: torch.Tensor, groups: Sequence[Sequence[int]] | None = None) -> None:
        """Plan a step whose new tokens are ``real`` (``(batch, seq)`` bool: False for padding), one
        plan per mini-batch of ``groups`` (row indices; default: the whole batch)."""
        assert self.tables is not None
        rows = groups if groups is not None else [range(real.shape[0])]
        self.plans = [self.tables.plan(real[list(r)], [self.sequences[b] for b in r]) for r in rows]
        self.counters.minibatches += len(self.plans)
        self.step = self.plans[self.index]

    def end_step(self) -> None:
        """Commit the step: the new tokens are now part of every sequence's past."""
        assert self.plans and self.cache is not None
        for plan in self.plans:
            for b, seq in enumerate(plan.sequences):
                self.cache.sequences[seq].length += plan.new_kv[b] + plan.new_act[b]
            self.counters.kv_tokens += sum(plan.new_kv)
            self.counters.act_tokens += sum(plan.new_act)
        self.counters.steps += 1
        self._end_plans()

    def _end_plans(self) -> None:
        self.step = None
        self.plans = []
        self.index = 0
        self.loads.clear()

    def staging_bytes(self) -> int:
        """Device bytes one layer's cache steps hold at once in this step (for the budget check)."""
        cache = self.cache
        if not self.plans or cache is None:
            return 0
        spec = cache.spec
        staged = max(spec.staging_bytes(p.batch, p.width, p.new_tokens, *p.loaded_tokens) for p in self.plans)
        if not self.loads.overlapping:
            return staged
        # the next mini-batch's loads are in flight while this one computes
        return staged + max(spec.loaded_bytes(*p.loaded_tokens) for p in self.plans)

    # -- the ops -------------------------------------------------------------------------

    def load_kv(self, layer: int) -> torch.Tensor:
        assert self.cache is not None and self.plans
        return self.loads.load(self.cache, self.plans, "kv", layer, self.index)

    def load_act(self, layer: int) -> torch.Tensor:
        assert self.cache is not None and self.plans
        return self.loads.load(self.cache, self.plans, "act", layer, self.index)

    def recompute(self, layer: int, act: torch.Tensor, weights: Sequence[torch.Tensor],
                  rotary_weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """K/V of the step's ACT tokens, by the best program any graph of the model offered."""
        assert self.step is not None and self.cache is not None
        spec = self.cache.spec
        if act.shape[0] == 0:
            return act.new_empty((0, 2, spec.kv_heads, spec.head_dim))
        if self.program is None:
            raise RuntimeError("no recompute program: this model's K/V cannot be recomputed from checkpoints")
        self.counters.recomputed_tokens += act.shape[0]
        return self.program(layer, act, weights, rotary_weights, self.step.act_positions)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               past_kv: torch.Tensor, recomputed: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None, is_causal: bool) -> torch.Tensor:
        assert self.step is not None
        return attend(self.step, query, key, value, past_kv, recomputed, attn_mask, scale, is_causal)

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
              positions: torch.Tensor | None) -> None:
        step, cache = self.step, self.cache
        assert step is not None and cache is not None and self.tables is not None
        batch, kv_heads, new, head_dim = key.shape
        dtype = cache.spec.dtype
        if step.store_kv_src.numel():
            flat_k = key.transpose(1, 2).reshape(batch * new, kv_heads, head_dim)
            flat_v = value.transpose(1, 2).reshape(batch * new, kv_heads, head_dim)
            packed = torch.stack((flat_k[step.store_kv_src], flat_v[step.store_kv_src]), dim=1).to(dtype)
            cache.kv[layer].index_copy_(0, step.store_kv_slots, packed.cpu())
            self.counters.cache_d2h_bytes += packed.numel() * packed.element_size()
        if step.store_act_src.numel():
            packed = hidden.reshape(batch * new, -1)[step.store_act_src].to(dtype)
            cache.act[layer].index_copy_(0, step.store_act_slots, packed.cpu())
            self.counters.cache_d2h_bytes += packed.numel() * packed.element_size()
        if layer == 0 and positions is not None:
            self.tables.record_positions(step, positions)
