from __future__ import annotations

import pytest
import torch

from hscompile.ir.layout import ALIGNMENT, GLOBAL_GROUP, layout_group
from hscompile.ir.plan import WeightRef
from hscompile.ir.policy import DeviceMemoryPlan, Policy
from hscompile.runtime.device import CpuDevice
from hscompile.runtime.weights import WeightRuntime


def _ref(node, shape, dtype=torch.float32):
    numel = 1
    for s in shape:
        numel *= s
    return WeightRef(node, node, node, "parameter", shape, dtype, numel * dtype.itemsize, 0)


def _setup(layers=4, streamed=(1, 2, 3), slots=2, in_place=True):
    torch.manual_seed(0)
    refs = {i: [_ref(f"w{i}_a", (3, 5)), _ref(f"w{i}_b", (7,), torch.bfloat16)] for i in range(layers)}
    refs[GLOBAL_GROUP] = [_ref("g", (4,))]
    weights = {r.node: torch.randn(r.shape).to(r.dtype) for group in refs.values() for r in group}
    layouts = {g: layout_group(g, r) for g, r in refs.items()}
    policy = Policy(
        device="cpu", weights_device="cpu", device_budget=None,
        resident_layers=tuple(i for i in range(layers) if i not in streamed), streamed_layers=tuple(streamed),
        weights_in_place=in_place, prefetch_depth=slots - 1, ring_slots=slots,
        slot_bytes=max(layouts[i].nbytes for i in streamed), memory=DeviceMemoryPlan(0, 0, 0, 0, 0),
        minimum_device_bytes=0, act_ratio=None, block_size=16, reason="test",
    )
    originals = {k: v.clone() for k, v in weights.items()}
    return WeightRuntime(policy, layouts, weights, CpuDevice()), layouts, weights, originals


def _carve(flat, layout):
    return {p.node: flat.view(p.dtype).as_strided(p.shape, p.stride, p.element_offset) for p in layout.weights}


def test_layout_aligns_every_weight_and_mixes_dtypes():
    layout = layout_group(0, [_ref("a", (3, 5)), _ref("b", (7,), torch.bfloat16), _ref("c", (1,))])
    assert [p.offset for p in layout.weights] == [0, ALIGNMENT, 2 * ALIGNMENT]
    assert all(p.offset % ALIGNMENT == 0 for p in layout.weights)
    assert layout.nbytes == 3 * ALIGNMENT and layout.payload_bytes == 60 + 14 + 4


def test_prefetched_layer_arrives_intact_and_host_memory_holds_it_once():
    runtime, layouts, weights, originals = _setup()
    for layer in (1, 2, 3):
        for node in ("a", "b"):
            name = f"w{layer}_{node}"
            assert torch.equal(weights[name], originals[name])  # the model's values are unchanged
            # ... but the model's tensor now lives in the store's packed host buffer
            assert weights[name].untyped_storage().data_ptr() == runtime.host_buffers()[layer - 1].data_ptr()
    runtime.prefetch(1)
    views = _carve(runtime.wait(1), layouts[1])
    assert all(torch.equal(views[k], originals[k]) for k in ("w1_a", "w1_b"))
    runtime.release(1)
    assert runtime.streamed_h2d_bytes == layouts[1].nbytes and runtime.prefetches == 1


def test_ring_refuses_reuse_before_release_and_wait_before_prefetch():
    runtime, _, _, _ = _setup(slots=2)
    runtime.prefetch(1)
    runtime.prefetch(2)
    with pytest.raises(RuntimeError, match="still held by layer 1"):
        runtime.prefetch(3)  # slot 0 again
    runtime.wait(1)
    runtime.release(1)
    runtime.prefetch(3)
    with pytest.raises(RuntimeError, match="not prefetched"):
        runtime.wait(1)
    with pytest.raises(RuntimeError, match="does not hold a slot"):
        runtime.release(1)


def test_a_second_store_for_the_same_weights_reuses_their_packed_buffers():
    runtime, layouts, weights, _ = _setup()
    first = [t.data_ptr() for t in runtime.host_buffers()]
    again = WeightRuntime(
        Policy(device="cpu", weights_device="cpu", device_budget=None, resident_layers=(0,), streamed_layers=(1, 2, 3),
               weights_in_place=True, prefetch_depth=1, ring_slots=2, slot_bytes=layouts[1].nbytes,
               memory=DeviceMemoryPlan(0, 0, 0, 0, 0), minimum_device_bytes=0, act_ratio=None, block_size=16, reason=""),
        layouts, weights, CpuDevice(),
    )
    assert [t.data_ptr() for t in again.host_buffers()] == first


def test_resident_copies_are_made_once_and_counted():
    runtime, layouts, _, originals = _setup(in_place=False)
    assert runtime.setup_h2d_bytes == layouts[GLOBAL_GROUP].nbytes + layouts[0].nbytes
    views = _carve(runtime.wait(0), layouts[0])
    assert torch.equal(views["w0_a"], originals["w0_a"])
    runtime.release(0)  # releasing a resident group is a no-op
    assert runtime.wait(0).data_ptr() == runtime.wait(0).data_ptr()
    ring = 2 * max(layouts[i].nbytes for i in (1, 2, 3))
    assert runtime.device_bytes == layouts[GLOBAL_GROUP].nbytes + layouts[0].nbytes + ring
