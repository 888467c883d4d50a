"""Generation on CUDA under CUDA's own checkers: torch's sync debug mode and the CUDA Sanitizer.

Skipped without CUDA. Models live on the CPU and stream part of their weights (a device budget a
quarter of the weights above the least hscompile accepts), with K/V and ACT cache blocks, so every
copy path runs: weights and cache loads on the copy stream, stores back to pinned host blocks.

* :func:`test_a_generation_step_waits_on_the_device_only_to_fetch_its_logits`: with
  ``torch.cuda.set_sync_debug_mode("error")``, anything that makes the host wait for the device
  (a pageable copy, ``.item()``, ``nonzero``, a stream or device synchronize) raises, except the
  step's one intended wait, the fetch of its logits.
* :func:`test_generation_has_no_data_race_under_the_cuda_sanitizer`: a kernel that reads or writes
  a device tensor another stream may still be using, without an event ordering the two, is what
  the CUDA Sanitizer (CSAN) reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import prompts, tiny_model
from streaming import weight_bytes

import hscompile
from hscompile.errors import BudgetError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_CSAN_INNER = "HSCOMPILE_TEST_CSAN_INNER"
"""Set (to 1) in the subprocess the sanitizer test starts: the only place its inner test runs."""


def _model():
    # The shape of test_generation_cuda.py's models, with more layers to stream.
    return tiny_model("llama", layers=6, hidden=128, heads=4, kv_heads=2)


def _batch():
    # As test_generation_cuda.py's: three rows, the first left-padded.
    ids = prompts(3, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _reference(model, ids, mask, new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


def _streamed_budget(model, ids, mask, options: dict[str, Any], new: int) -> int:
    """A device budget that streams most layers: the least hscompile accepts for this call (what it
    names when it refuses a budget of 1 byte, as tests/fuzzing.py finds it) plus a quarter of the
    weights (about one layer and a half resident beside the ring)."""
    probe = hscompile.Generator(model, {**options, "device_memory": 1})
    try:
        probe.generate(ids, mask, max_new_tokens=new)
    except BudgetError as error:
        found = re.search(r"device_memory >= (\d+)", str(error))
        assert found is not None, f"the refusal names no least budget: {error}"
        return int(found.group(1)) + weight_bytes(model) // 4
    finally:
        del probe
        torch._dynamo.reset()
    raise AssertionError("a device budget of 1 byte was accepted")


# -- sync debug mode -------------------------------------------------------------------------------


def _lift_around_fetch(monkeypatch, backend) -> list[int]:
    """Lift the sync debug mode around each call of ``backend.fetch`` (the step's one intended wait,
    a blocking device-to-host copy that the mode reports like any other synchronization); returns
    the list each fetch appends the mode it lifted to."""
    fetched: list[int] = []
    fetch = backend.fetch

    def lifted(x: torch.Tensor) -> torch.Tensor:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fetch(x)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
            fetched.append(mode)

    monkeypatch.setattr(backend, "fetch", lifted)
    return fetched


def _sync_sites(run: Callable[[], Any]) -> list[str]:
    """Every synchronization ``run()`` makes under sync debug mode "warn" (which reports them all,
    where "error" raises at the first), each as the innermost frames that made it."""
    sites: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")][-4:]
            sites.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def test_a_generation_step_waits_on_the_device_only_to_fetch_its_logits(monkeypatch):
    """A generation of 2 new tokens (the prefill step and one decode step), after a warm-up call
    that compiled both graphs and built the runtime, under ``set_sync_debug_mode("error")``: any
    synchronization of the host with the device raises, and fails the test.

    Limitation, by design: each step's fetch of its logits (``DeviceBackend.fetch``, the one counted
    host wait a step needs) is a blocking device-to-host copy, which the mode reports like any other.
    The mode is lifted around the calls of the generator's backend's ``fetch`` alone, and the test
    counts them: one a step. A wait anywhere else, in the step or in the call around it, raises. The
    mode sees what torch reports (stream and device synchronizes, blocking copies, ``.item()``,
    ``nonzero`` and the like; torch calls the feature a prototype that may miss some), not waits
    outside torch. On failure the message lists every synchronization a run under "warn" made.
    The graph cache is off so that the warm-up call compiles the graphs the measured call runs."""
    new = 2
    model = _model()
    ids, mask = _batch()
    expected = _reference(model, ids, mask, new)
    options: dict[str, Any] = {"device": "cuda", "act_ratio": 0.5, "block_size": 4, "graph_cache": False}
    options["device_memory"] = _streamed_budget(model, ids, mask, options, new)
    generator = hscompile.Generator(model, options)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=new), expected)  # the warm-up
    stats = generator.stats()
    assert stats["streamed_layers"] > 0 and stats["graphs"] == 2, stats
    fetched = _lift_around_fetch(monkeypatch, generator.cache.backend)
    torch.cuda.synchronize()  # nothing of the warm-up left in flight

    sites = _sync_sites(lambda: generator.generate(ids, mask, max_new_tokens=new))
    fetched.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = generator.generate(ids, mask, max_new_tokens=new)
    except RuntimeError as error:
        if "synchronizing" not in str(error):
            raise
        pytest.fail(f"the generation synchronized the host with the device other than to fetch a step's logits: "
                    f"{error}\nevery such synchronization (a run under sync debug mode 'warn'), innermost "
                    "frame first:\n" + "\n".join(sites or ["(none reported under 'warn')"]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not sites, "\n".join(sites)
    assert torch.equal(out, expected)
    # One fetch a step, each made while the mode was "error" (2: lifted from it).
    assert fetched == [2] * new, f"fetches (the sync debug mode each lifted): {fetched}, expected one a step"
    assert generator.stats()["graphs"] == 2  # the measured call compiled nothing


# -- CUDA Sanitizer ----------------------------------------------------------------------------------


def test_generation_has_no_data_race_under_the_cuda_sanitizer():
    """The CUDA Sanitizer (``torch.cuda._sanitizer``, CSAN) watching generation on CUDA, in a
    subprocess (CSAN is process-wide): the inner test below, two calls of the parity module's kind
    (tests/gpu/test_generation_cuda.py: a tiny llama, a left-padded batch, tokens equal to
    transformers'), one streaming weights with K/V and ACT blocks, one in mini-batches with loads
    issued ahead. It must pass, and CSAN must report nothing.

    Why not the parity module run as it is with ``TORCH_CUDA_SANITIZER=1``: CSAN is a
    ``TorchDispatchMode``, and dynamo does not compile frames while one is active (it skips them:
    "non-infra torch dispatch mode present"), so every ``torch.compile`` there would run the model
    eagerly and hscompile would not run at all. The inner test therefore compiles first, without
    CSAN: a first generator captures the graphs with dynamo and saves them, a second (a fresh model
    of the same structure) compiles the saved graphs, which it calls without dynamo; then CSAN is
    enabled for one more call of the second. Lowering is eager: CSAN sees aten kernels, not the
    Triton kernels Inductor would launch. CSAN watches device tensors only: host-side orders (a
    pinned block read before its copy lands) are the simulated device's to check
    (``HSCOMPILE_ASYNC_SIM``)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTEST_ADDOPTS", "TORCH_CUDA_SANITIZER") and not key.startswith("PYTEST_XDIST")}
    env[_CSAN_INNER] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
               "-k", "csan_inner"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                            timeout=400, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    for report in ("CSAN detected", "CUDASanitizerErrors", "data race"):
        assert report not in output, output[-8000:]
    summary = re.search(r"^.*\b2 passed\b.*$", result.stdout, re.MULTILINE)  # both inner cases ran, none skipped
    assert summary is not None and "skipped" not in summary.group(0), output[-4000:]


@pytest.mark.skipif(os.environ.get(_CSAN_INNER) != "1",
                    reason="runs in test_generation_has_no_data_race_under_the_cuda_sanitizer's subprocess")
@pytest.mark.parametrize("case", ["streamed", "minibatched"])
def test_csan_inner_generation_with_saved_graphs(case, fresh_graph_cache):
    import torch.cuda._sanitizer as csan

    new = 4
    model = tiny_model("llama", layers=4, hidden=128, heads=4, kv_heads=2)
    options: dict[str, Any] = {"device": "cuda", "lowering": "eager", "act_ratio": 0.5, "block_size": 4}
    if case == "streamed":
        ids, mask = _batch()
        options["device_memory"] = _streamed_budget(model, ids, mask, options, new)
    else:
        ids = prompts(6, 12)
        mask = torch.ones_like(ids)
        options["mini_batch_size"] = 2
    expected = _reference(model, ids, mask, new)
    assert torch.equal(hscompile.Generator(model, options).generate(ids, mask, max_new_tokens=new), expected)
    torch._dynamo.reset()  # as a new process would be: the saved graphs serve the next generator

    generator = hscompile.Generator(tiny_model("llama", layers=4, hidden=128, heads=4, kv_heads=2), options)
    assert torch.equal(generator.generate(ids, mask, max_new_tokens=new), expected)
    stats = generator.stats()
    assert stats["saved_graphs_used"] == 2, "the saved graphs did not serve the call: under CSAN dynamo would skip it"
    if case == "streamed":
        assert stats["streamed_layers"] > 0, stats
    else:
        assert stats["minibatches"] > stats["cache_steps"] and generator.cache.overlap_loads, stats
    graphs = stats["graphs"]
    torch.cuda.synchronize()

    csan.enable_cuda_sanitizer()
    try:
        assert csan.cuda_sanitizer.enabled
        out = generator.generate(ids, mask, max_new_tokens=new)
        torch.cuda.synchronize()
    finally:
        csan.cuda_sanitizer.disable()
    assert torch.equal(out, expected)
    assert generator.stats()["graphs"] == graphs  # the saved graphs ran: nothing went through dynamo
