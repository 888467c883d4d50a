"""The per-call decision: one frozen :class:`~hscompile.ir.call.CallPlan` per generation call.

:func:`plan_call` decides, once and before any work, the ACT ratio, the mini-batch rows and
count, the waves the host budget admits (or the blocks it leaves out on disk:
:mod:`~hscompile.planner.spill`), and the cache staging the call's graphs reserve. Fixed
options are used as they are; an ``"auto"`` one is the cost model's search
(:func:`~hscompile.planner.cost_model.choose`) on the device's hardware profile. Whether
checkpoints can save link bytes at all is one rule, in bytes:
:attr:`~hscompile.ir.cache.CacheSpec.checkpoints_save_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import HybridServeConfig, act_ratio_value
from ..errors import BudgetError
from ..ir.cache import CacheSpec
from ..ir.call import CallPlan
from .budget import HostBudget, admit_waves, decode_staging, device_budget, staged_ratio
from .cost_model import RATIOS, Decision, ModelDims, choose, resolve_act_ratio
from .hardware import HardwareProfile, tune
from .minibatch import minibatch_count
from .spill import plan_spill

__all__ = ["plan_call"]


def plan_call(config: HybridServeConfig, spec: CacheSpec, *, totals: Sequence[int], prompt: int, new_tokens: int,
              act_ratio: object = None, overlap: bool, host: HostBudget | int | None, dims: ModelDims,
              profile: HardwareProfile | None = None, sampling: Any = None, spill: bool = True) -> CallPlan:
    """The plan of a call of ``len(totals)`` sequences (each ``totals[i]`` tokens when done, the
    longest prompt ``prompt`` tokens) on a model of cache dimensions ``spec``.

    ``act_ratio`` overrides the options' ratio (None: the options'; checked here, the one check
    of a call's ratio). ``overlap``: whether the runtime stages a second set of cache buffers to
    load ahead. ``host``: the budget the waves must fit (:func:`~hscompile.planner.budget.host_budget`).
    ``dims`` are the model's sizes as stored; ``profile`` the device's, measured here
    (:func:`~hscompile.planner.hardware.tune`, cached per device) when something is ``"auto"`` and
    none is given; the plan carries the one it searched on. ``sampling``: the call's resolved
    sampling settings (:class:`~hscompile.generation.params.Sampling`, decided from the caller's
    and the checkpoint's parameters before the plan), carried so that the plan holds every
    per-call decision. ``spill=False`` keeps the waves whatever ``disk_cache`` says (the generator's
    second plan, when the placement of a spilled batch's graphs refused the device budget). Where nothing fits
    the device budget, the search gives way to the configured values (an ``"auto"`` ratio: the
    rule's default): the placement of the call's first graph then refuses the budget with the
    minimum that would work."""
    ratio = config.cache.act_ratio if act_ratio is None else act_ratio_value(act_ratio, "act_ratio")
    size = config.schedule.mini_batch_size
    batch = len(totals)
    decision: Decision | None = None
    measured: HardwareProfile | None = None
    staged = staged_ratio(config, spec)
    if ratio == "auto" or size == "auto":
        measured = profile or tune(config.device, dtypes=(dims.dtype,), width=dims.hidden, quick=True)
        try:
            decision = choose(
                dims, measured, batch=batch, prompt=prompt, new_tokens=new_tokens,
                device_budget=device_budget(config), depths=(config.schedule.prefetch_depth,),
                activations=dims.prefill_activation_bytes(batch, prompt), block_size=config.cache.block_size,
                ratios=(float(ratio),) if ratio != "auto" else RATIOS,
                minibatches=None if size == "auto" else (minibatch_count(batch, size),),
                device_type=config.device.type, staged_ratio=staged,
            )
        except ValueError:
            decision = None
    if ratio != "auto":
        chosen = float(ratio)
    elif decision is not None:
        chosen = decision.best.choice.act_ratio
    else:
        chosen = resolve_act_ratio(config, spec)
    if size != "auto":
        rows: int | None = size
    elif decision is not None and decision.best.choice.minibatches > 1:
        rows = -(-batch // decision.best.choice.minibatches)
    else:
        rows = None
    ratio_staged = max(chosen, staged)
    budget = HostBudget(host, option=True) if isinstance(host, int) else host
    try:
        waves: list[list[int]] | None = admit_waves(spec, chosen, totals, budget)
    except BudgetError:
        if config.cache.disk_cache == "off" or not spill:
            raise
        waves = None  # not one sequence fits the host budget alone: only blocks on disk can run it
    spilled = None
    if spill and budget is not None and (waves is None or len(waves) > 1):
        others = RATIOS if ratio == "auto" and spec.checkpoints_save_bytes else ()
        spilled = plan_spill(config, spec, dims, totals=totals, ratios=(chosen, *(r for r in others if r != chosen)),
                             staged=ratio_staged, waves=waves, budget=budget, prompt=prompt,
                             new_tokens=new_tokens, profile=measured or profile)
        if spilled is None and waves is None:
            admit_waves(spec, chosen, totals, budget)  # raises the BudgetError naming the need
    if spilled is not None or waves is None:
        waves = [list(range(batch))]
    if spilled is not None:
        chosen = spilled.act_ratio
        ratio_staged = max(chosen, staged)
    largest = max(len(w) for w in waves)
    count = minibatch_count(largest, rows) if rows is not None else 1
    if count == 1:
        rows = None
    staging = decode_staging(spec, ratio_staged, rows=-(-largest // count), longest=max(totals), overlap=overlap)
    return CallPlan(
        act_ratio=chosen, staged_ratio=ratio_staged, minibatch_rows=rows, minibatches=count,
        waves=tuple(tuple(w) for w in sorted(waves, key=len, reverse=True)), staging_bytes=staging,
        workload=(largest, prompt, new_tokens), profile=measured, decision=decision, spill=spilled, sampling=sampling,
    )
