"""Cost model: predicted step times of a schedule on a hardware profile, and the policy search.

The unit of prediction is one **step** (a prefill over the prompts, or one decode step), as
the runtime executes it today:

* the **compute stream** runs, per layer: the layer's matrix products (one roofline GEMM over
  the layer's weights for the step's tokens), attention over past + new tokens, elementwise
  work (norms, rotary, residuals: ``ELEMENTWISE_PASSES`` reads and writes of the hidden state),
  a fixed cost per operator call, and the cache steps of that layer: gathering past tokens'
  blocks on the host, copying them over the link, recomputing checkpoints' K/V, assembling the
  padded past, storing the new tokens. Cache copies are synchronous today, so they sit on the
  compute stream's critical path;
* the **copy engine** (a CUDA copy stream; on the CPU, copies run on the compute thread and
  add to it) runs the streamed layers' weight copies, in order, each starting once
  it is issued (the schedule issues layer ``i + prefetch_depth``'s copy when layer ``i`` starts
  computing), the engine is free, and its ring slot was released by the layer that held it.

:func:`simulate_step` replays that as a discrete-event simulation; :func:`generation_seconds`
sums a prefill and the decode steps (context growing one token per step). Assumptions, stated
once: layers are identical; GEMM time is ``max(flops / (peak * m / (m + half_rows)),
bytes / memory bandwidth)``; attention is ``max(flops / attention rate, bytes read / memory
bandwidth)``; no two copies overlap on the link; host gathers run at host memory bandwidth;
the device never waits on the host for anything else. It predicts for profiles nobody measured here (see
:func:`hscompile.runtime.tuner.bundled_profiles`).

:func:`choose` is the policy search: it tries ACT ratios, prefetch depths and resident-layer
counts under the device and host budgets and keeps the fastest predicted generation. It is
GQA-aware: where a checkpoint is at least as many bytes as the K/V it replaces
(``hidden >= 2 * kv_heads * head_dim``), checkpoints can never save link time and only add
recompute, so ratios above 0 are not considered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..passes.plan import ModelPlan
from .tuner import HardwareProfile

__all__ = ["Choice", "ModelDims", "Prediction", "StepEstimate", "choose", "generation_seconds", "simulate_step"]

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
    def checkpoints_save_bytes(self) -> bool:
        return self.act_bytes < self.kv_bytes

    @classmethod
    def from_plan(cls, plan: ModelPlan, *, layout_bytes: int | None = None, global_bytes: int | None = None) -> ModelDims:
        """From an analysis plan (what the backend has when it places a graph)."""
        layer = plan.layers[0]
        site = layer.attention
        matrices = sum(math.prod(w.shape) for w in layer.weights if len(w.shape) >= 2)
        recompute = sum(math.prod(w.shape) for w in layer.weights if len(w.shape) >= 2 and w.node in layer.recompute.weights)
        head = max((w for w in plan.global_weights if len(w.shape) == 2), key=lambda w: math.prod(w.shape), default=None)
        return cls(
            layers=plan.num_layers, hidden=plan.hidden_size, heads=site.num_heads, kv_heads=site.num_kv_heads,
            head_dim=site.head_dim, dtype=str(plan.dtype).removeprefix("torch."),
            layer_weight_bytes=layout_bytes if layout_bytes is not None else layer.weight_bytes,
            global_weight_bytes=global_bytes if global_bytes is not None else plan.global_weight_bytes,
            layer_matmul_params=matrices, recompute_matmul_params=recompute,
            head_matmul_params=math.prod(head.shape) if head is not None else 0,
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelDims:
        """From a transformers model's config and parameters (meta-device models work)."""
        config = model.config
        layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
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


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """Predicted time of one step and where it goes (seconds)."""

    seconds: float
    compute: float
    """Layer GEMMs, attention, elementwise work and calls, summed over layers."""
    cache: float
    """Cache steps on the compute stream: host gathers, copies, assembly, stores."""
    recompute: float
    """K/V recompute from checkpoints."""
    weight_link: float
    """Weight copies on the copy engine (overlapped with compute where the schedule allows)."""
    exposed_link: float
    """Time the compute stream waited for weights."""

    @property
    def bound(self) -> str:
        """The resource that sets the step time."""
        parts = {"compute": self.compute, "cache transfers": self.cache, "recompute": self.recompute,
                 "weight link": self.exposed_link}
        return max(parts, key=parts.__getitem__)


def _layer_costs(dims: ModelDims, profile: HardwareProfile, batch: int, new: int, past: int,
                 act_ratio: float, block_size: int) -> tuple[float, float, float]:
    """``(compute, cache, recompute)`` seconds of one layer in one step."""
    rows = batch * new
    compute = (
        profile.gemm_seconds(rows, dims.hidden, max(dims.layer_matmul_params // dims.hidden, 1), dims.dtype)
        + profile.attention_seconds(batch, dims.heads, new, past + new, dims.head_dim, dims.dtype)
        + profile.memory_seconds(ELEMENTWISE_PASSES * rows * dims.act_bytes)
        + profile.layer_overhead_seconds
    )
    act_tokens = batch * _act_tokens(past, act_ratio, block_size)
    kv_tokens = batch * past - act_tokens
    loaded = kv_tokens * dims.kv_bytes + act_tokens * dims.act_bytes
    stored = rows * max(dims.kv_bytes, dims.act_bytes) if act_ratio else rows * dims.kv_bytes
    cache = 0.0
    if past:
        cache = (
            profile.host_seconds(loaded) + profile.h2d_seconds(loaded)
            + profile.memory_seconds(3 * batch * (past + new) * dims.kv_bytes)  # padded past, concatenation
        )
    cache += profile.d2h_seconds(stored) + profile.host_seconds(stored)
    recompute = 0.0
    if act_tokens:
        recompute = (
            profile.gemm_seconds(act_tokens, dims.hidden, max(dims.recompute_matmul_params // dims.hidden, 1), dims.dtype)
            + profile.memory_seconds(6 * act_tokens * dims.act_bytes)  # norm, rotary, layout
        )
    return compute, cache, recompute


def _act_tokens(past: int, ratio: float, block_size: int) -> int:
    """Past tokens held as checkpoints: the sequence's first ``round(ratio * blocks)`` blocks."""
    if ratio <= 0 or past == 0:
        return 0
    blocks = math.ceil(past / block_size)
    return min(past, round(ratio * blocks) * block_size)


def simulate_step(dims: ModelDims, choice: Choice, profile: HardwareProfile, *, batch: int, new: int, past: int,
                  block_size: int = 16) -> StepEstimate:
    """One step replayed on the compute stream and the copy engine (see the module docstring)."""
    compute, cache, recompute = _layer_costs(dims, profile, batch, new, past, choice.act_ratio, block_size)
    per_layer = compute + cache + recompute
    link = profile.h2d_seconds(dims.layer_weight_bytes)
    streamed = list(range(choice.resident_layers, dims.layers))
    depth = choice.prefetch_depth
    slots = min(depth + 1, len(streamed))
    copy_end: dict[int, float] = {}
    compute_end: dict[int, float] = {}
    engine = 0.0
    clock = 0.0
    serial = 0.0  # copies run on the compute thread where the device has no copy engine

    def copy(i: int, issued: float) -> None:
        nonlocal engine, clock, serial
        if not profile.copies_overlap:
            clock += link
            serial += link
            copy_end[i] = clock
            return
        freed = compute_end.get(i - slots, 0.0) if i >= slots else 0.0
        start = max(issued, engine, freed)
        engine = copy_end[i] = start + link

    for i in range(min(depth, len(streamed))):
        copy(i, 0.0)
    clock += profile.gemm_seconds(batch * new, 1, dims.hidden, dims.dtype)  # embedding lookup, positions, masks
    waited = 0.0
    for layer in range(dims.layers):
        if layer < choice.resident_layers:
            clock += per_layer
            continue
        i = layer - choice.resident_layers
        if i + depth < len(streamed):
            copy(i + depth, clock)
        start = max(clock, copy_end[i])
        waited += start - clock
        clock = compute_end[i] = start + per_layer
    clock += profile.gemm_seconds(batch, dims.hidden, max(dims.head_matmul_params // dims.hidden, 1), dims.dtype)
    return StepEstimate(
        seconds=clock,
        compute=compute * dims.layers,
        cache=cache * dims.layers,
        recompute=recompute * dims.layers,
        weight_link=link * len(streamed),
        exposed_link=waited + serial,
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


def _device_bytes(dims: ModelDims, choice: Choice, *, batch: int, context: int, activations: int) -> int:
    streamed = dims.layers - choice.resident_layers
    ring = min(choice.prefetch_depth + 1, streamed) * dims.layer_weight_bytes
    heads = dims.heads
    staging = batch * context * (dims.kv_bytes * 4 + 2 * heads * dims.head_dim * dims.item + dims.act_bytes)
    return dims.global_weight_bytes + choice.resident_layers * dims.layer_weight_bytes + ring + activations + staging


def choose(dims: ModelDims, profile: HardwareProfile, *, batch: int, prompt: int, new_tokens: int,
           device_budget: int | None, activations: int = 0, block_size: int = 16,
           ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), depths: tuple[int, ...] = (1, 2)) -> Decision:
    """The fastest predicted choice that fits ``device_budget`` (``None``: no limit)."""
    context = prompt + new_tokens
    candidates = ratios if dims.checkpoints_save_bytes else (0.0,)
    considered: list[Prediction] = []
    for depth in depths:
        for resident in range(dims.layers, -1, -1):
            if resident == dims.layers and depth != depths[0]:
                continue  # nothing streams: the depth does not matter
            choice0 = Choice(resident, depth, 0.0)
            need = _device_bytes(dims, choice0, batch=batch, context=context, activations=activations)
            if device_budget is not None and need > device_budget:
                continue
            for ratio in candidates:
                choice = Choice(resident, depth, ratio)
                total, prefill, decode = generation_seconds(dims, choice, profile, batch=batch, prompt=prompt,
                                                            new_tokens=new_tokens, block_size=block_size)
                considered.append(Prediction(choice, total, batch * new_tokens / total, prefill, decode, need))
            break  # the most resident layers that fit is never slower
    if not considered:
        raise ValueError("no choice fits the device budget")
    best = min(considered, key=lambda p: p.seconds)
    why = f"{best.decode.bound} binds the decode step"
    if not dims.checkpoints_save_bytes:
        why += (f"; a checkpoint ({dims.act_bytes} B/token/layer) is not smaller than K/V ({dims.kv_bytes} B), "
                "so checkpoints were not considered")
    return Decision(best, tuple(considered), why)
