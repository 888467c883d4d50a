"""Which compiled model's runtime the ``torch.ops.hybridserve.*`` kernels act on.

The executor binds its runtime around each call of the schedule; the op kernels look it up
here. A ``ContextVar`` (not a global) so that two compiled models running in different
threads or tasks each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .executor import Runtime

__all__ = ["active_runtime", "bind"]

_ACTIVE: ContextVar[Runtime | None] = ContextVar("hscompile_runtime", default=None)


def active_runtime(op: str) -> Runtime:
    """The runtime bound by the executor that is running; ``op`` names the caller for the error."""
    runtime = _ACTIVE.get()
    if runtime is None:
        raise RuntimeError(
            f"torch.ops.hybridserve.{op} ran outside a compiled model: these ops act on the runtime of the "
            "hybridserve-compiled model that is executing, and only its executor binds one"
        )
    return runtime


@contextmanager
def bind(runtime: Runtime) -> Iterator[None]:
    """Make ``runtime`` the one hybridserve ops act on, for the duration of the block."""
    token = _ACTIVE.set(runtime)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
