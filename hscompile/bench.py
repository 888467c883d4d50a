"""Generation benchmarks: hscompile's policies beside the systems people use instead, in one run.

:func:`run` measures, for one model and workload, each policy of :data:`POLICIES`:

* hscompile with ``act_ratio="auto"`` (the cost model's choice), with all state as K/V
  (FlexGen's policy) and with all state as checkpoints, each under the same device budget;
* hscompile with everything resident, where the weights and cache staging fit the device;
* on request (:data:`QUANTIZED_POLICIES`, not in the default list), hscompile with ``act_ratio="auto"``
  and its layers' weights quantized (``int8-weights``, ``int4-weights``), or int4 weights and int8
  cache blocks (``int4-int8-cache``);
* transformers' own ``generate``: with its cache on the device (``transformers``), with its
  offloaded cache (``offloaded-cache``), without a cache (``token-recompute``: every step
  recomputes K/V from the token ids), and, on CUDA with ``accelerate`` installed, with the
  weights placed by Accelerate's ``device_map`` under the same budget (``accelerate``).

Each policy is warmed up (compilation, allocation) with the same shapes, then timed for the
full generation and for a 2-token one: their difference over ``new_tokens - 2`` steps is the
average decode step (prefill and fixed costs cancel). Bytes over the link come from hscompile's
counters (weights, cache and inputs, host to device); link utilization is those bytes per decode
step over the step time, against the profile's measured pinned bandwidth. A policy that cannot
run here (not installed, needs CUDA, does not fit) is reported with the reason, not dropped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .planner.cost_model import Choice, ModelDims, generation_seconds
from .planner.hardware import HardwareProfile
from .runtime.timeline import LANES, Span

__all__ = ["ALL_POLICIES", "POLICIES", "QUANTIZED_POLICIES", "BenchResult", "Workload", "plot_timeline", "results_table",
           "run", "trace", "weight_bytes"]

POLICIES = ("auto", "all-kv", "all-act", "resident", "transformers", "offloaded-cache", "token-recompute", "accelerate")
"""Every policy :func:`run` knows, in report order."""

QUANTIZED_POLICIES = ("int8-weights", "int4-weights", "int4-int8-cache")
ALL_POLICIES = POLICIES + QUANTIZED_POLICIES
_HSCOMPILE = {"auto": "auto", "all-kv": 0.0, "all-act": 1.0, "resident": "auto", "int8-weights": "auto",
              "int4-weights": "auto", "int4-int8-cache": "auto"}
_QUANT = {"int8-weights": {"weight_quant": "int8"}, "int4-weights": {"weight_quant": "int4"},
          "int4-int8-cache": {"weight_quant": "int4", "cache_quant": "int8"}}


@dataclass(frozen=True, slots=True)
class Workload:
    batch: int
    prompt: int
    new_tokens: int


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One policy's figures (None where not measured; ``note`` says why or what was chosen)."""

    policy: str
    tokens_per_s: float | None = None
    decode_step_ms: float | None = None
    link_bytes_per_step: int | None = None
    """Host-to-device bytes of one average decode step (weights, cache, inputs)."""
    link_utilization: float | None = None
    """``link_bytes_per_step / decode step time`` over the profile's pinned host-to-device bandwidth."""
    peak_device_bytes: int | None = None
    predicted_tokens_per_s: float | None = None
    """The cost model's prediction for the policy as it ran (hscompile policies)."""
    note: str = ""

    @property
    def ran(self) -> bool:
        return self.tokens_per_s is not None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each counted once (tied embeddings are one tensor)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _prompts(workload: Workload, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, max(vocab, 4), (workload.batch, workload.prompt), generator=generator)


def _timed(fn: Callable[[int], Any], workload: Workload) -> tuple[float, float]:
    """``(seconds for the whole generation, seconds per decode step)``, warm."""
    fn(workload.new_tokens)  # warm-up: compilation, allocation, the cost model's profile
    start = time.perf_counter()
    fn(workload.new_tokens)
    whole = time.perf_counter() - start
    steps = workload.new_tokens - 2
    if steps <= 0:
        return whole, whole
    start = time.perf_counter()
    fn(2)
    short = time.perf_counter() - start
    return whole, max(whole - short, 0.0) / steps


def _link_bytes(generator: Any) -> int:
    executors = [c.executor for c in generator.compiled_graphs if c.executor is not None]
    return sum(e.runtime.weights.weight_h2d_bytes + e.runtime.input_h2d_bytes for e in executors) + \
        generator.cache.counters.cache_h2d_bytes


def _hscompile(model: torch.nn.Module, policy: str, workload: Workload, options: dict[str, Any],
               profile: HardwareProfile, ids: torch.Tensor) -> BenchResult:
    from .errors import BudgetError
    from .generation import Generator

    opts = dict(options)
    if policy == "resident":
        opts.pop("device_memory", None)
        weights = weight_bytes(model)
        if profile.device_memory_bytes and weights > profile.device_memory_bytes:
            return BenchResult(policy, note=f"the weights ({weights / 2**30:.1f} GiB) do not fit the device")
    opts["act_ratio"] = _HSCOMPILE[policy]
    opts.update(_QUANT.get(policy, {}))
    torch._dynamo.reset()
    try:
        generator = Generator(model, opts)
        counted: list[tuple[int, int]] = []

        def fn(new: int) -> None:
            before = _link_bytes(generator)
            steps_before = generator.cache.counters.steps
            generator.generate(ids, max_new_tokens=new)
            counted.append((_link_bytes(generator) - before, generator.cache.counters.steps - steps_before))

        whole, step = _timed(fn, workload)
    except BudgetError as error:
        return BenchResult(policy, note=f"does not fit: {error}")
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden, and the other policies still run
        return BenchResult(policy, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    full_bytes, full_steps = counted[1]
    per_step = full_bytes  # with 2 new tokens or fewer there is no shorter run to subtract (_timed)
    if len(counted) > 2:
        short_bytes, short_steps = counted[2]
        per_step = (full_bytes - short_bytes) // max(full_steps - short_steps, 1)
    stats = generator.stats()
    executors = [c.executor for c in generator.compiled_graphs if c.executor is not None]
    peak = max(e.runtime.peak_device_bytes for e in executors)
    if torch.device(opts.get("device", "cpu")).type == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated())
    decode = generator.compiled_graphs[-1].policy
    dims = ModelDims.from_model(model)
    choice = Choice(len(decode.resident_layers), decode.prefetch_depth, float(stats["act_ratio"]),
                    decode.minibatches)
    predicted, _, _ = generation_seconds(dims, choice, profile, batch=workload.batch, prompt=workload.prompt,
                                         new_tokens=workload.new_tokens, block_size=decode.block_size)
    note = (f"act_ratio {stats['act_ratio']:.2f}, {len(decode.resident_layers)}/{dims.layers} layers resident, "
            f"{decode.minibatches} mini-batch(es)")
    return BenchResult(
        policy,
        tokens_per_s=workload.batch * workload.new_tokens / whole,
        decode_step_ms=step * 1e3,
        link_bytes_per_step=per_step,
        link_utilization=(per_step / step) / profile.h2d_bytes_per_s if step > 0 else None,
        peak_device_bytes=peak,
        predicted_tokens_per_s=workload.batch * workload.new_tokens / predicted,
        note=note,
    )


def _transformers(model: torch.nn.Module, policy: str, workload: Workload, options: dict[str, Any],
                  ids: torch.Tensor) -> BenchResult:
    device = torch.device(options.get("device", "cpu"))
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if policy == "offloaded-cache":
        kwargs["cache_implementation"] = "offloaded"
    elif policy == "token-recompute":
        kwargs["use_cache"] = False
    runner = model
    if policy == "accelerate":
        if device.type != "cuda":
            return BenchResult(policy, note="needs CUDA: on the CPU nothing is offloaded")
        try:
            import accelerate
        except ImportError:
            return BenchResult(policy, note="accelerate is not installed (pip install accelerate)")
        budget = options.get("device_memory")
        device_map = accelerate.infer_auto_device_map(model, max_memory={device.index or 0: budget, "cpu": 2**40})
        runner = accelerate.dispatch_model(model, device_map=device_map)
    elif device.type == "cuda":
        weights = weight_bytes(model)
        budget = options.get("device_memory")
        if budget is not None and weights > budget:
            return BenchResult(policy, note="the weights do not fit the device budget (transformers has no offload here)")
        runner = model.to(device)
    inputs = ids.to(device if policy != "accelerate" else torch.device("cuda"))

    def fn(new: int) -> None:
        with torch.no_grad():
            runner.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new, min_new_tokens=new,
                            **kwargs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        whole, step = _timed(fn, workload)
    except Exception as error:  # noqa: BLE001 - a baseline that fails here is reported, not hidden
        return BenchResult(policy, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    finally:
        if policy != "accelerate" and device.type == "cuda":
            model.to("cpu")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return BenchResult(policy, tokens_per_s=workload.batch * workload.new_tokens / whole, decode_step_ms=step * 1e3,
                       peak_device_bytes=peak)


def run(model: torch.nn.Module, workload: Workload, *, options: dict[str, Any], profile: HardwareProfile,
        policies: Sequence[str] = POLICIES, progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """Measure ``policies`` on ``model`` (host-resident, random weights are fine) for ``workload``
    with hscompile ``options`` (the device and its budget); see the module docstring."""
    unknown = sorted(set(policies) - set(ALL_POLICIES))
    if unknown:
        raise ValueError(f"unknown benchmark policies {unknown}; valid: {', '.join(ALL_POLICIES)}")
    if workload.batch < 1 or workload.prompt < 1 or workload.new_tokens < 1:
        raise ValueError(f"batch, prompt and new_tokens must be >= 1, got {workload}")
    ids = _prompts(workload, model.config.vocab_size)
    results = []
    for policy in policies:
        if progress is not None:
            progress(policy)
        if policy in _HSCOMPILE:
            results.append(_hscompile(model, policy, workload, options, profile, ids))
        else:
            results.append(_transformers(model, policy, workload, options, ids))
    return results


def ratios(results: Sequence[BenchResult], against: str) -> dict[str, float]:
    """Throughput of each policy that ran over that of ``against``."""
    base = next((r for r in results if r.policy == against and r.ran), None)
    if base is None:
        return {}
    return {r.policy: r.tokens_per_s / base.tokens_per_s for r in results if r.ran}  # type: ignore[operator]


def results_table(results: Sequence[BenchResult], title: str) -> Any:
    """A rich table of ``results`` with throughput ratios against hscompile's all-KV policy."""
    from rich.table import Table

    versus = ratios(results, "all-kv")
    table = Table(title=title)
    for column in ("policy", "tokens/s", "vs all-KV", "decode step ms", "link MB/step", "link util.", "peak device",
                   "predicted tok/s", "note"):
        table.add_column(column)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in results:
        table.add_row(
            r.policy, fmt(r.tokens_per_s, ".1f"), fmt(versus.get(r.policy), ".2f"), fmt(r.decode_step_ms, ".2f"),
            fmt(None if r.link_bytes_per_step is None else r.link_bytes_per_step / 1e6, ".2f"),
            fmt(None if r.link_utilization is None else 100 * r.link_utilization, ".0f")
            + ("%" if r.link_utilization else ""),
            fmt(None if r.peak_device_bytes is None else r.peak_device_bytes / 2**20, ".0f")
            + (" MiB" if r.peak_device_bytes else ""),
            fmt(r.predicted_tokens_per_s, ".1f"), r.note,
        )
    return table


def write_json(path: str | Path, results: Sequence[BenchResult], meta: dict[str, Any]) -> None:
    """Results, the ratios against every baseline that ran, and how they were measured."""
    baselines = {p: ratios(results, p) for p in POLICIES if p != "auto"}
    Path(path).write_text(json.dumps({
        **meta,
        "results": [asdict(r) for r in results],
        "auto_vs": {p: r["auto"] for p, r in baselines.items() if "auto" in r},
    }, indent=2))


def plot_timeline(spans: Sequence[Span], path: str | Path, *, title: str, call: int = -1) -> None:
    """Draw one call of a recorded timeline (default: the last, a decode step) as a PNG: a row per
    lane, compute coloured by mini-batch, copies by what they carry. Needs matplotlib (the
    ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting a timeline needs matplotlib: pip install 'hscompile[plot]'") from error
    calls = [s for s in spans if s.lane == "calls"]
    if not calls:
        raise ValueError("the timeline holds no call of a compiled model: was the model run inside record_timeline()?")
    window = calls[call]
    shown = [s for s in spans if s.start_ms >= window.start_ms - 1e-6 and s.end_ms <= window.end_ms + 1e-3
             and s is not window]
    lanes = [lane for lane in LANES if lane != "calls" and any(s.lane == lane for s in shown)]
    # Colour says what a span is; compute and host spans of odd mini-batches are drawn lighter.
    colours = {"attn_in": "tab:blue", "attn_out": "tab:blue", "pre": "tab:blue", "post": "tab:blue",
               "attention": "tab:purple", "recompute": "tab:red", "load_kv": "tab:olive", "load_act": "tab:olive",
               "store": "tab:brown", "to_device": "tab:gray", "to_host": "tab:gray",
               "copy: weights": "tab:gray", "copy: cache": "tab:green"}
    names = {"tab:blue": "dense layers", "tab:purple": "attention", "tab:red": "K/V recompute",
             "tab:olive": "cache gather", "tab:brown": "cache store", "tab:gray": "weights / inputs",
             "tab:green": "cache copy"}
    figure, axes = plt.subplots(figsize=(12, 0.7 * len(lanes) + 1.6))
    used: dict[str, Any] = {}
    for row, lane in enumerate(reversed(lanes)):
        for s in (s for s in shown if s.lane == lane):
            colour = colours.get(lane) or colours.get(s.args.get("kind", ""), "tab:gray")
            bars = axes.broken_barh([(s.start_ms - window.start_ms, max(s.ms, 1e-4))], (row - 0.4, 0.8),
                                    facecolors=colour, alpha=0.55 if (s.args.get("minibatch") or 0) % 2 else 1.0,
                                    edgecolors="white", linewidth=0.3)
            used.setdefault(names[colour], bars)
            if s.ms > 0.04 * window.ms:
                layer = s.args.get("layer")
                text = s.label.split()[0] if layer is None else f"L{layer}"
                if "minibatch" in s.args:
                    text += f" mb{s.args['minibatch']}"
                axes.text(s.start_ms - window.start_ms + s.ms / 2, row, text, ha="center", va="center", fontsize=6)
    axes.legend(list(used.values()), list(used), loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(used),
                fontsize=7, frameon=False)
    axes.set_yticks(range(len(lanes)), list(reversed(lanes)))
    axes.set_xlim(0, window.ms)
    axes.set_xlabel(f"ms into the {window.label} call")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


@contextlib.contextmanager
def trace(path: str | Path) -> Iterator[None]:
    """Record what runs inside the block as a torch.profiler Chrome trace at ``path``: every
    aten op and kernel, for a look below hscompile's own :func:`~hscompile.record_timeline`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield
    prof.export_chrome_trace(str(path))
