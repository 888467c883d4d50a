"""Placement pass: decide which layers' weights stay on the device and which stream through it.

Precondition: ``plan = analyze(graph)``, ``activations = estimate_activations(graph, plan)``;
``example_inputs`` are the real tensors dynamo passes to the backend (the weights among
them); ``config`` is validated.

Postcondition: a :class:`~hscompile.ir.policy.Policy` whose :attr:`~hscompile.ir.policy.Policy.memory`
plan fits ``device_memory``, or a :class:`~hscompile.errors.BudgetError` naming the minimum
budget that would work. Nothing runs and nothing is allocated.

The rule: weights outside the layers are always resident. Whole layers stay resident, from the
first layer on, while they fit beside a slot ring for the rest; the rest stream. Resident
layers first because a streamed layer's copy can then overlap the resident layers' compute
(and the embedding's) at the start of every call. Weights that already live on the compute
device are used in place and cannot stream (hscompile streams from host memory only), unless
the layers are stored quantized (``weight_quant``): then every group is packed, the layers in
their quantized format, and no weight is used in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .._env import async_sim, offload_dir
from ..config import HybridServeConfig, format_bytes
from ..errors import BudgetError, ConfigError
from ..ir.activation import ActivationEstimate
from ..ir.call import CallPlan
from ..ir.layout import DISK_SLOTS, GLOBAL_GROUP, disk_groups, group_layouts, read_bytes, staging_bytes
from ..ir.plan import ModelPlan
from ..ir.policy import DeviceMemoryPlan, Policy, check_device_budget
from ..ir.quant import scheme_of
from ..planner.budget import device_budget
from ..planner.cost_model import Choice, ModelDims, simulate_step

__all__ = ["place"]


def _weights_device(plan: ModelPlan, example_inputs: Sequence[Any]) -> torch.device:
    devices = {example_inputs[w.input_index].device for w in plan.weights}
    if len(devices) > 1:
        raise ConfigError(
            f"the model's weights are spread over several devices ({', '.join(sorted(map(str, devices)))}); "
            "put them on one (the CPU, to let hscompile stream them)"
        )
    return devices.pop()


def place(
    plan: ModelPlan,
    activations: ActivationEstimate,
    example_inputs: Sequence[Any],
    config: HybridServeConfig,
    cache: CallPlan | None = None,
) -> Policy:
    """See the module docstring. ``cache`` is given for generation graphs: the plan of the call
    that compiles the graph; the device plan also holds its staging bytes, and the policy records
    its ACT ratio and mini-batches."""
    device = config.device
    weights_device = _weights_device(plan, example_inputs)
    # Host-resident weights (or meta ones, when only planning) can stream; device-resident ones cannot.
    can_stream = weights_device.type in ("cpu", "meta")
    weight_format = scheme_of(config.quant)
    # A quantized layer exists only in the store's packed buffers: it cannot be used where the model holds it.
    # Under the simulated asynchronous device (a test tool) the CPU stands for a GPU whose host is
    # the CPU too: weights are never in place there, as a CUDA device's are not in host memory.
    in_place = weights_device == device and weight_format is None and async_sim() is None
    layouts = group_layouts(plan, weight_format)
    budget = device_budget(config)
    depth = config.schedule.prefetch_depth

    def layer_bytes(index: int) -> int:
        return plan.layers[index].weight_bytes if in_place else layouts[index].nbytes

    global_bytes = plan.global_weight_bytes if in_place else layouts[GLOBAL_GROUP].nbytes
    act = activations.hint
    # The partitions of a quantized layer hold its matrices at full precision while they run; which
    # matrices are quantized is the layouts' to say (as for the quantize pass).
    dequantized = 0
    for i, layer in enumerate(plan.layers):
        quantized = {p.node for p in layouts[i].weights if p.part is not None}
        dequantized = max(dequantized, sum(w.nbytes for w in layer.weights if w.node in quantized))
    staging = cache.staging_bytes if cache is not None else 0
    n = plan.num_layers
    on_disk = disk_groups(layouts, {w.node: example_inputs[w.input_index] for w in plan.weights})
    # A layer on disk is read, never used where the model maps it (that would read it through the
    # page cache and keep it there): used in place, the layers stay resident only up to the first on disk.
    # Without a device budget (the CPU, whose memory is the host's) they stream too: resident, they
    # would fill the host memory the disk tier keeps them out of.
    most_resident = min(on_disk, default=n) if in_place or budget is None else n

    def memory_plan(resident: int) -> tuple[DeviceMemoryPlan, int, int]:
        streamed = list(range(resident, n))
        slots = min(depth + 1, len(streamed))
        slot = max((layouts[i].nbytes for i in streamed), default=0)
        memory = DeviceMemoryPlan.build(
            device.type,
            global_weights=global_bytes,
            resident_layers=sum(layer_bytes(i) for i in range(resident)),
            ring=slots * slot,
            activations=act,
            cache_staging=staging,
            dequantized=dequantized,
        )
        return memory, slots, slot

    full, _, _ = memory_plan(n)
    minimum = memory_plan(0)[0].total if can_stream else full.total
    if most_resident < n and (budget is None or memory_plan(most_resident)[0].total <= budget):
        resident = most_resident
        reason = (f"layers {most_resident}..{n - 1} stay on disk, and "
                  + ("the weights are used where the model holds them" if in_place else "no device budget is set")
                  + f": {resident} resident layer(s), the others stream")
    elif most_resident == n and (budget is None or full.total <= budget):
        resident = n
        reason = (
            f"all {n} layers fit in the device budget ({format_bytes(full.total)} of {format_bytes(budget)})"
            if budget is not None
            else f"no device budget set for {device.type}: all {n} layers resident"
        )
    elif not can_stream:
        check_device_budget(
            full, budget, what=f"the model, whose weights already live on {weights_device},",
            advice="hscompile streams weights from host memory only: load the model on the CPU to run it within "
                   "this budget")
        raise AssertionError("unreachable: the full plan is above the budget")
    else:
        fitting = [r for r in range(min(n - 1, most_resident), -1, -1) if memory_plan(r)[0].total <= budget]
        if not fitting:
            smallest = memory_plan(0)[0]
            check_device_budget(
                smallest, budget,
                what=f"the minimum working set for this call's shapes (every layer streamed through a ring of "
                     f"{min(depth + 1, n)} slots)",
                advice=f"use device_memory >= {smallest.total}" + (" or a smaller prefetch_depth" if depth > 1 else "")
                       + " or smaller batches")
        resident = fitting[0]
        memory, slots, _ = memory_plan(resident)
        reason = (
            f"device_memory={format_bytes(budget)} holds the global weights, {resident} resident layer(s) and a "
            f"ring of {slots} slot(s) for the other {n - resident}, beside {format_bytes(act)} of activations"
        )

    memory, slots, slot = memory_plan(resident)
    streamed = tuple(range(resident, n))
    disk = tuple(i for i in streamed if i in on_disk)
    predicted = None
    if cache is not None and cache.profile is not None and cache.workload is not None:
        batch, prompt, new_tokens = cache.workload
        dims = replace(ModelDims.from_plan(plan, layout_bytes=max(layouts[i].nbytes for i in range(n)),
                                           global_bytes=global_bytes, quantized=weight_format is not None),
                       cache_quant=config.quant.cache_quant)
        predicted = simulate_step(dims, Choice(resident, depth, cache.act_ratio, cache.minibatches, len(disk)),
                                  cache.profile,
                                  batch=batch, new=1, past=prompt + new_tokens - 1, block_size=config.cache.block_size)
        reason += (f"; predicted longest decode step {predicted.seconds * 1e3:.2f} ms on {cache.profile.device_name}, "
                   f"bound by {predicted.bound}")
    disk_slots = min(DISK_SLOTS, len(disk))
    # A quantized layer on disk is read from its packed copy in the offload directory (one range).
    disk_slot = max((read_bytes(layouts[i].nbytes) if weight_format is not None else staging_bytes(on_disk[i])
                     for i in disk), default=0)
    if disk:
        reason += (f"; {len(disk)} streamed layer(s) read from disk at every step through "
                   f"{disk_slots} host staging slot(s) of {format_bytes(disk_slot)}")
    held = [i for i in streamed if i not in on_disk]
    if held and config.memory.host_memory is not None:
        host_bytes = sum(layouts[i].nbytes for i in held)
        if host_bytes > config.memory.host_memory:
            raise BudgetError(
                f"host_memory={format_bytes(config.memory.host_memory)} cannot hold the {len(held)} streamed "
                f"layers ({format_bytes(host_bytes)}, {host_bytes} bytes); use host_memory >= {host_bytes}"
            )
    return Policy(
        device=str(device),
        weights_device=str(weights_device),
        device_budget=budget,
        resident_layers=tuple(range(resident)),
        streamed_layers=streamed,
        weights_in_place=in_place,
        prefetch_depth=depth,
        ring_slots=slots,
        slot_bytes=slot,
        memory=memory,
        minimum_device_bytes=minimum,
        act_ratio=cache.act_ratio if cache is not None else None,
        block_size=config.cache.block_size,
        reason=reason,
        minibatches=cache.minibatches if cache is not None else 1,
        predicted=predicted,
        weight_format=weight_format,
        disk_layers=disk,
        disk_slots=disk_slots,
        disk_slot_bytes=disk_slot,
        offload_dir=str(offload_dir(config.memory.offload_dir)) if on_disk and weight_format is not None else None,
    )
