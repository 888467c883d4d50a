"""Placement keeps a prefix of the layers resident and streams the rest through a slot ring, the
largest prefix whose device plan fits the budget; below the minimum it names the budget that
would work."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import capture
from models import prompts, tiny_model

from hscompile.config import HybridServeConfig
from hscompile.errors import BudgetError, ConfigError
from hscompile.ir.layout import group_layouts
from hscompile.passes.analyze import analyze
from hscompile.passes.estimate_activations import estimate_activations
from hscompile.passes.place import place

LAYERS = 6


@pytest.fixture(scope="module")
def captured():
    torch._dynamo.reset()
    gm, example_inputs = capture(tiny_model("llama", layers=LAYERS), prompts(2, 9))
    plan = analyze(gm)
    return plan, estimate_activations(gm, plan), example_inputs


def _place(captured, **options):
    plan, activations, example_inputs = captured
    config = HybridServeConfig.from_options({"device": "cpu", "lowering": "eager", **options})
    return place(plan, activations, example_inputs, config)


def test_without_a_budget_every_layer_is_resident_and_nothing_streams(captured):
    policy = _place(captured)
    assert policy.resident_layers == tuple(range(LAYERS))
    assert policy.streamed_layers == () and policy.ring_slots == 0
    assert policy.device_budget is None
    assert policy.memory.ring == 0 and policy.memory.activations == captured[1].hint


@pytest.mark.parametrize("depth", [1, 2])
def test_resident_layers_are_the_largest_prefix_that_fits(captured, depth):
    everything = _place(captured).memory.total
    minimum = _place(captured, device_memory=everything - 1, prefetch_depth=depth).minimum_device_bytes
    seen: list[tuple[int, int]] = []
    totals: dict[int, int] = {}
    for budget in range(minimum, everything + 1, max(1, (everything - minimum) // 24)):
        policy = _place(captured, device_memory=budget, prefetch_depth=depth)
        resident, streamed = policy.resident_layers, policy.streamed_layers
        assert resident == tuple(range(len(resident))) and streamed == tuple(range(len(resident), LAYERS))
        assert policy.memory.total <= budget
        assert policy.ring_slots == min(depth + 1, len(streamed))
        seen.append((budget, len(resident)))
        totals[len(resident)] = policy.memory.total
    counts = [r for _, r in seen]
    assert counts == sorted(counts)  # more budget never keeps fewer layers
    assert counts[0] == 0 and len(set(counts)) >= 3
    # Largest: keeping one more layer resident would not have fit the budget.
    for budget, resident in seen:
        if resident + 1 in totals:
            assert totals[resident + 1] > budget


def test_streamed_layers_share_slots_of_the_largest_streamed_layer(captured):
    plan = captured[0]
    everything = _place(captured).memory.total
    policy = _place(captured, device_memory=everything - 1)
    layouts = group_layouts(plan, None)
    assert policy.streamed_layers
    assert policy.slot_bytes == max(layouts[i].nbytes for i in policy.streamed_layers)
    assert policy.memory.ring == policy.ring_slots * policy.slot_bytes


def test_below_the_minimum_the_error_names_the_budget_that_works(captured):
    minimum = _place(captured, device_memory=_place(captured).memory.total - 1).minimum_device_bytes
    with pytest.raises(BudgetError) as error:
        _place(captured, device_memory=minimum - 1)
    assert f"device_memory >= {minimum}" in str(error.value)
    fits = _place(captured, device_memory=minimum)
    assert fits.resident_layers == () and fits.memory.total == minimum


def test_a_host_memory_too_small_for_the_streamed_layers_is_refused(captured):
    streaming = _place(captured, device_memory=_place(captured).memory.total - 1)
    streamed_bytes = len(streaming.streamed_layers) * streaming.slot_bytes
    with pytest.raises(BudgetError, match=re.escape(f"host_memory >= {streamed_bytes}")):
        _place(captured, device_memory=streaming.memory.total, host_memory=streamed_bytes - 1)
    assert _place(captured, device_memory=streaming.memory.total, host_memory=streamed_bytes).streamed_layers


def test_quantized_layers_are_never_used_in_place_and_stream_smaller(captured):
    plain = _place(captured, device_memory=_place(captured).memory.total - 1)
    quantized = _place(captured, device_memory=plain.memory.total, weight_quant="int8")
    assert plain.weights_in_place and not quantized.weights_in_place
    assert quantized.weight_format is not None and plain.weight_format is None
    # Packed int8 layers are smaller, so the same budget keeps more of them resident.
    assert len(quantized.resident_layers) >= len(plain.resident_layers)
    assert quantized.minimum_device_bytes < plain.minimum_device_bytes
    assert quantized.memory.dequantized > 0 == plain.memory.dequantized


def test_weights_spread_over_devices_are_refused(captured):
    plan, activations, example_inputs = captured
    inputs = list(example_inputs)
    weight = plan.layers[0].weights[0].input_index
    inputs[weight] = inputs[weight].to("meta")
    config = HybridServeConfig.from_options({"device": "cpu", "lowering": "eager"})
    with pytest.raises(ConfigError, match="several devices"):
        place(plan, activations, inputs, config)


def test_meta_weights_can_be_planned_but_not_used_in_place(captured):
    plan, activations, example_inputs = captured
    inputs = [x.to("meta") if i in {w.input_index for w in plan.weights} else x for i, x in enumerate(example_inputs)]
    config = HybridServeConfig.from_options({"device": "cpu", "lowering": "eager",
                                             "device_memory": _place(captured).memory.total - 1})
    policy = place(plan, activations, inputs, config)
    assert policy.weights_device == "meta" and not policy.weights_in_place
    assert policy.streamed_layers
