"""The cache runtime: what the cache ops do during one generation step.

The generator admits sequences into a :class:`~hscompile.runtime.blocks.HybridCache` and,
before each call of a compiled graph, tells this runtime which new tokens are real (a
:class:`StepRequest`). :class:`CacheRuntime` owns the batch's lifecycle and serves each op,
delegating to parts with one job each:

* :func:`~hscompile.runtime.step_plan.plan_step` plans the step once (one
  :class:`~hscompile.runtime.step_plan.StepPlan` per mini-batch, shared by every layer: runs,
  destinations, the mask);
* :class:`~hscompile.runtime.loads.LoadPipeline` serves ``load_kv`` / ``load_act``: each run of
  past tokens copied from the pool straight into the buffer attention reads;
* ``recompute_kv`` runs the best recompute program any graph of the model offered on the ACT
  tokens' checkpoints at their positions;
* :func:`~hscompile.runtime.attention.attend` serves ``cache_attention``;
* ``store_cache`` copies the new real tokens' K/V (KV slots) or layer input (ACT slots) into the
  host pools: on CUDA asynchronously, on the copy stream the next step's loads also use, so no
  block is read before its store is done, and the host never waits for a store.

A call whose plan spills (``CallPlan.spill``) keeps the blocks its host budget leaves out in files
of ``offload_dir`` (:mod:`~hscompile.runtime.spill`): loads read their runs into host staging,
stores of new tokens into them are written once the step's tokens were fetched, before the next
step's loads.

No host wait happens inside a step: the one a step needs (its tokens) is the driver's
:meth:`CacheRuntime.fetch`, counted with every other in ``host_syncs``. The driver sees the cache
through :meth:`CacheRuntime.held_tokens`, never its block tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BudgetError, UnsupportedModelError
from ..ir.cache import CacheSpec
from ..ir.call import CallPlan
from ..ops.context import KVRecompute
from ..ops.quant import quantize_rows
from .attention import attend, read_bytes
from .blocks import HybridCache
from .device import DeviceBackend, device_backend
from .loads import LoadPipeline
from .spill import split_runs
from .step_plan import PositionTable, StepPlan, plan_step

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
    cache_disk_read_bytes: int = 0
    """Bytes of cache blocks read from files (a spilled call): part of ``cache_h2d_bytes``."""
    cache_disk_write_bytes: int = 0
    """Bytes of new tokens written into blocks on disk: part of ``cache_d2h_bytes``."""
    cache_disk_blocks: int = 0
    """Blocks of the last batch kept on disk (both kinds)."""
    steps: int = 0
    minibatches: int = 0
    """Mini-batches run, summed over steps (a step run whole counts one)."""
    load_runs: int = 0
    """Copies the loads issued (each a contiguous run of a pool into a buffer)."""
    host_gather_bytes: int = 0
    """Bytes the host copied to assemble loads (a gather into staging before the transfer).
    The loads copy runs straight from the pools, so this stays 0; it is counted so that a
    gather brought back would show."""
    attention_assembly_bytes: int = 0
    """Device bytes written to assemble attention's inputs: loaded K/V, recomputed K/V placed, new
    K/V appended, and the buffers' zeroing when they are allocated."""
    attention_read_bytes: int = 0
    """Bytes of K/V attention read (past + new tokens of every row, padding included)."""

    def as_stats(self) -> dict[str, int]:
        """The counters under the names ``inspect(...).stats`` uses."""
        return {
            "kv_tokens": self.kv_tokens,
            "act_tokens": self.act_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "cache_h2d_bytes": self.cache_h2d_bytes,
            "cache_d2h_bytes": self.cache_d2h_bytes,
            "cache_disk_read_bytes": self.cache_disk_read_bytes,
            "cache_disk_write_bytes": self.cache_disk_write_bytes,
            "cache_disk_blocks": self.cache_disk_blocks,
            "cache_steps": self.steps,
            "minibatches": self.minibatches,
            "load_runs": self.load_runs,
            "host_gather_bytes": self.host_gather_bytes,
            "attention_assembly_bytes": self.attention_assembly_bytes,
            "attention_read_bytes": self.attention_read_bytes,
        }


@dataclass(slots=True)
class CacheRuntime:
    """Serves the cache ops (see the module docstring)."""

    device: torch.device
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
    plan: CallPlan = field(default_factory=lambda: CallPlan.fixed(0.0))
    """The plan of the call being served (its ACT ratio); set by :meth:`use`."""
    backend: DeviceBackend = field(init=False)
    loads: LoadPipeline = field(init=False)
    positions: PositionTable | None = None
    _buffer: torch.Tensor | None = None
    _in_flight: list[torch.Tensor] = field(default_factory=list)
    _stored: Any = None
    """The event after the step's last store copy (asynchronous backends)."""
    _columns: int | None = None
    """Columns of the attention buffers: the longest sequence's tokens when done (known when the
    driver admits the batch; under transformers' loop, the longest capacity so far)."""

    def __post_init__(self) -> None:
        self.backend = device_backend(self.device)
        self.loads = LoadPipeline(self.backend, self.counters)

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

    def use(self, plan: CallPlan) -> None:
        """Serve the calls of ``plan`` from now on: blocks admitted later are split at its ratio."""
        self.plan = plan

    @contextlib.contextmanager
    def serving(self, request: StepRequest) -> Iterator[None]:
        """``request`` is what the graph called inside the block runs; cleared after it, whether
        the call returned or raised (a stale request would be taken by the next graph's step)."""
        self.request = request
        try:
            yield
        finally:
            self.request = None

    @property
    def effective_act_ratio(self) -> float:
        """The ACT ratio new blocks get: the plan's once a recompute program exists, else 0."""
        return self.plan.act_ratio if self.program is not None else 0.0

    @property
    def overlap_loads(self) -> bool:
        """Whether the next mini-batch's (or layer's) loads are in flight while one computes.
        Default: where copies are asynchronous (CUDA); setting it forces either order (tests run
        the CUDA order with synchronous copies)."""
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

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the host: the step's one (counted) wait of the host on the device."""
        return self.backend.fetch(x)

    # -- lifecycle -----------------------------------------------------------------------

    def step_begin(self, hidden: torch.Tensor, past: torch.Tensor | None) -> None:
        """Start a step (the ``cache_step`` op): from the driver's request, else from the inputs."""
        if self.plans:  # a later mini-batch of a step already planned
            if hidden.shape[0] != self.plans[self.index].batch:
                raise RuntimeError(f"mini-batch {self.index} has {self.plans[self.index].batch} rows, graph got "
                                   f"{hidden.shape[0]}")
            return
        self._settle_disk()
        self._in_flight.clear()  # the previous step's tokens were fetched: its stores are done
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
        cache = self.cache
        assert cache is not None and self.positions is not None
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
                    # A pool that grows is copied by the host: the stores into it must be done
                    # (a counted wait, once per doubling of a pool).
                    cache.extend(seq, length + new, limit_bytes=self.host_budget, settle=self.backend.synchronize)
                except ValueError as error:
                    raise BudgetError(f"host_memory cannot hold the growing cache: {error}") from None
        self.positions.grow(cache.slots("act"))

    def _start_batch(self, capacities: Sequence[int], *, growable: bool) -> None:
        assert self.spec is not None, "a compiled graph configures the cache before it runs"
        ratio = self.effective_act_ratio
        blocks = [self.spec.blocks_for(ratio, t) for t in capacities]
        before = self._pool_sizes()
        cache = self._allocate(ratio, blocks)
        for seq, tokens in enumerate(capacities):
            if not cache.admit(seq, tokens):  # pragma: no cover - the pools are sized for the batch
                raise RuntimeError(f"sequence {seq} did not fit pools sized for it")
        self.start(cache, range(len(capacities)))
        self._columns = None if growable else max(capacities)
        self._trim_host(before)

    def _allocate(self, ratio: float, blocks: Sequence[tuple[int, int]]) -> HybridCache:
        """Pools for sequences of ``blocks`` (KV, ACT) each; where the call's plan spills, the
        blocks past its host share in files of its directory."""
        assert self.spec is not None
        if self.cache is not None:
            self.cache.close()  # the last batch's files: replaced
        spill = self.plan.spill
        cache = HybridCache.allocate(
            self.spec, ratio, sum(b[0] for b in blocks), sum(b[1] for b in blocks), host=self.backend,
            host_blocks=spill.host_blocks if spill is not None else None,
            spill_dir=spill.directory if spill is not None else None)
        self.counters.cache_disk_blocks = cache.disk_blocks
        return cache

    def _settle_disk(self) -> None:
        """Between steps: write the stored rows bound for blocks on disk (the host has the last
        step's tokens, so their copies are done) and drop the files' pages from the page cache."""
        cache = self.cache
        if cache is None or (cache.kv_file is None and cache.act_file is None):
            return
        self.loads.spill.flush()
        for file in (cache.kv_file, cache.act_file):
            if file is not None:
                file.drop_cached()

    def pool_bytes(self) -> int:
        """Host memory the pools take now (rounded as allocated; 0 without pools)."""
        return sum(self._pool_sizes() or ())

    def _pool_sizes(self) -> tuple[int, int] | None:
        """What each pool takes now (rounded as allocated), None without pools."""
        if self.cache is None:
            return None
        return self.backend.host_bytes(self.cache.kv.nbytes), self.backend.host_bytes(self.cache.act.nbytes)

    def _trim_host(self, before: tuple[int, int] | None) -> None:
        """Give the pinned allocator's cached blocks back once pools of another size replaced the old
        ones: it keeps freed blocks by size class, so batches of changing sizes would pile them up
        (pools of the same size reuse their block: no trim, no new pinning)."""
        if before is not None and before != self._pool_sizes():
            self.backend.release_host_cache()

    def fork(self, sources: Sequence[int], capacities: Sequence[int]) -> None:
        """Replace the batch just prefilled by ``len(sources)`` sequences: sequence ``i`` starts as a
        copy of what row ``sources[i]`` holds, with room for ``capacities[i]`` tokens.

        ``n > 1`` completions of one prompt prefill it once and copy its stored tokens here (every
        layer's KV and ACT rows, host to host, and the checkpoints' positions) instead of
        computing them ``n`` times. A copy's blocks are split like its source's (same ratio, same
        final length), so each token keeps its kind. Runs between steps, after the prefill's
        tokens were fetched (its stores are then done); the old pools are freed after the copy.
        """
        old, spec, positions = self.cache, self.spec, self.positions
        assert old is not None and spec is not None and positions is not None and not self.plans
        self._settle_disk()  # the prefill's rows bound for its files are written before they are read
        before = self._pool_sizes()
        sequences = self.sequences
        blocks = [spec.blocks_for(old.act_ratio, tokens) for tokens in capacities]
        self.cache = None  # the old pools are read below: not closed yet
        new = self._allocate(old.act_ratio, blocks)
        self.start(new, range(len(capacities)))
        assert self.positions is not None
        for seq, (row, tokens) in enumerate(zip(sources, capacities, strict=True)):
            if not new.admit(seq, tokens):  # pragma: no cover - the pools are sized for the batch
                raise RuntimeError(f"sequence {seq} did not fit pools sized for it")
            source = sequences[row]
            length = old.sequences[source].length
            for kind, slot, first, count in old.pieces(source, 0, length):
                for to_kind, to_slot, to_first, to_count in new.pieces(seq, first, first + count):
                    if to_kind != kind:
                        raise RuntimeError(f"a copy of sequence {source} splits its blocks differently from it")
                    start = slot + to_first - first
                    new.set_rows(kind, to_slot, old.rows(kind, start, to_count))
                    if kind == "act":
                        self.positions.positions[to_slot:to_slot + to_count] = positions.positions[start:start + to_count]
            new.sequences[seq].length = length
        self._columns = max(capacities)
        old.close()
        del old  # the old pools are free now
        self._trim_host(before)

    def end_batch(self) -> None:
        """Give every sequence's blocks back (the driver's batch is done)."""
        if self.cache is not None:
            for seq in list(self.cache.sequences):
                self.cache.release(seq)
        self._end_plans()
        self.loads.release()
        self.backend.wait(self._stored)  # buffers still being stored are freed after their copies
        self._stored = None
        self._in_flight.clear()
        self.request = None
        if self.cache is not None:
            self.cache.close()

    def start(self, cache: HybridCache, sequences: Sequence[int]) -> None:
        """Begin generating ``sequences`` (admitted in ``cache``), in batch order."""
        self.cache = cache
        self.sequences = list(sequences)
        self._columns = None
        self.positions = PositionTable(cache.slots("act"), self.device)
        self.loads.release()

    def select(self, index: int) -> None:
        """Make mini-batch ``index`` of the step the one the cache ops act on."""
        self.index = index
        if self.plans:
            self.step = self.plans[index]

    def begin_step(self, real: torch.Tensor, groups: Sequence[Sequence[int]] | None = None) -> None:
        """Plan a step whose new tokens are ``real`` (``(batch, seq)`` bool: False for padding), one
        plan per mini-batch of ``groups`` (row indices; default: the whole batch)."""
        cache = self.cache
        assert cache is not None
        rows = groups if groups is not None else [range(real.shape[0])]
        columns = self._columns or max(cache.sequences[s].capacity_tokens for s in self.sequences)
        self.plans = [plan_step(cache, real[list(r)], [self.sequences[b] for b in r], columns, self.backend.upload)
                      for r in rows]
        if any(p.width for p in self.plans):
            self.loads.prepare(cache.spec, self.plans, columns)
        self.counters.minibatches += len(self.plans)
        self.step = self.plans[self.index]

    def end_step(self) -> None:
        """Commit the step: the new tokens are now part of every sequence's past. Where stores are
        asynchronous, what follows on the compute stream (the step's tokens the host fetches) waits
        for them on the device: once the host has its tokens, the stores are done too."""
        assert self.plans and self.cache is not None
        self.backend.wait(self._stored)
        self._stored = None
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
        self._buffer = None
        self.loads.clear()

    def staging_bytes(self) -> int:
        """Device bytes the cache steps hold in this step (for the budget check): the arena's
        buffers and, per layer, the recomputed K/V and the mask."""
        arena = self.loads.arena
        if arena is None or self.spec is None:
            return 0
        spec = self.spec
        transient = max((spec.staging_bytes(p.batch, p.width + p.new_tokens, p.new_tokens, p.act_tokens, buffers=0)
                         for p in self.plans), default=0)
        return arena.nbytes + transient

    # -- the ops -------------------------------------------------------------------------

    def load_kv(self, layer: int) -> torch.Tensor:
        return self._load("kv", layer)

    def load_act(self, layer: int) -> torch.Tensor:
        return self._load("act", layer)

    def _load(self, kind: str, layer: int) -> torch.Tensor:
        assert self.cache is not None and self.plans
        if not self.step or not self.step.width:  # a prefill: no past to load
            return torch.empty(0, device=self.device)
        return self.loads.load(self.cache, self.plans, kind, layer, self.index)

    def recompute(self, layer: int, act: torch.Tensor, weights: Sequence[torch.Tensor],
                  rotary_weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """K/V of the step's ACT tokens, by the best program any graph of the model offered."""
        assert self.step is not None and self.cache is not None and self.positions is not None
        spec = self.cache.spec
        if act.numel() == 0:
            return act.new_empty((0, 2, spec.kv_heads, spec.head_dim))
        if self.program is None:
            raise RuntimeError("no recompute program: this model's K/V cannot be recomputed from checkpoints")
        self.counters.recomputed_tokens += act.shape[0]
        return self.program(layer, act, weights, rotary_weights, self.positions.of(self.step))

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               past_kv: torch.Tensor, recomputed: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None, is_causal: bool) -> torch.Tensor:
        step = self.step
        assert step is not None
        out, written = attend(step, past_kv, query, key, value, recomputed, attn_mask, scale, is_causal,
                              self._check)
        self._buffer = past_kv if step.width else None
        self.counters.attention_assembly_bytes += written
        self.counters.attention_read_bytes += read_bytes(step, key)
        return out

    def _check(self, flag: torch.Tensor) -> bool:
        return bool(self.backend.fetch(flag))

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
              positions: torch.Tensor | None) -> None:
        """The step's new real tokens into the pools: K/V into KV slots, the layer input into ACT slots."""
        step, cache = self.step, self.cache
        assert step is not None and cache is not None
        batch, kv_heads, new, head_dim = key.shape
        dtype = cache.spec.dtype
        if step.store_kv_src.numel():
            if step.every_new_token_is_kv and self._buffer is not None:
                # The new tokens' K/V were appended to the attention buffer, already packed.
                packed = self._buffer[:batch, step.width:step.width + new].reshape(batch * new, 2, kv_heads, head_dim)
            else:
                packed = torch.stack((key.transpose(1, 2).reshape(batch * new, kv_heads, head_dim)[step.store_kv_src],
                                      value.transpose(1, 2).reshape(batch * new, kv_heads, head_dim)[step.store_kv_src]),
                                     dim=1)
            # Its own memory, never a view of the attention buffer: a store copy still reading that
            # buffer would otherwise be ordered before compute rewrites it only by a later load
            # happening to share its stream.
            packed = packed.to(dtype, copy=packed.dtype == dtype and self.backend.asynchronous and not cache.spec.quantized)
            if cache.spec.quantized:  # a row of bytes a token: int8 K/V, a scale per head
                packed = quantize_rows(packed, head_dim)
            self._store(cache, packed, step.store_kv_slots, step.store_kv_runs, layer, "kv")
        if step.store_act_src.numel():
            packed = hidden.reshape(batch * new, -1)[step.store_act_src].to(dtype)  # a gather: its own memory
            if cache.spec.quantized:
                packed = quantize_rows(packed, packed.shape[1])
            self._store(cache, packed, step.store_act_slots, step.store_act_runs, layer, "act")
        if layer == 0 and positions is not None:
            assert self.positions is not None
            self.positions.record(step, positions)
        if step.width:
            self.loads.done_with(layer, self.index, len(self.plans))

    def _store(self, cache: HybridCache, packed: torch.Tensor, slots: torch.Tensor, runs: list[tuple[int, int, int]],
               layer: int, kind: str) -> None:
        self.counters.cache_d2h_bytes += packed.numel() * packed.element_size()
        pool = (cache.kv if kind == "kv" else cache.act)[layer]
        file = cache.file(kind)  # type: ignore[arg-type]
        if file is not None:
            runs, disk_runs = split_runs(runs, pool.shape[0])
            after = self.backend.record()
            for slot, first, count in disk_runs:
                done = self.loads.spill.store(file, layer, slot, packed[first:first + count], after=after,
                                              label=f"L{layer} store {kind} (disk)")
                self._stored = done if done is not None else self._stored  # end_step's wait covers it
                self.counters.cache_disk_write_bytes += count * file.row_bytes
            if disk_runs and not self.backend.asynchronous:  # written already; the host part, run by run
                for slot, first, count in runs:
                    pool[slot:slot + count].copy_(packed[first:first + count])
                return
        if not self.backend.asynchronous:
            pool.index_copy_(0, slots, packed)
            return
        # Straight into the pinned pool, on the copy stream after this layer's compute: the
        # next step's loads of these blocks run on that same stream, after it.
        after = self.backend.record()
        for slot, first, count in runs:
            self._stored = self.backend.copy_to_host(pool[slot:slot + count], packed[first:first + count], after=after,
                                                     label=f"L{layer} store {kind}")
            after = None
        self._in_flight.append(packed)  # alive until the copies are done (the step's tokens were fetched)
