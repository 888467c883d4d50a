from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from conftest import capture
from models import prompts, tiny_model
from streaming import weight_bytes

from hscompile.backend import compile_graph
from hscompile.config import HybridServeConfig
from hscompile.ir.schedule import step_info
from hscompile.passes.offload import retarget_graph
from hscompile.passes.verify_schedule import ScheduleError, verify_schedule

PREFETCH = torch.ops.hybridserve.prefetch_weights.default
WAIT = torch.ops.hybridserve.wait_weights.default
RELEASE = torch.ops.hybridserve.release_weights.default


def _planned(family="llama", layers=8, fraction=0.4, depth=1):
    model = tiny_model(family, layers=layers, use_cache=False)
    gm, example_inputs = capture(model, prompts(2, 9))
    config = HybridServeConfig.from_options(
        {"device": "cpu", "lowering": "eager", "device_memory": int(weight_bytes(model) * fraction), "prefetch_depth": depth}
    )
    return compile_graph(gm, example_inputs, config, plan_only=True)


def _ops(schedule, target):
    return [n for n in schedule.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_of_layer_l_plus_depth_comes_before_layer_l_computes(depth):
    compiled = _planned(layers=10, fraction=0.5, depth=depth)
    schedule, streamed = compiled.schedule, compiled.policy.streamed_layers
    assert len(streamed) >= depth + 2
    order = {n: i for i, n in enumerate(schedule.graph.nodes)}
    prefetch_at = {n.args[0]: order[n] for n in _ops(schedule, PREFETCH)}
    attn_in_at = {step_info(n).layer: order[n] for n in schedule.graph.nodes if (i := step_info(n)) and i.kind == "attn_in"}
    first_compute = min(order[n] for n in schedule.graph.nodes if (i := step_info(n)) and i.kind == "pre")
    assert set(prefetch_at) == set(streamed)
    for i, layer in enumerate(streamed):
        if i < depth:
            assert prefetch_at[layer] < first_compute  # issued at the start of the call
        else:
            assert prefetch_at[layer] < attn_in_at[streamed[i - depth]]
    # A wait precedes every use and the verifier agrees.
    report = verify_schedule(schedule, compiled.policy.ring_slots)
    assert report.streamed_groups == tuple(sorted(streamed))
    assert report.checked_uses == 2 * len(streamed)
    assert report.max_in_flight == compiled.policy.ring_slots == depth + 1


def test_partitions_read_streamed_weights_only_from_device_buffers():
    compiled = _planned()
    waits = {n.args[0]: n for n in _ops(compiled.schedule, WAIT)}
    hosts = {h for w in waits.values() for h in w.args[1]}
    for node in compiled.schedule.graph.nodes:
        if node.op == "call_module":
            assert not set(node.all_input_nodes) & hosts


def test_schedule_bytes_per_call_are_the_streamed_layers():
    compiled = _planned()
    moved = sum(n.args[1] for n in _ops(compiled.schedule, PREFETCH))
    assert moved == compiled.schedule_report.weight_bytes_per_call
    assert moved == len(compiled.policy.streamed_layers) * compiled.policy.slot_bytes


# -- the verifier catches broken schedules -------------------------------------------------


def _broken(mutate):
    compiled = _planned()
    schedule = compiled.schedule
    mutate(schedule, compiled.policy)
    schedule.recompile()
    with pytest.raises(ScheduleError) as info:
        verify_schedule(schedule, compiled.policy.ring_slots)
    return str(info.value)


def test_release_that_does_not_wait_for_a_use_is_caught():
    def mutate(schedule, policy):
        release = _ops(schedule, RELEASE)[0]
        release.args = (release.args[0], [])  # no longer depends on the layer's outputs
    assert "does not depend on it" in _broken(mutate)


def test_partition_reading_a_host_weight_is_caught():
    def mutate(schedule, policy):
        wait = _ops(schedule, WAIT)[0]
        view = next(u for u in next(iter(wait.users)).users)
        use = next(iter(view.users))
        use.replace_input_with(view, wait.args[1][0])
    assert "from the host" in _broken(mutate)


def test_overfilling_the_ring_is_caught():
    def mutate(schedule, policy):
        first = _ops(schedule, PREFETCH)[0]
        with schedule.graph.inserting_before(first):
            for layer in policy.streamed_layers[1 : policy.ring_slots + 1]:
                schedule.graph.call_function(PREFETCH, (layer, 1))
    assert "in flight" in _broken(mutate)


def test_wait_without_prefetch_and_double_wait_are_caught():
    def drop_prefetch(schedule, policy):
        schedule.graph.erase_node(_ops(schedule, PREFETCH)[-1])
    assert "released but never prefetched" in _broken(drop_prefetch)

    def double_wait(schedule, policy):
        wait = _ops(schedule, WAIT)[1]
        with schedule.graph.inserting_after(wait):
            schedule.graph.call_function(WAIT, wait.args)
    assert "waited for 2 times" in _broken(double_wait)


def test_release_before_wait_is_caught():
    def mutate(schedule, policy):
        wait, release = _ops(schedule, WAIT)[0], _ops(schedule, RELEASE)[0]
        release.args = (release.args[0], [])
        wait.prepend(release)
    message = _broken(mutate)
    assert "out of order" in message or "does not depend" in message


# -- the ops survive Inductor ---------------------------------------------------------------


class _Recorder:
    """Stands in for a compiled model's runtime and records what the ops asked of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.buffer = torch.arange(64, dtype=torch.float32).view(torch.uint8)

    @property
    def weights(self):
        return self

    def prefetch(self, group):
        self.calls.append(("prefetch", group))

    def wait(self, group):
        self.calls.append(("wait", group))
        return self.buffer

    def release(self, group):
        self.calls.append(("release", group))


@pytest.mark.inductor
def test_inductor_neither_drops_nor_reorders_the_weight_ops():
    from hscompile.ops.context import bind

    def step(x, w):
        torch.ops.hybridserve.prefetch_weights(1, 256)
        flat = torch.ops.hybridserve.wait_weights(0, [w], torch.device("cpu"), 256)
        weight = flat.view(torch.float32).as_strided((4, 4), (4, 1), 0)
        y = x @ weight
        torch.ops.hybridserve.release_weights(0, [y])  # returns nothing, read by no one
        torch.ops.hybridserve.prefetch_weights(2, 256)
        return y * 2

    recorder = _Recorder()
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    with bind(recorder):
        expected = step(x, w)
        eager_calls, recorder.calls = recorder.calls, []
        got = compiled(x, w)
    assert recorder.calls == eager_calls == [("prefetch", 1), ("wait", 0), ("release", 0), ("prefetch", 2)]
    assert torch.equal(got, expected)


def test_ops_outside_a_compiled_model_say_so():
    with pytest.raises(RuntimeError, match="outside a compiled model"):
        torch.ops.hybridserve.prefetch_weights(0, 16)


def test_retarget_rewrites_device_constants_only():
    class M(torch.nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1], device="cpu").to("cpu", torch.float32) + torch.ones(1, device=x.device)

    gm = fx.symbolic_trace(M())
    moved = retarget_graph(gm, torch.device("cpu"), torch.device("meta"))
    out = moved(torch.empty(2, 3, device="meta"))
    assert out.device.type == "meta"
    assert "'cpu'" not in moved.code and "device(type='cpu')" not in moved.code
    assert gm(torch.zeros(2, 3)).device.type == "cpu"  # the original is unchanged
    assert operator is not None
