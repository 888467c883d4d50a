"""The simulated asynchronous device (issue 25): CUDA's copy-stream semantics on the CPU, so a missing
wait or a source overwritten too early shows as NaN or a wrong token on any machine."""

from __future__ import annotations

import pytest
import torch
from models import ragged_prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile import _env
from hscompile.runtime.cache import CacheRuntime
from hscompile.runtime.device import CpuDevice, device_backend
from hscompile.runtime.simulated import SimulatedAsyncDevice

# -- the factory and the variable ---------------------------------------------------------------


def test_the_variable_selects_the_simulator_on_the_cpu_only(monkeypatch):
    monkeypatch.delenv("HSCOMPILE_ASYNC_SIM", raising=False)
    assert type(device_backend(torch.device("cpu"))) is CpuDevice
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "random:7")
    backend = device_backend(torch.device("cpu"))
    assert isinstance(backend, SimulatedAsyncDevice) and backend.asynchronous and not backend.pins_host
    assert backend.async_sim == "random:7" and backend.deferred_copies == 0
    assert device_backend(torch.device("cpu")) is not backend  # each runtime gets its own copy stream
    assert CpuDevice().async_sim is None


@pytest.mark.parametrize("value", ["lat", "random", "random:x", "early:3"])
def test_a_bad_schedule_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", value)
    with pytest.raises(ValueError, match="HSCOMPILE_ASYNC_SIM must be late, early or random:SEED"):
        _env.async_sim()
    with pytest.raises(ValueError, match="schedule must be one of"):
        SimulatedAsyncDevice(value)


# -- the semantics ------------------------------------------------------------------------------


def _pair(n: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, dtype=dtype), torch.zeros(n, dtype=dtype)


def test_under_late_a_destination_is_poisoned_until_compute_waits():
    sim = SimulatedAsyncDevice("late")
    src, dst = _pair()
    done = sim.copy_to_device(dst, src, after=sim.record(), label="x")
    assert dst.isnan().all() and sim.pending == 1
    sim.record()  # neither recording nor fetching completes a copy compute did not wait for
    sim.fetch(torch.ones(1))
    assert dst.isnan().all()
    sim.wait(done)
    assert torch.equal(dst, src) and sim.pending == 0 and sim.deferred_copies == 1


def test_a_copy_reads_its_source_when_it_completes():
    sim = SimulatedAsyncDevice("late")
    src, dst = _pair()
    done = sim.copy_to_host(dst, src, after=None, label="store")
    src.fill_(9.0)  # compute overwrites the source before the copy ran: the race shows
    sim.wait(done)
    assert torch.equal(dst, torch.full((4,), 9.0))


def test_a_stream_runs_in_order_so_waiting_for_a_later_copy_completes_the_earlier_ones():
    sim = SimulatedAsyncDevice("late")
    (a, da), (b, db) = _pair(), _pair(3)
    sim.copy_to_device(da, a, after=None, label="first")
    second = sim.copy_to_device(db, b, after=None, label="second")
    sim.wait(second)
    assert torch.equal(da, a) and torch.equal(db, b)


def test_a_copy_into_an_earlier_copys_source_starts_only_when_that_one_is_done():
    # In stream order the store reads the buffer before the load overwrites it: no race, no poison.
    sim = SimulatedAsyncDevice("late")
    buffer, pool = torch.arange(4.0), torch.zeros(4)
    store = sim.copy_to_host(pool, buffer, after=None, label="store")
    load = sim.copy_to_device(buffer, torch.full((4,), 7.0), after=None, label="load")
    assert torch.equal(buffer, torch.arange(4.0)), "not started while the store still reads it"
    sim.wait(store)
    assert torch.equal(pool, torch.arange(4.0)) and buffer.isnan().all()
    sim.wait(load)
    assert torch.equal(buffer, torch.full((4,), 7.0))


def test_streams_of_two_backends_are_independent_and_synchronize_drains_the_device():
    weights, cache = SimulatedAsyncDevice("late"), SimulatedAsyncDevice("late")
    (a, da), (b, db) = _pair(), _pair()
    weights.copy_to_device(da, a, after=None, label="weights")
    done = cache.copy_to_device(db, b, after=None, label="cache")
    cache.wait(done)
    assert torch.equal(db, b) and da.isnan().all()
    cache.synchronize()  # the whole device, every stream
    assert torch.equal(da, a) and weights.pending == 0


def test_a_copy_issued_after_another_streams_copy_starts_when_that_one_completes():
    weights, cache = SimulatedAsyncDevice("late"), SimulatedAsyncDevice("late")
    (a, da), db = _pair(), torch.zeros(4)
    first = weights.copy_to_device(da, a, after=None, label="first")
    second = cache.copy_to_device(db, da, after=first, label="second")
    assert not db.isnan().any(), "not started: its destination is untouched"
    cache.wait(second)
    assert torch.equal(db, a) and torch.equal(da, a)


def test_host_syncs_are_counted_as_on_the_cpu():
    sim, cpu = SimulatedAsyncDevice("late"), CpuDevice()
    for backend in (sim, cpu):
        backend.fetch(torch.ones(1))
        backend.synchronize()
        backend.wait(backend.record())
    assert sim.host_syncs == cpu.host_syncs == 2


def test_early_completes_every_copy_at_once():
    sim = SimulatedAsyncDevice("early")
    src, dst = _pair()
    sim.copy_to_device(dst, src, after=None, label="x")
    assert torch.equal(dst, src) and sim.pending == 0 and sim.deferred_copies == 0


def test_integer_destinations_are_poisoned_with_every_bit_set_which_floats_read_as_nan():
    sim = SimulatedAsyncDevice("late")
    dst = torch.zeros(8, dtype=torch.uint8)
    sim.copy_to_device(dst, torch.ones(8, dtype=torch.uint8), after=None, label="bytes")
    assert (dst == 0xFF).all()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert dst.view(dtype).isnan().all(), dtype
    signed = torch.zeros(4, dtype=torch.int8)
    sim.copy_to_device(signed, torch.ones(4, dtype=torch.int8), after=None, label="int8")
    assert (signed == -1).all()


def _random_trace(seed: int) -> list[int]:
    """Copies still pending after each of 12 issued."""
    sim = SimulatedAsyncDevice(f"random:{seed}")
    trace = []
    for i in range(12):
        sim.copy_to_device(torch.zeros(2), torch.full((2,), float(i)), after=None, label=f"c{i}")
        sim.record()
        trace.append(sim.pending)
    return trace


def test_random_is_reproducible_per_seed_and_seeds_differ():
    assert _random_trace(3) == _random_trace(3)
    assert len({tuple(_random_trace(seed)) for seed in range(6)}) > 1


def test_host_buffers_are_registered_pinned():
    sim = SimulatedAsyncDevice("late")
    pinned = sim.host_buffer(16)
    assert sim.is_pinned(pinned[4:]) and not sim.is_pinned(torch.empty(16))
    sim.copy_to_device(torch.empty(8, dtype=torch.uint8), pinned[:8], after=None, label="pinned")
    sim.copy_to_device(torch.empty(8, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8), after=None, label="pageable")
    assert sim.copies == 2 and sim.pageable_copies == 1


# -- purpose-made bugs: what the simulator is for -----------------------------------------------


def _layer(backend, weights: torch.Tensor, x: torch.Tensor, *, wait: bool) -> torch.Tensor:
    """One streamed "layer": copy its weights into a device slot, then compute with them."""
    slot = torch.empty_like(weights)
    done = backend.copy_to_device(slot, weights, after=backend.record(), label="weights")
    if wait:
        backend.wait(done)
    return x @ slot


@pytest.mark.parametrize("schedule", ["early", "late"])
def test_a_removed_wait_gives_nan_under_late_and_passes_under_early(schedule):
    weights, x = torch.randn(4, 4), torch.randn(2, 4)
    assert torch.equal(_layer(SimulatedAsyncDevice(schedule), weights, x, wait=True), x @ weights)
    buggy = _layer(SimulatedAsyncDevice(schedule), weights, x, wait=False)
    if schedule == "early":
        assert torch.equal(buggy, x @ weights)  # the CPU device's behaviour hides the bug
    else:
        assert buggy.isnan().all()


@pytest.mark.parametrize("schedule", ["early", "late"])
def test_a_staging_buffer_reused_before_its_copy_ran_stores_the_wrong_values(schedule):
    sim = SimulatedAsyncDevice(schedule)
    staging, pool = torch.empty(2, 4), torch.zeros(4, 4)
    events = []
    for step in range(2):  # each step stages its new rows and stores them, reusing one staging buffer
        staging.copy_(torch.full((2, 4), float(step + 1)))
        events.append(sim.copy_to_host(pool[2 * step:2 * step + 2], staging, after=sim.record(), label=f"store {step}"))
    sim.wait(events[-1])
    rows = pool[:, 0].tolist()
    if schedule == "early":
        assert rows == [1, 1, 2, 2]
    else:
        assert rows == [2, 2, 2, 2], "the first store read the staging buffer after step 2 rewrote it"


def test_a_host_read_of_a_pool_before_its_store_completed_reads_poison():
    sim = SimulatedAsyncDevice("late")
    pool = torch.zeros(4, 2)
    sim.copy_to_host(pool[:2], torch.ones(2, 2), after=sim.record(), label="store")
    grown = torch.cat((pool, torch.zeros(4, 2)))  # the host copies the pool without the store's event
    assert grown[:2].isnan().all()


# -- the runtime under it: greedy tokens equal transformers' ------------------------------------

LAYERS = 4
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def streamed_reference():
    model = tiny_model("llama", layers=LAYERS)
    ids, mask = ragged_prompts()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return model, ids, mask, expected


@pytest.mark.parametrize("schedule", ["late", "random:1", "random:2"])
def test_streamed_minibatched_generation_equals_transformers_under_the_simulator(monkeypatch, streamed_reference,
                                                                                schedule):
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", schedule)
    # Streamed weights, loads issued ahead into two buffers, half the tokens as checkpoints, two mini-batches.
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5,
                                            "mini_batch_size": 2, "device_memory": int(weight_bytes(model) * 0.9),
                                            "prefetch_depth": 1})
    assert generator.cache.backend.async_sim == schedule and generator.cache.overlap_loads
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    stats = generator.stats()
    assert stats["streamed_layers"] > 0 and stats["minibatches"] == 2 * stats["cache_steps"]
    assert stats["host_syncs_per_step"] == 1.0
    runtimes = [c.executor.runtime for c in generator.compiled_graphs if c.executor is not None]
    assert {r.backend.async_sim for r in runtimes} == {schedule}
    deferred = generator.cache.backend.deferred_copies + sum(r.backend.deferred_copies for r in runtimes)
    assert deferred > 0, "copies really were deferred"
    assert stats["async_sim"] == schedule and stats["deferred_copies"] == deferred


def _removed_wait(generator: hscompile.Generator, where: str, monkeypatch) -> None:
    """Make the cache's loads (or the streamed weights) never wait for their copies."""
    if where == "cache loads":
        monkeypatch.setattr(generator.cache.backend, "wait", lambda event: None)
    else:
        for compiled in generator.compiled_graphs:
            if compiled.executor is not None:
                monkeypatch.setattr(compiled.executor.runtime.backend, "wait", lambda event: None)


@pytest.mark.parametrize("where", ["cache loads", "weights"])
@pytest.mark.parametrize("schedule", ["early", "late"])
def test_a_removed_wait_in_the_runtime_gives_wrong_tokens_under_late_only(monkeypatch, streamed_reference, schedule,
                                                                         where):
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", schedule)
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5,
                                            "device_memory": int(weight_bytes(model) * 0.9)})
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=2), expected[:, : ids.shape[1] + 2])  # compiled
    _removed_wait(generator, where, monkeypatch)
    out = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, expected) == (schedule == "early")


@pytest.mark.parametrize("schedule", [None, "late"])
def test_after_a_fault_mid_step_in_transformers_loop_the_next_generate_is_exact(monkeypatch, streamed_reference,
                                                                                schedule):
    # The executor ends the cache's batch when a call raises: before, transformers' loop (which never
    # ends a batch) took the aborted step's plans for the next call's and failed on their shapes.
    model, ids, mask, expected = streamed_reference
    if schedule is not None:
        monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", schedule)
    model = tiny_model("llama", layers=LAYERS)  # a fresh instance: compiling changes it in place
    model.compile(backend="hybridserve", options={"device": "cpu", "lowering": "eager", "act_ratio": 0.5,
                                                  "block_size": 2, "device_memory": int(weight_bytes(model) * 0.9)})

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    assert torch.equal(generate(), expected)
    original, calls = CacheRuntime.attend, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == LAYERS + 2:  # the first decode step's second layer
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheRuntime, "attend", failing)
    with pytest.raises(RuntimeError, match="injected"):
        generate()
    monkeypatch.setattr(CacheRuntime, "attend", original)
    assert torch.equal(generate(), expected)


def test_a_fault_mid_step_leaves_no_cache_copy_in_flight_when_the_staging_is_dropped(monkeypatch,
                                                                                    streamed_reference):
    # A fault after the next layer's load was issued ahead: the staging arena is dropped (on CUDA its
    # memory goes back to the compute stream's allocator), so compute must first wait for that load.
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5,
                                            "device_memory": int(weight_bytes(model) * 0.9)})
    original, calls = CacheRuntime.attend, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == LAYERS + 2:  # the first decode step's second layer: layer 2's load is in flight
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheRuntime, "attend", failing)
    with pytest.raises(RuntimeError, match="injected"):
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert generator.cache.loads.arena is None
    assert generator.cache.backend.pending == 0, "a load still writes the dropped staging arena"
    monkeypatch.setattr(CacheRuntime, "attend", original)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
