"""The cache runtime: what the cache ops do during one generation step.

The generator admits sequences into a :class:`~hscompile.runtime.blocks.HybridCache` and,
before each call of a compiled graph, tells this runtime which new tokens are real
(:meth:`CacheRuntime.begin_step`). That produces a :class:`StepPlan`: the pool slots of every
past token, split by kind, where each lands in the attention layout, and where each new token
is stored. Each layer's ops then use the same plan:

* ``load_kv`` / ``load_act``: ``index_select`` of the past tokens' slots from the host pool
  (into pinned staging on CUDA) and one copy to the device;
* ``recompute_kv``: the recompute program on the ACT tokens' checkpoints at their positions;
* ``cache_attention``: past K/V assembled per sequence, left-padded to the longest past (the
  layout transformers' own cache has for a left-padded batch), concatenated with the new
  tokens' K/V, attention with the padding mask;
* ``store_cache``: the new real tokens' K/V (KV slots) or layer input (ACT slots) copied to the
  host pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BudgetError, UnsupportedModelError
from ..ops import in_attention_layout
from ..passes.recompute import RecomputeProgram
from .blocks import CacheSpec, HybridCache
from .device import DeviceBackend, device_backend

__all__ = ["CacheCounters", "CacheRuntime", "StepPlan", "StepRequest"]

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
class StepPlan:
    """Index plan of one step, shared by every layer."""

    batch: int
    new_tokens: int
    sequences: list[int]
    """The cache's sequence ids of this plan's rows, in row order."""
    past: list[int]
    width: int
    """Past length of the longest sequence: the padded layout's past width."""
    padded: bool
    kv_slots: torch.Tensor
    kv_dest: torch.Tensor
    act_slots: torch.Tensor
    act_dest: torch.Tensor
    act_positions: torch.Tensor
    store_kv_src: torch.Tensor
    store_kv_slots: torch.Tensor
    store_act_src: torch.Tensor
    store_act_slots: torch.Tensor
    new_kv: list[int]
    new_act: list[int]


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
    program: RecomputeProgram | None = None
    """The best recompute program a generation graph offered (see :meth:`offer`)."""
    no_program: str | None = None
    """Why a graph offered none; until one does, tokens are stored as K/V only."""
    spec: CacheSpec | None = None
    act_ratio: float = 0.0
    host_budget: int | None = None
    """Bytes the pools may use (``host_memory``)."""
    request: StepRequest | None = None
    cache: HybridCache | None = None
    sequences: list[int] = field(default_factory=list)
    step: StepPlan | None = None
    """The plan of the mini-batch running now (see :meth:`select`)."""
    plans: list[StepPlan] = field(default_factory=list)
    """One plan per mini-batch of the step in progress (empty between steps)."""
    index: int = 0
    """The mini-batch running now."""
    overlap_loads: bool | None = None
    """Issue the next mini-batch's (or layer's) cache loads before this one computes. Default:
    on CUDA, where they run on a copy stream beside the compute; on the CPU they would only
    hold memory longer."""
    counters: CacheCounters = field(default_factory=CacheCounters)
    _pending: dict[tuple[str, int, int], tuple[torch.Tensor, Any, torch.Tensor]] = field(default_factory=dict)
    _backend: DeviceBackend | None = None
    _tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _pos_kv: torch.Tensor | None = None
    _pos_act: torch.Tensor | None = None

    # -- configuration -------------------------------------------------------------------

    def configure(self, spec: CacheSpec) -> None:
        """Adopt the dimensions a compiled graph found; every graph of a model must agree."""
        if self.spec is None:
            self.spec = spec
        elif self.spec != spec:
            raise UnsupportedModelError(f"two graphs of one model disagree on its cache dimensions: {self.spec} vs {spec}")

    def offer(self, program: RecomputeProgram) -> None:
        """Keep the program that recomputes the most tokens per call (shape-generic ones first)."""
        def reach(p: RecomputeProgram) -> float:
            return float("inf") if p.tokens_per_call is None else p.tokens_per_call

        if self.program is None or reach(program) > reach(self.program):
            self.program = program

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
            assert self.cache is not None
            lengths = [self.cache.sequences[s].length for s in self.sequences] if self.cache else []
            if len(self.sequences) != batch or any(n != length for n in lengths):
                raise RuntimeError(
                    f"the transformers cache says {batch} sequences of {length} tokens but hscompile's cache holds "
                    f"{len(self.sequences)} of {sorted(set(lengths))}: only one generation at a time, without beam "
                    "search or cache reordering, is supported on this path"
                )
            self.cache.act_ratio = self.effective_act_ratio
            for seq in self.sequences:
                if length + new > self.cache.sequences[seq].capacity_tokens:
                    try:
                        self.cache.extend(seq, length + new, limit_bytes=self.host_budget)
                    except ValueError as error:
                        raise BudgetError(f"host_memory cannot hold the growing cache: {error}") from None
                    self._refresh(seq)
        self.begin_step(torch.ones(batch, new, dtype=torch.bool))

    @property
    def effective_act_ratio(self) -> float:
        """The ACT ratio new blocks get: the configured one once a recompute program exists, else 0."""
        return self.act_ratio if self.program is not None else 0.0

    def _start_batch(self, capacities: Sequence[int], *, growable: bool) -> None:
        assert self.spec is not None, "a compiled graph configures the cache before it runs"
        ratio = self.effective_act_ratio
        blocks = [HybridCache.blocks_for(self.spec, ratio, t) for t in capacities]
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
        self.step = None
        self.plans = []
        self.index = 0
        self._pending.clear()
        self.request = None

    def start(self, cache: HybridCache, sequences: Sequence[int]) -> None:
        """Begin generating ``sequences`` (admitted in ``cache``), in batch order."""
        self.cache = cache
        self.sequences = list(sequences)
        self._tables = {}
        for seq in self.sequences:
            self._refresh(seq)
        size = cache.spec.block_size
        self._pos_kv = torch.zeros(cache.kv_pool.num_blocks * size, dtype=torch.long)
        self._pos_act = torch.zeros(cache.act_pool.num_blocks * size, dtype=torch.long)

    def _refresh(self, seq: int) -> None:
        """Re-read a sequence's block table (after admission or growth)."""
        assert self.cache is not None
        table = self.cache.sequences[seq]
        ids = torch.tensor([b.id for b in table.blocks], dtype=torch.long)
        is_act = torch.tensor([k == "act" for k in table.kinds], dtype=torch.bool)
        self._tables[seq] = (ids, is_act)
        size = self.cache.spec.block_size
        for name, pool in (("_pos_kv", self.cache.kv_pool), ("_pos_act", self.cache.act_pool)):
            current = getattr(self, name)
            if current is not None and current.numel() < pool.num_blocks * size:
                grown = torch.zeros(pool.num_blocks * size, dtype=torch.long)
                grown[: current.numel()] = current
                setattr(self, name, grown)

    def _slots(self, seq: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots and ACT flags of tokens ``start..start+count-1`` of ``seq``."""
        ids, is_act = self._tables[seq]
        size = self.cache.spec.block_size  # type: ignore[union-attr]
        index = torch.arange(start, start + count)
        block = index // size
        return ids[block] * size + index % size, is_act[block]

    def select(self, index: int) -> None:
        """Make mini-batch ``index`` of the step the one the cache ops act on."""
        self.index = index
        if self.plans:
            self.step = self.plans[index]

    def begin_step(self, real: torch.Tensor, groups: Sequence[Sequence[int]] | None = None) -> None:
        """Plan a step whose new tokens are ``real`` (``(batch, seq)`` bool: False for padding), one
        plan per mini-batch of ``groups`` (row indices; default: the whole batch)."""
        assert self.cache is not None
        rows = groups if groups is not None else [range(real.shape[0])]
        self.plans = [self._plan(real[list(r)], [self.sequences[b] for b in r]) for r in rows]
        self.counters.minibatches += len(self.plans)
        self.step = self.plans[self.index]

    def _plan(self, real: torch.Tensor, sequences: list[int]) -> StepPlan:
        assert self.cache is not None
        batch, new = real.shape
        past = [self.cache.sequences[s].length for s in sequences]
        width = max(past)
        kv_slots, kv_dest, act_slots, act_dest = [], [], [], []
        st_kv_src, st_kv_slots, st_act_src, st_act_slots, new_kv, new_act = [], [], [], [], [], []
        for b, seq in enumerate(sequences):
            if past[b]:
                slots, is_act = self._slots(seq, 0, past[b])
                dest = b * width + (width - past[b]) + torch.arange(past[b])
                kv_slots.append(slots[~is_act])
                kv_dest.append(dest[~is_act])
                act_slots.append(slots[is_act])
                act_dest.append(dest[is_act])
            columns = real[b].nonzero().flatten()
            count = int(columns.numel())
            capacity = self.cache.sequences[seq].capacity_tokens
            if past[b] + count > capacity:
                raise RuntimeError(f"sequence {seq} needs {past[b] + count} cache tokens but was admitted for {capacity}")
            slots, is_act = self._slots(seq, past[b], count)
            src = b * new + columns
            st_kv_src.append(src[~is_act])
            st_kv_slots.append(slots[~is_act])
            st_act_src.append(src[is_act])
            st_act_slots.append(slots[is_act])
            new_kv.append(int((~is_act).sum()))
            new_act.append(int(is_act.sum()))

        def cat(parts: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
            out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            return out.to(device) if device is not None else out

        act_slot_tensor = cat(act_slots)
        assert self._pos_act is not None
        return StepPlan(
            batch=batch,
            new_tokens=new,
            sequences=sequences,
            past=past,
            width=width,
            padded=any(p != width for p in past),
            kv_slots=cat(kv_slots),
            kv_dest=cat(kv_dest, self.device),
            act_slots=act_slot_tensor,
            act_dest=cat(act_dest, self.device),
            act_positions=self._pos_act[act_slot_tensor].to(self.device),
            store_kv_src=cat(st_kv_src, self.device),
            store_kv_slots=cat(st_kv_slots),
            store_act_src=cat(st_act_src, self.device),
            store_act_slots=cat(st_act_slots),
            new_kv=new_kv,
            new_act=new_act,
        )

    def end_step(self) -> None:
        """Commit the step: the new tokens are now part of every sequence's past."""
        assert self.plans and self.cache is not None
        for plan in self.plans:
            for b, seq in enumerate(plan.sequences):
                self.cache.sequences[seq].length += plan.new_kv[b] + plan.new_act[b]
            self.counters.kv_tokens += sum(plan.new_kv)
            self.counters.act_tokens += sum(plan.new_act)
        self.counters.steps += 1
        self.step = None
        self.plans = []
        self.index = 0
        self._pending.clear()

    def staging_bytes(self) -> int:
        """Device bytes one layer's cache steps hold at once in this step (for the budget check)."""
        cache = self.cache
        if not self.plans or cache is None:
            return 0
        staged = [cache.spec.staging_bytes(p.batch, p.width, p.new_tokens, int(p.kv_slots.numel()),
                                           int(p.act_slots.numel())) for p in self.plans]
        if not self._overlapping():
            return max(staged)
        # the next mini-batch's loads are in flight while this one computes
        item = cache.spec.dtype.itemsize
        loaded = [(int(p.kv_slots.numel()) * cache.spec.kv_values_per_token + int(p.act_slots.numel()) * cache.spec.hidden)
                  * item for p in self.plans]
        return max(staged) + max(loaded)

    # -- the ops -------------------------------------------------------------------------

    def _overlapping(self) -> bool:
        return self.device.type == "cuda" if self.overlap_loads is None else self.overlap_loads

    def _issue(self, kind: str, layer: int, index: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Gather mini-batch ``index``'s past tokens of ``layer`` on the host and start their copy."""
        assert self.cache is not None
        plan = self.plans[index]
        pool = (self.cache.kv if kind == "kv" else self.cache.act)[layer]
        slots = plan.kv_slots if kind == "kv" else plan.act_slots
        if self._backend is None:
            self._backend = device_backend(self.device)
        host = torch.empty((slots.numel(), *pool.shape[1:]), dtype=pool.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(pool, 0, slots, out=host)
        self.counters.cache_h2d_bytes += host.numel() * host.element_size()
        if self.device.type == "cpu":
            return host, None, host
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        done = self._backend.copy_to_device(out, host, after=None, label=f"L{layer} {kind} mb{index}",
                                            lane="copy: cache")
        return out, done, host  # the host buffer lives until the copy is done

    def _load(self, kind: str, layer: int) -> torch.Tensor:
        assert self.cache is not None and self.plans
        pending = self._pending.pop((kind, layer, self.index), None)
        out, done, _ = pending if pending is not None else self._issue(kind, layer, self.index)
        if done is not None:
            assert self._backend is not None
            self._backend.wait(done)
        if self._overlapping():
            # The next load in run order: this layer's next mini-batch, else the next layer's first.
            following = (layer, self.index + 1) if self.index + 1 < len(self.plans) else (layer + 1, 0)
            if following[0] < self.cache.spec.num_layers and (kind, *following) not in self._pending:
                self._pending[(kind, *following)] = self._issue(kind, *following)
        return out

    def load_kv(self, layer: int) -> torch.Tensor:
        return self._load("kv", layer)

    def load_act(self, layer: int) -> torch.Tensor:
        return self._load("act", layer)

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
        step = self.step
        assert step is not None
        batch, heads, new, _ = query.shape
        kv_heads, head_dim = key.shape[1], key.shape[3]
        width = step.width
        if attn_mask is not None and width and attn_mask.shape[-1] == width + new:
            # The model's own mask already covers its cache (transformers' loop): same layout.
            attn_mask = attn_mask.expand(batch, 1, new, width + new)
            full_mask = True
        else:
            full_mask = False
        if width:
            past = key.new_zeros((batch * width, 2, kv_heads, head_dim))
            if past_kv.numel():
                past.index_copy_(0, step.kv_dest, past_kv.to(key.dtype))
            if recomputed.numel():
                past.index_copy_(0, step.act_dest, recomputed.to(key.dtype))
            past = past.view(batch, width, 2, kv_heads, head_dim)
            key = torch.cat((past[:, :, 0].transpose(1, 2), key), dim=2)
            value = torch.cat((past[:, :, 1].transpose(1, 2), value), dim=2)
            if not full_mask:
                attn_mask, is_causal = self._mask(attn_mask, is_causal, batch, new, width, query.device)
        groups = heads // kv_heads
        if groups > 1:  # as transformers' repeat_kv: expand, then reshape
            length = key.shape[2]
            key = key[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
            value = value[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return in_attention_layout(out, query, value)

    def _mask(self, attn_mask: torch.Tensor | None, is_causal: bool, batch: int, new: int, width: int,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """The mask over ``[past, new]``, or None where transformers would pass none."""
        step = self.step
        assert step is not None
        if attn_mask is not None and attn_mask.dtype == torch.bool and not step.padded and bool(attn_mask.all()):
            attn_mask = None
        if attn_mask is None and not step.padded and (new == 1 or not is_causal):
            return None, False
        past = torch.tensor(step.past, device=device)
        valid = torch.arange(width, device=device)[None, :] >= (width - past)[:, None]  # (batch, width)
        if attn_mask is None:
            rows = torch.ones(new, new, dtype=torch.bool, device=device)
            current = (rows.tril() if is_causal else rows).expand(batch, 1, new, new)
        else:
            current = attn_mask.expand(batch, 1, new, new)
        before = valid[:, None, None, :].expand(batch, 1, new, width)
        if current.dtype != torch.bool:  # an additive mask
            before = torch.where(before, 0.0, torch.finfo(current.dtype).min).to(current.dtype)
        return torch.cat((before, current), dim=-1), False

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
              positions: torch.Tensor | None) -> None:
        step, cache = self.step, self.cache
        assert step is not None and cache is not None
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
            flat = positions.expand(batch, new).reshape(-1).cpu()
            assert self._pos_kv is not None and self._pos_act is not None
            self._pos_kv.index_copy_(0, step.store_kv_slots, flat[step.store_kv_src.cpu()])
            self._pos_act.index_copy_(0, step.store_act_slots, flat[step.store_act_src.cpu()])
