"""The simulated asynchronous device (issue 25): CUDA's copy-stream semantics on the CPU, so a missing
wait or a source overwritten too early shows as NaN or a wrong token on any machine."""

from __future__ import annotations

import pytest
import torch
from models import ragged_prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile import _env
from hscompile.runtime.blocks import HybridCache
from hscompile.runtime.cache import CacheRuntime
from hscompile.runtime.device import CpuDevice, device_backend
from hscompile.runtime.loads import LoadPipeline, StagingArena
from hscompile.runtime.simulated import AsyncHazard, SimulatedAsyncDevice
from hscompile.runtime.weights import WeightRuntime

# -- the factory and the variable ---------------------------------------------------------------


def test_the_variable_selects_the_simulator_on_the_cpu_only(monkeypatch):
    monkeypatch.delenv("HSCOMPILE_ASYNC_SIM", raising=False)
    assert type(device_backend(torch.device("cpu"))) is CpuDevice
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "random:7")
    backend = device_backend(torch.device("cpu"))
    assert isinstance(backend, SimulatedAsyncDevice) and backend.asynchronous and backend.pins_host
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
    sevens = torch.full((4,), 7.0)
    load = sim.copy_to_device(buffer, sevens, after=None, label="load")
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
    dst, ones = torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)
    sim.copy_to_device(dst, ones, after=None, label="bytes")
    assert (dst == 0xFF).all()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert dst.view(dtype).isnan().all(), dtype
    signed, signed_ones = torch.zeros(4, dtype=torch.int8), torch.ones(4, dtype=torch.int8)
    sim.copy_to_device(signed, signed_ones, after=None, label="int8")
    assert (signed == -1).all()


def _random_trace(seed: int) -> list[int]:
    """Copies still pending after each of 12 issued."""
    sim = SimulatedAsyncDevice(f"random:{seed}")
    trace, buffers = [], []
    for i in range(12):
        buffers.append((torch.zeros(2), torch.full((2,), float(i))))  # alive while their copies may be pending
        sim.copy_to_device(*buffers[-1], after=None, label=f"c{i}")
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
    buffers = [torch.empty(8, dtype=torch.uint8) for _ in range(3)]
    sim.copy_to_device(buffers[0], pinned[:8], after=None, label="pinned")
    sim.copy_to_device(buffers[1], buffers[2], after=None, label="pageable")
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
    pool, ones = torch.zeros(4, 2), torch.ones(2, 2)
    sim.copy_to_host(pool[:2], ones, after=sim.record(), label="store")
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


def _transformers_loop(ids: torch.Tensor, mask: torch.Tensor):
    """transformers' own generate on a fresh model compiled in place (compiling changes it), streamed."""
    model = tiny_model("llama", layers=LAYERS)
    model.compile(backend="hybridserve", options={"device": "cpu", "lowering": "eager", "act_ratio": 0.5,
                                                  "block_size": 2, "device_memory": int(weight_bytes(model) * 0.9)})

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    return generate


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
    if schedule == "early":
        assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
        return
    try:
        out = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    except AsyncHazard as error:  # the simulator saw the access (eager graphs: it sees every one)
        assert "before waiting for it" in str(error) or "was freed while the copy was pending" in str(error)
    else:
        assert not torch.equal(out, expected)


@pytest.mark.parametrize("schedule", [None, "late"])
def test_after_a_fault_mid_step_in_transformers_loop_the_next_generate_is_exact(monkeypatch, streamed_reference,
                                                                                schedule):
    # The executor ends the cache's batch when a call raises: before, transformers' loop (which never
    # ends a batch) took the aborted step's plans for the next call's and failed on their shapes.
    _, ids, mask, expected = streamed_reference
    if schedule is not None:
        monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", schedule)
    generate = _transformers_loop(ids, mask)
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


# -- the allocator: a pending copy holds its buffers weakly -------------------------------------


@pytest.mark.parametrize("dropped", ["destination", "source"])
def test_a_buffer_freed_while_its_copy_is_pending_is_an_error_naming_the_copy(dropped):
    sim = SimulatedAsyncDevice("late")
    buffers = {"source": torch.arange(4.0), "destination": torch.zeros(4)}
    done = sim.copy_to_device(buffers["destination"], buffers["source"], after=None, label="L3 kv mb0")
    del buffers[dropped]  # the last reference: on CUDA the allocator may hand the memory out again
    with pytest.raises(AsyncHazard, match=f"the {dropped} of the copy 'L3 kv mb0' was freed while the copy was pending"):
        sim.wait(done)
    sim.wait(done)  # reported once; the copy is done, having written nothing


def test_a_copy_may_touch_fresh_device_memory_only_after_an_event_recorded_since():
    sim, source = SimulatedAsyncDevice("late"), torch.ones(16, dtype=torch.uint8)
    fresh = sim.device_buffer(16)
    with pytest.raises(AsyncHazard, match="'resident 3' uses device memory compute allocated or used after"):
        sim.copy_to_device(fresh, source, after=None, label="resident 3")
    sim.copy_to_device(fresh, source, after=sim.record(), label="resident 3")


def test_a_copy_into_a_buffer_compute_used_after_the_last_event_is_an_error():
    sim = SimulatedAsyncDevice("late")
    weights, slot = torch.randn(4, 4), sim.device_buffer(64).view(torch.float32).view(4, 4)
    freed = sim.record()
    with sim.tracking():
        (torch.ones(2, 4, device="cpu") @ slot).sum()  # compute reads the slot after its "free" event
    with pytest.raises(AsyncHazard, match="'weights L1' uses device memory"):
        sim.copy_to_device(slot, weights, after=freed, label="weights L1")
    sim.copy_to_device(slot, weights, after=sim.record(), label="weights L1")


# -- accesses the tracking sees ----------------------------------------------------------------


def test_compute_reading_a_copys_destination_before_waiting_is_an_error():
    sim = SimulatedAsyncDevice("late")
    source, slot = torch.randn(4, 4), torch.empty(4, 4, device="cpu")
    done = sim.copy_to_device(slot, source, after=sim.record(), label="weights L0")
    with sim.tracking(), pytest.raises(AsyncHazard, match="the destination of the copy 'weights L0' before waiting"):
        torch.ones(2, 4, device="cpu") @ slot
    sim.wait(done)
    with sim.tracking():
        assert torch.equal(torch.ones(2, 4, device="cpu") @ slot, torch.ones(2, 4) @ source)


def test_compute_overwriting_a_pending_copys_source_is_an_error():
    sim = SimulatedAsyncDevice("late")
    staging, pool = torch.arange(4.0, device="cpu"), sim.host_tensor((4,), torch.float32)
    sim.copy_to_host(pool, staging, after=sim.record(), label="L0 store kv")
    with sim.tracking(), pytest.raises(AsyncHazard, match="overwrites the source of the copy 'L0 store kv'"):
        staging.mul_(2)


def test_the_host_reads_a_stores_pool_only_after_a_host_wait_covered_the_store():
    sim = SimulatedAsyncDevice("late")
    staging, pool = torch.arange(4.0, device="cpu"), sim.host_tensor((4,), torch.float32)
    done = sim.copy_to_host(pool, staging, after=sim.record(), label="L0 store act")
    sim.wait(done)  # compute waited: the copy is done on the device, the host does not know it yet
    with sim.tracking(), pytest.raises(AsyncHazard, match="the host buffer the copy 'L0 store act' wrote before"):
        pool.clone()
    sim.fetch(torch.ones(1, device="cpu"))  # the host waits for compute, which waited for the store
    with sim.tracking():
        assert torch.equal(pool.clone(), torch.arange(4.0))


def test_host_syncs_inside_a_tracked_step_are_counted_and_named():
    sim = SimulatedAsyncDevice("late")
    host, pinned = torch.arange(3), sim.host_tensor((3,), torch.long)
    with sim.tracking(host):
        device = sim.upload(host)  # on CUDA pinned and non-blocking: no wait
        made = torch.empty(3, dtype=torch.long, device="cpu")  # a device allocation: no wait
        assert sim.host_syncs == 0
        host.sum().item()  # host values: no wait
        pinned.to("cpu", non_blocking=True)  # from pinned memory, non-blocking: no wait
        assert sim.host_syncs == 0 and not sim.sync_sites
        device.sum().item()
        torch.tensor([1, 2], device="cpu")
        host.to("cpu")  # pageable to the device: waits
        device.cpu()
        device + host  # an implicit copy (or a device mismatch) on CUDA
        made.nonzero()
    assert sim.host_syncs == 6
    sites = list(sim.sync_sites)
    assert all("test_async_sim.py:" in site for site in sites), sites
    assert [site.split(" at ")[0] for site in sites] == [
        "Tensor.item", "torch.tensor(device=...)", "Tensor.to of a host tensor to the device (pageable or blocking)",
        "Tensor.cpu of a device tensor", "add of host and device tensors", "Tensor.nonzero"]
    with sim.tracking(), pytest.raises(AsyncHazard, match="a non-blocking copy into pageable host memory"):
        torch.empty(3, dtype=torch.long).copy_(device, non_blocking=True)


def test_pinned_allocations_are_accounted_rounded_up_to_a_power_of_two():
    sim = SimulatedAsyncDevice("late")
    assert [sim.host_bytes(n) for n in (0, 1, 4096, 4097, 3 * 2**20)] == [0, 1, 4096, 8192, 4 * 2**20]
    assert CpuDevice().host_bytes(4097) == 4097


# -- the runtime's hazards (issue 25): each fix, taken back, fails here ---------------------------


def _streamed(model, **options):
    return hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4, "act_ratio": 0.5,
                                       "device_memory": int(weight_bytes(model) * 0.9), **options})


def _fail_at_attend(monkeypatch, call: int) -> None:
    original, calls = CacheRuntime.attend, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheRuntime, "attend", failing)


def test_hazard_1_a_fault_that_drops_the_staging_with_a_load_in_flight_is_caught(monkeypatch, streamed_reference):
    # The fix: LoadPipeline.clear waits for the loads issued ahead before the arena is dropped.
    model, ids, mask, _ = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model)
    monkeypatch.setattr(LoadPipeline, "clear", lambda self: self._pending.clear())  # as it was
    _fail_at_attend(monkeypatch, LAYERS + 2)  # the first decode step's second layer: layer 2's load is in flight
    with pytest.raises(AsyncHazard, match=r"of the copy 'L2 .*' was freed while the copy was pending"):
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)


def test_hazard_1_a_weight_slot_held_by_a_failed_call_is_rewritten_only_after_an_event(monkeypatch,
                                                                                      streamed_reference):
    # The fix: WeightRuntime.reset records an event for the slots a failed call still held.
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model)
    _fail_at_attend(monkeypatch, LAYERS + 2)
    with pytest.raises(RuntimeError, match="injected"):
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    monkeypatch.setattr(CacheRuntime, "attend", _ATTEND)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)

    def old_reset(self):
        for slot in self._slots:
            slot.occupant = None

    monkeypatch.setattr(WeightRuntime, "reset", old_reset)
    _fail_at_attend(monkeypatch, LAYERS + 2)
    with pytest.raises(RuntimeError, match="injected"):
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    monkeypatch.setattr(CacheRuntime, "attend", _ATTEND)
    with pytest.raises(AsyncHazard, match=r"'weights L.*' uses device memory compute allocated or used after"):
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)


_ATTEND = CacheRuntime.attend


def test_hazard_2_a_checkpoint_buffer_that_grows_is_loaded_only_after_an_event(monkeypatch, streamed_reference):
    # The fix: LoadPipeline.prepare records the buffers' event whenever one was allocated, not only
    # when the K/V buffers were zeroed (the checkpoint buffer grows alone as checkpoints accumulate).
    model, ids, mask, _ = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model, block_size=2)
    original = StagingArena.fit

    def old_fit(self, rows, columns, act_tokens):
        _, zeroed = original(self, rows, columns, act_tokens)
        return zeroed > 0, zeroed

    monkeypatch.setattr(StagingArena, "fit", old_fit)
    with pytest.raises(AsyncHazard, match="'L0 act mb0' uses device memory compute allocated or used after"):
        generator.generate(ids, mask, max_new_tokens=8)


@pytest.mark.parametrize("label", ["resident", "weights"])
def test_hazard_2_weight_buffers_are_first_written_after_an_event_since_their_allocation(monkeypatch,
                                                                                       streamed_reference, label):
    # The fix: resident copies and each slot's first prefetch wait for an event recorded after the
    # buffers were allocated. Taken back: the copy is issued after nothing.
    model, ids, mask, _ = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    original = SimulatedAsyncDevice.copy_to_device

    def without_event(self, dst, src, *, after, label, lane="copy: weights"):
        return original(self, dst, src, after=None if label.startswith(drop) else after, label=label, lane=lane)

    drop = label
    monkeypatch.setattr(SimulatedAsyncDevice, "copy_to_device", without_event)
    # (raised while dynamo compiles the first graph, which wraps it)
    with pytest.raises((AsyncHazard, torch._dynamo.exc.BackendCompilerFailed),
                       match=f"'{label} .*' uses device memory compute allocated"):
        _streamed(model).generate(ids, mask, max_new_tokens=2)  # global weights and a layer resident, 3 streamed


def _backends(generator: hscompile.Generator) -> list[SimulatedAsyncDevice]:
    return [generator.cache.backend] + [c.executor.runtime.backend for c in generator.compiled_graphs
                                        if c.executor is not None]


def test_hazard_3_a_step_waits_on_the_host_once_and_every_other_wait_is_counted(monkeypatch, streamed_reference):
    # The fix: the plan's and the mini-batches' indices go up in one non-blocking copy each
    # (DeviceBackend.upload), and the graph's outputs come back with the driver's fetch.
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model, mini_batch_size=2)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert generator.stats()["host_syncs_per_step"] == 1.0
    assert not any(b.sync_sites for b in _backends(generator))
    # Taken back: a pageable copy of each index tensor, as torch.tensor(values, device=...) made them.
    monkeypatch.setattr(SimulatedAsyncDevice, "upload",
                        lambda self, x: torch.tensor(x.tolist(), dtype=x.dtype, device=self.device))
    before = generator.stats()["host_syncs"]
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    stats = generator.stats()
    assert stats["host_syncs"] - before > NEW_TOKENS
    sites = [site for b in _backends(generator) for site in b.sync_sites]
    assert sites and all(site.startswith("torch.tensor(device=...)") for site in sites), sites


def test_hazard_4_a_pool_that_grows_under_transformers_loop_waits_for_its_stores(monkeypatch, streamed_reference):
    # The fix: HybridCache.extend settles (a counted synchronize) before the host copies a pool into a
    # larger one; the stores of the last step were only waited for by compute.
    _, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generate = _transformers_loop(ids, mask)
    assert torch.equal(generate(), expected)
    original = HybridCache.extend
    monkeypatch.setattr(HybridCache, "extend", lambda self, seq, tokens, *, limit_bytes=None, settle=None:
                        original(self, seq, tokens, limit_bytes=limit_bytes))
    with pytest.raises(AsyncHazard, match=r"the host buffer the copy 'L.* store .*' wrote before a host wait"):
        generate()


def test_hazard_5_a_store_reads_memory_of_its_own_never_the_attention_buffer(monkeypatch, streamed_reference):
    # The fix: the new tokens' K/V, appended to the attention buffer, are stored from a copy.
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model, act_ratio=0.0)
    sources, original = [], CacheRuntime._store

    def store(self, pool, packed, *args):
        arena = self.loads.arena
        buffers = {t.untyped_storage().data_ptr() for t in arena.kv} if arena is not None else set()
        sources.append(packed.untyped_storage().data_ptr() in buffers)
        return original(self, pool, packed, *args)

    monkeypatch.setattr(CacheRuntime, "_store", store)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected)
    assert sources and not any(sources)


# -- every schedule: the same tokens and the same counters ---------------------------------------

COUNTERS = ("host_syncs", "host_syncs_per_step", "cache_h2d_bytes", "cache_d2h_bytes", "weight_h2d_bytes",
            "h2d_bytes", "load_runs", "minibatches", "prefetches", "kv_tokens", "act_tokens", "recomputed_tokens")


def test_twenty_random_schedules_give_transformers_tokens_and_the_same_counters(monkeypatch, streamed_reference):
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model, mini_batch_size=2)
    generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)  # compiles: its setup copies are not a call's
    counters = []
    for schedule in ["late", "early", *(f"random:{seed}" for seed in range(20))]:
        for backend in _backends(generator):
            backend.reschedule(schedule)
        before = generator.stats()
        assert torch.equal(generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), expected), schedule
        after = generator.stats()
        counters.append({k: after[k] - before.get(k, 0) if k != "host_syncs_per_step" else after[k] for k in COUNTERS})
        assert not any(b.sync_sites for b in _backends(generator)), schedule
    assert [c for c in counters if c != counters[0]] == [], counters[0]


def test_hazard_6_pools_of_a_new_size_give_the_pinned_cache_back(monkeypatch, streamed_reference):
    # The fix: the pinned allocator keeps freed blocks by size class; a batch whose pools round to
    # another size empties its cache, one of the same size reuses the block.
    model, ids, mask, expected = streamed_reference
    monkeypatch.setenv("HSCOMPILE_ASYNC_SIM", "late")
    generator = _streamed(model)
    backend = generator.cache.backend
    generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert backend.host_cache_releases == 0
    assert torch.equal(generator.generate(ids[:1], mask[:1], max_new_tokens=NEW_TOKENS), expected[:1])
    assert backend.host_cache_releases == 1
