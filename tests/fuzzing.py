"""The fuzz case: what a property test draws, and the run of one drawn case against transformers.

:func:`cases` is a hypothesis strategy for :class:`Case`: a decoder family of :data:`models.FAMILIES`,
its shape (layers, hidden, heads, K/V heads dividing them, head_dim), a ragged left-padded batch,
``max_new_tokens`` and every option that changes how hscompile executes (act_ratio, block size,
mini-batch size, prefetch depth, a device budget between the minimum hscompile reports and 2x the
weights, a host budget that forces waves, quantization: see :func:`quant_options`). :func:`run_case`
runs one case and says what happened (:class:`Outcome`): its greedy tokens equal transformers'
``generate`` ("passed"), the library refused a budget with its documented
:class:`~hscompile.errors.BudgetError` ("refused"), the tokens differ ("mismatch"), a promise of the
run broke (device bytes above the budget, cache blocks held after the call: "violation"), or
anything else was raised ("crash"). A case may name a schedule of the simulated asynchronous device
(:attr:`Case.async_sim`, which ``benchmarks/fuzz.py --async-sim`` sets): it then runs with
``HSCOMPILE_ASYNC_SIM`` set to it, and its reproducer carries it.

``tests/e2e/test_fuzz.py`` runs a bounded, derandomized number of cases in the suite;
``benchmarks/fuzz.py`` (``make fuzz N=500``) runs many and writes a report whose every failure has a
one-line reproducer (:meth:`Case.command`). Nothing here is pytest-specific.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shlex
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from models import FAMILIES, GQA_FAMILIES, VOCAB, tiny_model

import hscompile
from hscompile.errors import BudgetError

__all__ = ["ASYNC_SIM", "KNOWN", "REPLAY", "Case", "Outcome", "async_sim_env", "cases", "known", "quant_options",
           "run_case", "shrink"]

REPLAY = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --replay"
"""The command (from the repository root) that replays a case given as its JSON (:meth:`Case.command`)."""

_MINIMUM = re.compile(r"device_memory >= (\d+)")


@dataclass(frozen=True)
class Case:
    """One drawn case: a tiny random-weight decoder, a left-padded batch and the options."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    """K/V heads (a divisor of ``heads``); ``heads`` for the MHA families (OPT, GPT-2)."""
    head_dim: int | None
    """A head_dim of the model's own (llama, mistral, qwen2 only); None: ``hidden // heads``."""
    seed: int
    """Seeds the weights and the prompt ids."""
    lengths: tuple[int, ...]
    """Each row's prompt length; rows are left-padded to the longest."""
    max_new_tokens: int
    act_ratio: float | str
    block_size: int
    mini_batch_size: int | str
    prefetch_depth: int
    device_budget: float | None
    """Where the device budget lies, 0 at the minimum hscompile reports for this case, 1 at twice the
    weights (the minimum itself if that is more); None: no device budget."""
    host_budget: float | None
    """Where the host budget lies, 0 at the largest sequence's blocks, 1 one byte below the whole
    batch's (so every value forces waves, or blocks on disk where the cost model predicts that faster,
    where the batch has two sequences or more); None: no host budget."""
    quant: dict[str, Any] = field(default_factory=dict)
    """Quantization options (see :func:`quant_options`); empty: none."""
    async_sim: str | None = None
    """The simulated asynchronous device's schedule the case runs under (``late``, ``early`` or
    ``random:SEED``: ``HSCOMPILE_ASYNC_SIM`` is set to it for the run); None: the environment is left
    as it is. Not drawn: ``benchmarks/fuzz.py --async-sim`` sets it."""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if data["async_sim"] is None:  # absent, as before the field existed: the same reproducers
            del data["async_sim"]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Case:
        data = json.loads(text) if isinstance(text, str) else dict(text)
        data["lengths"] = tuple(data["lengths"])
        return cls(**data)

    def command(self) -> str:
        """A shell line that replays this case from the repository root."""
        return f"{REPLAY} {shlex.quote(self.to_json())}"


@dataclass
class Outcome:
    """What one case did. ``status``: passed, refused, mismatch, violation or crash."""

    status: str
    detail: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    """The options the generator was given (budgets in bytes)."""
    seconds: float = 0.0
    traceback: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    """What a run that finished exercised: streamed layers, rows per mini-batch, waves, the ACT ratio; for
    a refusal of a drawn device budget, the minimum hscompile had reported for it."""

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "violation", "crash")


# -- failures found and not yet fixed ------------------------------------------------------------------

KNOWN: tuple[tuple[str, Callable[[Case], bool]], ...] = ()
"""Failures the fuzzer found that the library does not fix yet, each with what selects its cases:
the test in the suite skips them, ``benchmarks/fuzz.py`` runs and reports them (as failures, tagged
known). Remove an entry with its fix."""


def known(case: Case) -> str | None:
    """The description of the known failure ``case`` falls under, or None."""
    return next((description for description, selects in KNOWN if selects(case)), None)


# -- the strategy ------------------------------------------------------------------------------------


def quant_options(draw: Callable[[st.SearchStrategy[Any]], Any], *, hidden: int, width: int,
                  act_ratio: float | str) -> dict[str, Any]:
    """The one place where quantization options are drawn: ``weight_quant`` with a group size that
    divides every layer weight's last dimension (``hidden`` and the attention ``width``, heads x
    head_dim; the MLPs' are multiples of ``hidden``), and ``cache_quant`` at any given ``act_ratio``
    (not "auto", whose choice the reference cannot know: :func:`hscompile.quantize.reference_cache`
    is given hscompile's block split)."""
    out: dict[str, Any] = {}
    scheme = draw(st.sampled_from(("none", "none", "int8", "int4")))
    common = math.gcd(hidden, width)
    groups = [g for g in range(2, common + 1) if common % g == 0 and (scheme != "int4" or g % 2 == 0)]
    if scheme != "none" and groups:
        out.update(weight_quant=scheme, quant_group_size=draw(st.sampled_from(groups)))
    if act_ratio != "auto" and draw(st.booleans()):
        out["cache_quant"] = "int8"
    return out


def _hidden_and_heads(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[int, int]:
    heads = draw(st.sampled_from((1, 2, 3, 4, 6, 8)))
    # An even head size (rotary halves it), hidden in [32, 96].
    sizes = [d for d in range(4, 97, 2) if 32 <= heads * d <= 96]
    return heads * draw(st.sampled_from(sizes)), heads


@st.composite
def cases(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Case:
    """Cases small enough to run in seconds on a CPU core (layers 1-4, hidden 32-96, batch 1-4,
    prompts of 1-12 tokens, 1-6 new tokens)."""
    family = draw(st.sampled_from(FAMILIES))
    # Four layers at most, but four: with a ring of prefetch_depth + 1 slots, fewer layers than that
    # stream nothing (the minimum working set holds them all).
    layers = draw(st.integers(1, 4))
    hidden, heads = _hidden_and_heads(draw)
    if family in GQA_FAMILIES:
        kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
        head_dim = draw(st.none() | st.sampled_from((8, 16, 24)))
    else:
        kv_heads, head_dim = heads, None
    act_ratio = draw(st.sampled_from((0.0, 0.25, 0.5, 1.0, "auto")) | st.floats(0, 1).map(lambda r: round(r, 3)))
    return Case(
        family=family,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        seed=draw(st.integers(0, 2**16)),
        lengths=tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))),
        max_new_tokens=draw(st.integers(1, 6)),
        act_ratio=act_ratio,
        block_size=draw(st.sampled_from((1, 2, 3, 4, 5, 8, 16))),
        mini_batch_size=draw(st.just("auto") | st.integers(2, 4)),
        prefetch_depth=draw(st.integers(1, 3)),
        # Near the minimum, where layers stream; most of the range up to 2x the weights keeps all resident.
        device_budget=draw(st.none() | st.just(0.0) | st.floats(0, 0.2) | st.floats(0, 1)),
        host_budget=draw(st.none() | st.floats(0, 1)),
        quant=quant_options(draw, hidden=hidden, width=heads * (head_dim or hidden // heads), act_ratio=act_ratio),
    )


# -- one case ----------------------------------------------------------------------------------------


def build_model(case: Case) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if case.head_dim is not None:
        kwargs["head_dim"] = case.head_dim
    return tiny_model(case.family, seed=case.seed, layers=case.layers, hidden=case.hidden, heads=case.heads,
                      kv_heads=case.kv_heads, **kwargs)


def reference_model(model: torch.nn.Module, case: Case) -> torch.nn.Module:
    """What transformers' ``generate`` runs on: the model, or its quantized round trip."""
    if case.quant.get("weight_quant", "none") == "none":
        return model
    from hscompile.quantize import reference

    kwargs = {"quant_group_size": case.quant["quant_group_size"]} if "quant_group_size" in case.quant else {}
    return reference(model, weight_quant=case.quant["weight_quant"], **kwargs)


def reference_cache_kwargs(model: torch.nn.Module, reference: torch.nn.Module,
                           case: Case) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What ``generate`` runs on and also takes for an int8 cache: the cache with the same round
    trip, whose hooks go on a copy when the reference is the model hscompile runs."""
    if case.quant.get("cache_quant", "none") == "none":
        return reference, {}
    import copy

    from hscompile.quantize import reference_cache

    if reference is model:
        reference = copy.deepcopy(model)
    from hscompile.quantize import act_tokens_of

    width = max(case.lengths)
    act = act_tokens_of(case.lengths, case.max_new_tokens, float(case.act_ratio), case.block_size)
    return reference, {"past_key_values": reference_cache(reference, act_tokens=act,
                                                          pads=[width - n for n in case.lengths])}


def batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's prompts, left-padded with 0 to the longest, and their attention mask."""
    width = max(case.lengths)
    generator = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(3, VOCAB, (len(case.lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(case.lengths):
        mask[row, width - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def base_options(case: Case) -> dict[str, Any]:
    return {"device": "cpu", "lowering": "eager", "act_ratio": case.act_ratio, "block_size": case.block_size,
            "mini_batch_size": case.mini_batch_size, "prefetch_depth": case.prefetch_depth, **case.quant}


def host_budget(model: torch.nn.Module, case: Case) -> int:
    """Bytes between the largest sequence's blocks and one byte below the whole batch's, at every ACT
    ratio the call may use (the search's, for ``"auto"``), as the pools are allocated: pinned ones
    (the simulated asynchronous device's, as CUDA's) round up to a power of two each."""
    from hscompile._env import async_sim
    from hscompile.ir.cache import CacheSpec
    from hscompile.planner.cost_model import RATIOS

    spec = CacheSpec.from_config(model.config, next(model.parameters()).dtype, case.block_size,
                                 case.quant.get("cache_quant", "none"))
    ratios = RATIOS if case.act_ratio == "auto" else (float(case.act_ratio),)
    totals = [n + case.max_new_tokens for n in case.lengths]
    pinned = async_sim() is not None

    def pools(ratio: float, rows: list[int]) -> int:
        blocks = [spec.blocks_for(ratio, t) for t in rows]
        return spec.pool_bytes(sum(b[0] for b in blocks), sum(b[1] for b in blocks), pinned=pinned)

    low = max(pools(r, [t]) for r in ratios for t in totals)
    high = max(low, min(pools(r, totals) for r in ratios) - 1)
    return round(low + (case.host_budget or 0.0) * (high - low))


def reported_minimum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, case: Case,
                     options: dict[str, Any]) -> int:
    """The device budget hscompile names as the least that works for this call (its refusal of 1 byte)."""
    probe = hscompile.Generator(model, {**options, "device_memory": 1})
    try:
        probe.generate(ids, mask, max_new_tokens=case.max_new_tokens)
    except BudgetError as error:
        found = _MINIMUM.search(str(error))
        if found is None:
            raise
        return int(found.group(1))
    finally:
        del probe
        torch._dynamo.reset()
    raise AssertionError("a device budget of 1 byte was accepted")


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _first_difference(got: torch.Tensor, expected: torch.Tensor, prompt: int, scores: tuple[torch.Tensor, ...]) -> str:
    if got.shape != expected.shape:
        width = min(got.shape[1], expected.shape[1])
        if torch.equal(got[:, :width], expected[:, :width]):
            return f"shapes {tuple(got.shape)} vs transformers' {tuple(expected.shape)}, equal up to column {width}"
    else:
        width = got.shape[1]
    rows, columns = (got[:, :width] != expected[:, :width]).nonzero(as_tuple=True)
    row, column = int(rows[0]), int(columns[0])
    step = column - prompt
    where = f"row {row}, new token {step}: {int(got[row, column])} vs transformers' {int(expected[row, column])}"
    if 0 <= step < len(scores):
        top = scores[step][row].float().topk(2).values
        where += f" (transformers' top-2 logit margin there {float(top[0] - top[1]):.3g})"
    return where


ASYNC_SIM = "HSCOMPILE_ASYNC_SIM"


@contextmanager
def async_sim_env(schedule: str | None) -> Iterator[None]:
    """``HSCOMPILE_ASYNC_SIM`` set to ``schedule`` inside the block (read when a device backend is
    built), restored after it; None leaves the environment alone."""
    if schedule is None:
        yield
        return
    previous = os.environ.get(ASYNC_SIM)
    os.environ[ASYNC_SIM] = schedule
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ASYNC_SIM, None)
        else:
            os.environ[ASYNC_SIM] = previous


def run_case(case: Case) -> Outcome:
    """Run ``case``: hscompile's greedy tokens against transformers' ``generate`` on the reference,
    under the case's simulated asynchronous device schedule if it names one."""
    with async_sim_env(case.async_sim):
        return _run_case(case)


def _run_case(case: Case) -> Outcome:
    torch._dynamo.reset()
    gc.collect()
    start = time.perf_counter()
    options = base_options(case)
    minimum = None
    try:
        model = build_model(case)
        ids, mask = batch(case)
        reference, cache_kwargs = reference_cache_kwargs(model, reference_model(model, case), case)
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=mask, max_new_tokens=case.max_new_tokens,
                                          do_sample=False, pad_token_id=0, output_logits=True,
                                          return_dict_in_generate=True, **cache_kwargs)
        if case.host_budget is not None:
            options["host_memory"] = host_budget(model, case)
        if case.device_budget is not None:
            minimum = reported_minimum(model, ids, mask, case, options)
            high = max(2 * _weight_bytes(model), minimum)
            options["device_memory"] = round(minimum + case.device_budget * (high - minimum))
        generator = hscompile.Generator(model, options)
        got = generator.generate(ids, mask, max_new_tokens=case.max_new_tokens)
    except BudgetError as error:
        # A device budget at or above the minimum hscompile reported, refused (by a later graph of the
        # call: another wave's, the decode step's) is counted apart: the reported minimum did not hold.
        facts = {"reported_minimum": minimum} if minimum is not None else {}
        return Outcome("refused", str(error).splitlines()[0], options, time.perf_counter() - start, facts=facts)
    except Exception as error:  # noqa: BLE001 - anything else a case raises is what the fuzzer looks for
        first = (str(error).strip().splitlines() or [""])[0]
        return Outcome("crash", f"{type(error).__name__}: {first}", options, time.perf_counter() - start,
                       traceback.format_exc(limit=-12))
    seconds = time.perf_counter() - start
    if not torch.equal(got, expected.sequences):
        return Outcome("mismatch", _first_difference(got, expected.sequences, ids.shape[1], expected.logits), options,
                       seconds)
    try:
        broken = _broken_promises(generator)
    except Exception as error:  # noqa: BLE001
        return Outcome("crash", f"checking the run's promises: {type(error).__name__}: {error}", options, seconds,
                       traceback.format_exc(limit=-12))
    facts = _facts(generator, case, options)
    if broken:
        return Outcome("violation", "; ".join(broken), options, seconds, facts=facts)
    return Outcome("passed", "", options, seconds, facts=facts)


def _facts(generator: hscompile.Generator, case: Case, options: dict[str, Any]) -> dict[str, Any]:
    """Diagnostics only: a figure the library no longer offers as it did is None, not a failure. Under
    a simulated asynchronous device, also its schedule and the copies it completed late."""
    plan = generator.plan
    facts = {"streamed_layers": max((c.stats().get("streamed_layers", 0) for c in generator.compiled_graphs),
                                    default=0),
             "minibatch_size": plan.minibatch_rows if plan else None, "waves": len(plan.waves) if plan else None,
             "act_ratio": plan.act_ratio if plan else None}
    if case.async_sim is not None:
        try:
            stats = generator.stats()
        except Exception:  # noqa: BLE001 - diagnostics only
            stats = {}
        facts.update(async_sim=stats.get("async_sim"), deferred_copies=stats.get("deferred_copies"))
    return facts


def _broken_promises(generator: hscompile.Generator) -> list[str]:
    """What the run promised and did not keep: device bytes within the budget, every cache block free."""
    broken = []
    for index, compiled in enumerate(generator.compiled_graphs):
        stats = compiled.stats()
        budget, peak = stats.get("device_budget"), stats.get("peak_device_bytes")
        if budget is not None and peak is not None and peak > budget:
            broken.append(f"graph {index} peaked at {peak} device bytes, above its budget of {budget}")
    pools = getattr(generator.cache, "cache", None)
    if pools is not None:
        held = [f"{name} {pool.num_blocks - pool.num_free()} of {pool.num_blocks}"
                for name, pool in (("KV", pools.kv_pool), ("ACT", pools.act_pool))
                if pool.num_free() != pool.num_blocks]
        if pools.sequences or held:
            broken.append(f"cache blocks held after the call: {', '.join(held) or 'none'}; "
                          f"sequences {len(pools.sequences)}")
    return broken


# -- minimising a failure --------------------------------------------------------------------------------


def _simpler(case: Case) -> list[Case]:
    """Cases one step simpler than ``case``, simplest first."""
    replace = dataclasses.replace
    out: list[Case] = []
    if case.layers > 1:
        out.append(replace(case, layers=1))
        out.append(replace(case, layers=case.layers - 1))
    for row in range(len(case.lengths)):
        if len(case.lengths) > 1:
            out.append(replace(case, lengths=case.lengths[:row] + case.lengths[row + 1:]))
    for row, length in enumerate(case.lengths):
        if length > 1:
            for shorter in dict.fromkeys((1, length // 2, length - 1)):
                out.append(replace(case, lengths=(*case.lengths[:row], shorter, *case.lengths[row + 1:])))
    if case.max_new_tokens > 1:
        out.extend(replace(case, max_new_tokens=n) for n in dict.fromkeys((1, case.max_new_tokens - 1)))
    simple = {"device_budget": None, "host_budget": None, "head_dim": None, "mini_batch_size": "auto",
              "prefetch_depth": 1, "block_size": 16, "quant": {}}
    for name, value in simple.items():
        if getattr(case, name) != value:
            out.append(replace(case, **{name: value}))
    for ratio in (0.0, 1.0, 0.5):
        if case.act_ratio != ratio:
            out.append(replace(case, act_ratio=ratio))
    if case.kv_heads != case.heads and case.family in GQA_FAMILIES:
        out.append(replace(case, kv_heads=case.heads))
    if case.device_budget not in (None, 0.0):
        out.append(replace(case, device_budget=0.0))
    if case.host_budget not in (None, 0.0):
        out.append(replace(case, host_budget=0.0))
    if case.family != "llama":
        out.append(replace(case, family="llama", kv_heads=case.kv_heads if case.family in GQA_FAMILIES else case.heads))
    return out


def shrink(case: Case, outcome: Outcome, *, budget: int = 60,
           log: Callable[[str], None] = lambda _: None) -> tuple[Case, Outcome]:
    """A smaller case failing the same way as ``case`` did (the same status, and for a crash the same
    exception type), found greedily in at most ``budget`` runs."""
    kind = outcome.detail.split(":")[0] if outcome.status == "crash" else None

    def same(other: Outcome) -> bool:
        return other.status == outcome.status and (kind is None or other.detail.split(":")[0] == kind)

    runs = 0
    progress = True
    while progress and runs < budget:
        progress = False
        for candidate in _simpler(case):
            if runs >= budget:
                break
            runs += 1
            result = run_case(candidate)
            if same(result):
                case, outcome, progress = candidate, result, True
                log(f"  shrunk ({runs} runs): {case.to_json()}")
                break
    return case, outcome
