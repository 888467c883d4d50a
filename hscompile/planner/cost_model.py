"""Cost model: predicted step times of a schedule on a hardware profile, and the policy search.

The unit of prediction is one **step** (a prefill over the prompts, or one decode step), as
the runtime executes it today:

* the **compute stream** runs, per layer: the layer's matrix products (one roofline GEMM over
  the layer's weights for the step's tokens), attention over past + new tokens, elementwise
  work (norms, rotary, residuals: ``ELEMENTWISE_PASSES`` reads and writes of the hidden state),
  a fixed cost per operator call, and the cache steps of that layer: recomputing checkpoints'
  K/V and writing them, with the new tokens' K/V, into the attention buffer the past was loaded
  into (no gather on the host: loads copy contiguous runs of the pools);
* the **copy engine** (a CUDA copy stream; on the CPU, copies run on the compute thread and
  add to it) runs the streamed layers' weight copies, in order, each starting once
  it is issued (the schedule issues layer ``i + prefetch_depth``'s copy when layer ``i`` starts
  computing), the engine is free, and its ring slot was released by the layer that held it,
  and the cache's loads (each layer's past tokens in). The new tokens go out the other way
  (device to host, a direction of their own) once their layer computed them; on the CPU every
  copy runs on the compute thread.

:func:`simulate_step` replays that as a discrete-event simulation; :func:`generation_seconds`
sums a prefill and the decode steps (context growing one token per step). Assumptions, stated
once: layers are identical; GEMM time is ``max(flops / (peak * m / (m + half_rows)),
bytes / memory bandwidth)``; attention is ``max(flops / attention rate, bytes read / memory
bandwidth)``; no two copies overlap on the link;
the device never waits on the host for anything else. It predicts for profiles nobody measured here (see
:func:`hscompile.planner.hardware.bundled_profiles`).

:func:`choose` is the policy search: it tries ACT ratios, prefetch depths and resident-layer
counts under the device and host budgets and keeps the fastest predicted generation. It is
GQA-aware: where a checkpoint is at least as many bytes as the K/V it replaces
(``hidden >= 2 * kv_heads * head_dim``), checkpoints can never save link time and only add
recompute, so ratios above 0 are not considered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..config import HybridServeConfig, QuantConfig, format_bytes
from ..errors import BudgetError
from ..ir.cache import CacheSpec, ConfigDims, checkpoint_tokens
from ..ir.layout import DISK_SLOTS
from ..ir.plan import ModelPlan
from ..ir.policy import DeviceMemoryPlan
from ..ir.quant import QuantScheme, scheme_of
from ..ir.schedule import MIN_ROWS
from .budget import decode_staging
from .hardware import HardwareProfile
from .minibatch import minibatch_count

__all__ = [
    "RATIOS", "Choice", "Decision", "ModelDims", "Prediction", "StepEstimate", "choose", "device_memory",
    "generation_seconds", "minibatch_counts", "minibatch_rows", "resolve_act_ratio", "sequence_cost", "simulate_step",
]

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The ACT ratios the search tries by default."""

ELEMENTWISE_PASSES = 12
"""Reads + writes of the hidden state per layer outside the GEMMs (2 norms, 2 residuals, rotary,
activation, casts): a rough count for decoder layers, not a measurement."""


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The sizes of a decoder the cost model needs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    layer_weight_bytes: int
    """Bytes of one layer's weights (as packed for streaming)."""
    global_weight_bytes: int
    layer_matmul_params: int
    """Elements of one layer's matrix weights: a token costs ``2 *`` this many FLOP."""
    recompute_matmul_params: int
    """Elements of the weights a checkpoint's K/V recompute multiplies by (k and v projections)."""
    head_matmul_params: int
    """Elements of the LM head."""
    dequant_bytes: int = 0
    """Device-memory bytes one run of a layer's partitions adds to dequantize its quantized
    weights (``weight_quant``): the packed layer read, its matrices written at full precision
    (:meth:`_dequant_bytes`); paid once per mini-batch, since every partition call dequantizes."""

    cache_quant: str = "none"
    """How cache blocks are stored (the ``cache_quant`` option): what a cached token moves."""
    disk_layers: int = 0
    """The last layers, whose weights stay on disk (a checkpoint larger than the host budget):
    streamed, they are read from disk at every step (:attr:`Choice.disk_layers`)."""

    def _dequant_bytes(self, packed_layer_bytes: int) -> int:
        return packed_layer_bytes + self.layer_matmul_params * self.item

    @property
    def item(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def kv_bytes(self) -> int:
        """Bytes of one token's K/V in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.item

    @property
    def act_bytes(self) -> int:
        """Bytes of one token's checkpoint in one layer."""
        return self.hidden * self.item

    @property
    def kv_link_bytes(self) -> int:
        """Bytes one token's K/V in one layer moves over the link (as its cache block holds it)."""
        return self.cache_spec(1).kv_row_bytes

    @property
    def act_link_bytes(self) -> int:
        """Bytes one token's checkpoint in one layer moves over the link."""
        return self.cache_spec(1).act_row_bytes

    @property
    def checkpoints_save_bytes(self) -> bool:
        """The ``"auto"`` rule (:attr:`~hscompile.ir.cache.CacheSpec.checkpoints_save_bytes`)."""
        return self.cache_spec(1).checkpoints_save_bytes

    def prefill_activation_bytes(self, rows: int, tokens: int) -> int:
        """A floor on the device activations of a prefill of ``rows x tokens``: a layer's widest
        point, its MLP's intermediate values (``mlp weights / hidden`` per token: up and gate
        outputs of a gated MLP, fc1 and its activation of a plain one) beside the residual stream.
        Attention's workspace and the head's logits (one position is kept) are not counted; the
        placement's own estimate, from the compiled graph, is the one the budget is checked against."""
        attention = 2 * self.hidden * (self.heads + self.kv_heads) * self.head_dim
        mlp = max(self.layer_matmul_params - attention, 0)
        return rows * tokens * self.item * (mlp // self.hidden + self.hidden)

    def cache_spec(self, block_size: int) -> CacheSpec:
        """The cache dimensions of this model with blocks of ``block_size`` tokens."""
        return CacheSpec(num_layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim, hidden=self.hidden,
                         dtype=getattr(torch, self.dtype), block_size=block_size, heads=self.heads,
                         quant=self.cache_quant)

    def stored_as(self, quant: QuantConfig) -> ModelDims:
        """These dims with weights and cache stored as ``quant`` says: the layers' matrices in its
        weight format (fewer bytes to stream, and the dequantization's work on the device), the
        cache blocks in its cache format."""
        dims = replace(self, cache_quant=quant.cache_quant)
        scheme = scheme_of(quant)
        return dims if scheme is None else dims._quantized(scheme)

    def _quantized(self, scheme: QuantScheme) -> ModelDims:
        packed = scheme.packed_bytes((self.layer_matmul_params,), getattr(torch, self.dtype))
        layer = self.layer_weight_bytes - self.layer_matmul_params * self.item + packed  # norms and biases stay
        return replace(self, layer_weight_bytes=layer, dequant_bytes=self._dequant_bytes(layer))

    @classmethod
    def from_plan(cls, plan: ModelPlan, *, layout_bytes: int | None = None, global_bytes: int | None = None,
                  quantized: bool = False) -> ModelDims:
        """From an analysis plan (what the backend has when it places a graph); ``quantized``: the
        layers are stored quantized, ``layout_bytes`` packed so."""
        layer = plan.layers[0]
        site = layer.attention
        matrices = sum(math.prod(w.shape) for w in layer.weights if len(w.shape) >= 2)
        recompute = sum(math.prod(w.shape) for w in layer.weights if len(w.shape) >= 2 and w.node in layer.recompute.weights)
        head = max((w for w in plan.global_weights if len(w.shape) == 2), key=lambda w: math.prod(w.shape), default=None)
        dims = cls(
            layers=plan.num_layers, hidden=plan.hidden_size, heads=site.num_heads, kv_heads=site.num_kv_heads,
            head_dim=site.head_dim, dtype=str(plan.dtype).removeprefix("torch."),
            layer_weight_bytes=layout_bytes if layout_bytes is not None else layer.weight_bytes,
            global_weight_bytes=global_bytes if global_bytes is not None else plan.global_weight_bytes,
            layer_matmul_params=matrices, recompute_matmul_params=recompute,
            head_matmul_params=math.prod(head.shape) if head is not None else 0,
        )
        return dims if not quantized else replace(dims, dequant_bytes=dims._dequant_bytes(dims.layer_weight_bytes))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelDims:
        """From a transformers model's config and parameters (meta-device models work)."""
        declared = ConfigDims.of(model.config)
        layers, hidden, heads = declared.layers, declared.hidden, declared.heads
        kv_heads, head_dim = declared.kv_heads, declared.head_dim
        params = {id(p): p for p in model.parameters()}.values()
        dtype = next(iter(params)).dtype
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        head_weight = head.weight if head is not None else embed
        outside = embed.numel() + (0 if head_weight is embed else head_weight.numel())
        positions = sum(p.numel() for name, p in model.named_parameters() if "embed_positions" in name or "wpe" in name)
        total = sum(p.numel() for p in params)
        matrices = sum(p.numel() for p in params if p.dim() >= 2) - outside - positions
        per_layer = (total - outside - positions) // layers
        return cls(
            layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            dtype=str(dtype).removeprefix("torch."), layer_weight_bytes=per_layer * dtype.itemsize,
            global_weight_bytes=(outside + positions) * dtype.itemsize, layer_matmul_params=matrices // layers,
            recompute_matmul_params=2 * hidden * kv_heads * head_dim, head_matmul_params=head_weight.numel(),
        )


@dataclass(frozen=True, slots=True)
class Choice:
    """Placement and caching decisions to evaluate."""

    resident_layers: int
    prefetch_depth: int
    act_ratio: float
    minibatches: int = 1
    """Mini-batches a step's batch runs as (near-equal rows; each layer serves them all)."""
    disk_layers: int = 0
    """The last layers, read from disk at every step (the disk tier) before their copies."""


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """Predicted time of one step and where it goes (seconds)."""

    seconds: float
    compute: float
    """Layer GEMMs, attention, elementwise work and calls, summed over layers."""
    cache: float
    """Cache steps: host gathers, copies of past tokens, assembly, stores (the copies overlap
    compute on a device with a copy engine; ``exposed_link`` holds what did not)."""
    recompute: float
    """K/V recompute from checkpoints."""
    weight_link: float
    """Weight copies on the copy engine (overlapped with compute where the schedule allows)."""
    exposed_link: float
    """Time the compute stream waited for the link (weights or cache loads), or spent copying
    itself where the device has no copy engine."""
    disk: float = 0.0
    """Reads of the layers on disk (on the disk tier's reader, beside everything else)."""
    exposed_disk: float = 0.0
    """Time the compute stream waited for those reads."""

    @property
    def bound(self) -> str:
        """The resource that sets the step time."""
        parts = {"compute": self.compute, "cache transfers": self.cache, "recompute": self.recompute,
                 "link": self.exposed_link, "disk": self.exposed_disk}
        return max(parts, key=parts.__getitem__)


def _layer_costs(dims: ModelDims, profile: HardwareProfile, batch: int, new: int, past: int,
                 act_ratio: float, block_size: int) -> tuple[float, float, float, float, float]:
    """``(compute, cache, recompute, link, store)`` seconds of one layer for ``batch`` sequences in one step.

    ``cache`` is the cache work on the compute stream (the new and recomputed K/V written into the
    attention buffer); ``link`` is the past tokens' copy in, ``store`` the new tokens' copy out."""
    rows = batch * new
    compute = (
        profile.gemm_seconds(rows, dims.hidden, max(dims.layer_matmul_params // dims.hidden, 1), dims.dtype)
        + profile.attention_seconds(batch, dims.heads, new, past + new, dims.head_dim, dims.dtype)
        + profile.memory_seconds(ELEMENTWISE_PASSES * rows * dims.act_bytes + dims.dequant_bytes)
        + profile.layer_overhead_seconds
    )
    act_tokens = batch * checkpoint_tokens(past, act_ratio, block_size)
    kv_tokens = batch * past - act_tokens
    loaded = kv_tokens * dims.kv_link_bytes + act_tokens * dims.act_link_bytes
    stored = rows * max(dims.kv_link_bytes, dims.act_link_bytes) if act_ratio else rows * dims.kv_link_bytes
    cache = link = 0.0
    if past:
        cache = profile.memory_seconds((act_tokens + rows) * dims.kv_bytes)  # recomputed and new K/V placed
        link = profile.h2d_seconds(loaded)
    store = profile.d2h_seconds(stored)
    recompute = 0.0
    if act_tokens:
        recompute = (
            profile.gemm_seconds(act_tokens, dims.hidden, max(dims.recompute_matmul_params // dims.hidden, 1), dims.dtype)
            + profile.memory_seconds(6 * act_tokens * dims.act_bytes)  # norm, rotary, layout
        )
    return compute, cache, recompute, link, store


def sequence_cost(dims: ModelDims, profile: HardwareProfile | None, *, kv_tokens: int, act_tokens: int,
                  new: int) -> tuple[float, float]:
    """``(load, compute)`` of one sequence in one layer of a step: its past tokens' copy over the
    link, and its attention and recompute on the compute side. In seconds on
    ``profile``; without one, bytes moved and bytes read stand in for time."""
    loaded = kv_tokens * dims.kv_link_bytes + act_tokens * dims.act_link_bytes
    past = kv_tokens + act_tokens
    if profile is None:
        return float(loaded), float(act_tokens * dims.act_bytes * 4 + (past + new) * dims.kv_bytes)
    compute = profile.attention_seconds(1, dims.heads, new, past + new, dims.head_dim, dims.dtype)
    if act_tokens:
        compute += profile.gemm_seconds(act_tokens, dims.hidden, max(dims.recompute_matmul_params // dims.hidden, 1),
                                        dims.dtype)
    return profile.h2d_seconds(loaded), compute


def minibatch_rows(batch: int, minibatches: int) -> list[int]:
    """Rows of each of ``minibatches`` near-equal mini-batches of ``batch`` sequences."""
    count = max(1, min(minibatches, batch))
    return [batch // count + (1 if i < batch % count else 0) for i in range(count)]


def simulate_step(dims: ModelDims, choice: Choice, profile: HardwareProfile, *, batch: int, new: int, past: int,
                  block_size: int = 16) -> StepEstimate:
    """One step replayed on the compute stream and the copy engine (see the module docstring)."""
    sizes = minibatch_rows(batch, choice.minibatches)
    costs = {b: _layer_costs(dims, profile, b, new, past, choice.act_ratio, block_size) for b in set(sizes)}
    weight_link = profile.h2d_seconds(dims.layer_weight_bytes)
    streamed = list(range(choice.resident_layers, dims.layers))
    depth = choice.prefetch_depth
    slots = min(depth + 1, len(streamed))
    overlap = profile.copies_overlap
    weights_ready: dict[int, float] = {}
    layer_end: dict[int, float] = {}
    engine = clock = waited = serial = 0.0
    # The disk tier: one reader, in streaming order, into DISK_SLOTS host slots, each free again once
    # the copy from it ended. Reads start with the step (no read-ahead from the step before: a little pessimistic).
    first_on_disk = dims.layers - choice.disk_layers
    disk_read = profile.disk_seconds(dims.layer_weight_bytes) if choice.disk_layers else 0.0
    reader = disk_waited = 0.0
    read_done: dict[int, float] = {}

    def copy(seconds: float, issued: float, freed: float = 0.0, ready: float = 0.0) -> float:
        """Queue a copy on the link; its end time. Without a copy engine it runs on the compute thread."""
        nonlocal engine, clock, serial, disk_waited
        if not overlap:
            if ready > clock:
                disk_waited += ready - clock
                clock = ready
            clock += seconds
            serial += seconds
            return clock
        engine = max(issued, engine, freed, ready) + seconds
        return engine

    def weights(i: int, issued: float) -> None:
        nonlocal reader
        freed = layer_end.get(i - slots, 0.0) if i >= slots else 0.0
        ready = 0.0
        if choice.resident_layers + i >= first_on_disk:
            k = choice.resident_layers + i - first_on_disk
            slot_free = weights_ready.get(i - DISK_SLOTS, 0.0) if k >= DISK_SLOTS else 0.0
            reader = max(reader, slot_free) + disk_read
            read_done[i] = ready = reader
        weights_ready[i] = copy(weight_link, issued, freed, ready)

    for i in range(min(depth, len(streamed))):
        weights(i, 0.0)
    clock += profile.gemm_seconds(batch * new, 1, dims.hidden, dims.dtype)  # embedding lookup, positions, masks
    # Cache loads run one ahead in run order (the next mini-batch, else the next layer's first).
    order = [(layer, j) for layer in range(dims.layers) for j in range(len(sizes))]
    loads_ready: dict[tuple[int, int], float] = {}
    if past and overlap:
        loads_ready[order[0]] = copy(costs[sizes[0]][3], 0.0)
    for k, (layer, j) in enumerate(order):
        compute, cache, recompute, link, store = costs[sizes[j]]
        if j == 0 and layer >= choice.resident_layers:
            i = layer - choice.resident_layers
            if i + depth < len(streamed):
                weights(i + depth, clock)
            start = max(clock, weights_ready[i])
            behind_disk = max(0.0, min(start, read_done.get(i, 0.0)) - clock)  # of the wait, the disk's part
            disk_waited += behind_disk
            waited += start - clock - behind_disk
            clock = start
        if past:
            if overlap:
                start = max(clock, loads_ready[(layer, j)])
                waited += start - clock
                clock = start
                if k + 1 < len(order):
                    loads_ready[order[k + 1]] = copy(costs[sizes[order[k + 1][1]]][3], clock)
            else:
                copy(link, clock)
        clock += compute + cache + recompute
        if not overlap:  # with a copy engine the stores run the other way (device to host), beside it all
            clock += store
            serial += store
        if j == len(sizes) - 1 and layer >= choice.resident_layers:
            layer_end[layer - choice.resident_layers] = clock
    clock += profile.gemm_seconds(batch, dims.hidden, max(dims.head_matmul_params // dims.hidden, 1), dims.dtype)
    total = [sum(costs[b][n] for b in sizes) for n in range(5)]
    return StepEstimate(
        seconds=clock,
        compute=total[0] * dims.layers,
        cache=(total[1] + total[3] + total[4]) * dims.layers,
        recompute=total[2] * dims.layers,
        weight_link=weight_link * len(streamed),
        exposed_link=waited + serial,
        disk=disk_read * len(read_done),
        exposed_disk=disk_waited,
    )


def generation_seconds(dims: ModelDims, choice: Choice, profile: HardwareProfile, *, batch: int, prompt: int,
                       new_tokens: int, block_size: int = 16) -> tuple[float, StepEstimate, StepEstimate]:
    """``(total, prefill, last decode step)``: a prefill plus ``new_tokens - 1`` decode steps.

    Decode steps are simulated at the first, middle and last context and integrated (their
    cost is close to linear in the context)."""
    prefill = simulate_step(dims, choice, profile, batch=batch, new=prompt, past=0, block_size=block_size)
    steps = new_tokens - 1
    if steps <= 0:
        return prefill.seconds, prefill, prefill
    contexts = sorted({prompt, prompt + steps // 2, prompt + steps - 1})
    samples = [simulate_step(dims, choice, profile, batch=batch, new=1, past=c, block_size=block_size) for c in contexts]
    if len(samples) == 1:
        decode = samples[0].seconds * steps
    else:
        # trapezoid over the sampled contexts, scaled to the number of steps
        xs, ys = contexts, [s.seconds for s in samples]
        area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
        decode = area / (xs[-1] - xs[0]) * steps
    return prefill.seconds + decode, prefill, samples[-1]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One evaluated choice."""

    choice: Choice
    seconds: float
    """Predicted time of the whole generation."""
    tokens_per_s: float
    prefill: StepEstimate
    decode: StepEstimate
    """The last (longest) decode step."""
    device_bytes: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What :func:`choose` picked, the alternatives, and why."""

    best: Prediction
    considered: tuple[Prediction, ...] = field(default_factory=tuple)
    reason: str = ""


def device_memory(dims: ModelDims, choice: Choice, *, batch: int, context: int, activations: int,
                  overlap: bool = False, device_type: str = "cuda", block_size: int = 16) -> DeviceMemoryPlan:
    """The device memory ``choice`` needs for a generation of ``batch`` sequences of ``context``
    tokens: the same plan placement makes (:meth:`DeviceMemoryPlan.build`), with the cache staging
    of the longest decode step of one mini-batch (:func:`~hscompile.planner.budget.decode_staging`)."""
    streamed = dims.layers - choice.resident_layers
    rows = max(minibatch_rows(batch, choice.minibatches))
    staging = decode_staging(dims.cache_spec(block_size), choice.act_ratio, rows=rows, longest=context, overlap=overlap)
    return DeviceMemoryPlan.build(
        device_type,
        global_weights=dims.global_weight_bytes,
        resident_layers=choice.resident_layers * dims.layer_weight_bytes,
        ring=min(choice.prefetch_depth + 1, streamed) * dims.layer_weight_bytes,
        activations=activations,
        cache_staging=staging,
        dequantized=dims.layer_matmul_params * dims.item if dims.dequant_bytes else 0,
    )


def minibatch_counts(batch: int, min_rows: int = MIN_ROWS) -> tuple[int, ...]:
    """Mini-batch counts worth trying for ``batch`` sequences: 1, 2, 4, ... while each has
    ``min_rows``, each one the runtime forms at rows ``ceil(batch / count)``
    (:func:`~hscompile.planner.minibatch.minibatch_count`), so the count evaluated is the count run."""
    counts = [1]
    while batch // (counts[-1] * 2) >= min_rows:
        counts.append(counts[-1] * 2)
    return tuple(c for c in counts if minibatch_count(batch, -(-batch // c), min_rows=min_rows) == c)


def choose(dims: ModelDims, profile: HardwareProfile, *, batch: int, prompt: int, new_tokens: int,
           device_budget: int | None, activations: int = 0, block_size: int = 16,
           ratios: tuple[float, ...] = RATIOS, depths: tuple[int, ...] = (1, 2),
           minibatches: tuple[int, ...] | None = None, device_type: str = "cuda",
           staged_ratio: float = 0.0) -> Decision:
    """The fastest predicted choice that fits ``device_budget`` (``None``: no limit).

    It searches prefetch depths, resident layers (the most that fit), ACT ratios (GQA-aware, see
    the module docstring) and mini-batch counts (default: :func:`minibatch_counts`). A budget
    nothing fits is a :class:`~hscompile.errors.BudgetError` giving the smallest need. The cache
    staging of each candidate is sized for its ratio or ``staged_ratio`` (what the generator
    reserves: see :func:`~hscompile.planner.budget.staged_ratio`), whichever stages more."""
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    context = prompt + new_tokens
    # GQA: checkpoints cannot save link bytes, so only all-KV is searched (a ratio a caller fixed stays).
    candidates = ratios if dims.checkpoints_save_bytes or len(ratios) == 1 else (0.0,)
    counts = minibatches if minibatches is not None else minibatch_counts(batch)
    considered: list[Prediction] = []
    smallest: int | None = None
    for depth in depths:
        for count in counts:
            for ratio in candidates:
                # The staging the generator reserves: this ratio's, or staged_ratio's where it is more.
                staged = max(ratio, staged_ratio)
                for resident in range(dims.layers, -1, -1):
                    if resident == dims.layers and depth != depths[0]:
                        continue  # nothing streams: the depth does not matter
                    need = device_memory(dims, Choice(resident, depth, staged, count), batch=batch, context=context,
                                         activations=activations, overlap=profile.copies_overlap,
                                         device_type=device_type, block_size=block_size).total
                    smallest = need if smallest is None else min(smallest, need)
                    if device_budget is not None and need > device_budget:
                        continue
                    choice = Choice(resident, depth, ratio, count, dims.disk_layers)
                    total, prefill, decode = generation_seconds(dims, choice, profile, batch=batch, prompt=prompt,
                                                                new_tokens=new_tokens, block_size=block_size)
                    considered.append(Prediction(choice, total, batch * new_tokens / total, prefill, decode, need))
                    break  # the most resident layers that fit is never slower
    if not considered:
        raise BudgetError(f"no choice fits the device budget of {format_bytes(device_budget or 0)}: the smallest "
                          f"(every layer streamed) needs {format_bytes(smallest or 0)}")
    fastest = min(p.seconds for p in considered)
    # Within 1% of the fastest, prefer fewer mini-batches: the model cannot resolve smaller gains.
    best = min((p for p in considered if p.seconds <= fastest * 1.01), key=lambda p: (p.choice.minibatches, p.seconds))
    why = f"{best.decode.bound} binds the decode step"
    if best.choice.minibatches > 1:
        one = device_memory(dims, replace(best.choice, minibatches=1, act_ratio=max(best.choice.act_ratio, staged_ratio)),
                            batch=batch, context=context,
                            activations=activations, overlap=profile.copies_overlap, device_type=device_type,
                            block_size=block_size).total
        why += (f"; {best.choice.minibatches} mini-batches per step" + (
            " (the cache staging of one whole batch would not fit beside these resident layers)"
            if device_budget is not None and one > device_budget else " overlap cache loads with compute"))
    if not dims.checkpoints_save_bytes:
        cached = " (int8 cache blocks)" if dims.cache_quant != "none" else ""
        why += (f"; a checkpoint ({dims.act_link_bytes} B/token/layer{cached}) is not smaller than K/V "
                f"({dims.kv_link_bytes} B), so checkpoints were not considered")
    return Decision(best, tuple(considered), why)


def resolve_act_ratio(config: HybridServeConfig, spec: CacheSpec) -> float:
    """The ACT ratio to use where no search decides it (no profile, or nothing fits the budget).
    ``"auto"``: half the tokens as checkpoints where they move fewer bytes than K/V
    (:attr:`~hscompile.ir.cache.CacheSpec.checkpoints_save_bytes`: MHA), none where they do not
    (GQA with ``2 * kv_heads * head_dim <= hidden``)."""
    ratio = config.cache.act_ratio
    if ratio != "auto":
        return float(ratio)
    return 0.5 if spec.checkpoints_save_bytes else 0.0
