"""Which compiled model's runtime the ``torch.ops.hybridserve.*`` kernels act on, and what they
need of it (Protocols, so that neither the ops nor the passes import the runtime).

The executor binds its runtime around each call of the schedule; the op kernels look it up
here. A ``ContextVar`` (not a global) so that two compiled models running in different
threads or tasks each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch

__all__ = ["CacheOps", "KVRecompute", "OpRuntime", "WeightOps", "active_runtime", "bind"]


class WeightOps(Protocol):
    """What the weight ops call: the slot ring of :class:`~hscompile.runtime.weights.WeightRuntime`."""

    def prefetch(self, group: int) -> None: ...

    def wait(self, group: int) -> torch.Tensor: ...

    def release(self, group: int) -> None: ...


class CacheOps(Protocol):
    """What the cache ops call: :class:`~hscompile.runtime.cache.CacheRuntime`'s steps."""

    def load_kv(self, layer: int) -> Any: ...

    def load_act(self, layer: int) -> Any: ...

    def recompute(self, layer: int, act: Any, weights: Any, rotary_weights: Any) -> Any: ...

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_kv: Any,
               recomputed_kv: Any, attn_mask: Any, scale: Any, is_causal: bool) -> torch.Tensor: ...

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, hidden: Any, positions: Any) -> None: ...

    def step_begin(self, hidden: torch.Tensor, past: Any) -> None: ...

    def end_step(self) -> None: ...


class KVRecompute(Protocol):
    """A K/V recompute program (:class:`hscompile.passes.recompute_program.RecomputeProgram` is one):
    K/V of checkpointed tokens of one layer, from their checkpoints, at their positions."""

    @property
    def tokens_per_call(self) -> int | None:
        """The most tokens one call takes (None: any number)."""
        ...

    def __call__(self, layer: int, act: torch.Tensor, weights: Sequence[torch.Tensor],
                 rotary_weights: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor: ...


class OpRuntime(Protocol):
    """What ``torch.ops.hybridserve.*`` need of the runtime they act on (the executor's
    :class:`~hscompile.runtime.executor.Runtime` is one). A Protocol, so that ``ops`` never
    imports the executor: the executor imports the ops (through the cache), not the other way."""

    weights: WeightOps
    cache: CacheOps | None
    """Set in generation graphs: the only graphs whose schedules hold the cache ops."""

    def copy_in(self, x: torch.Tensor, device: torch.device) -> torch.Tensor: ...

    def copy_out(self, x: torch.Tensor, device: torch.device) -> torch.Tensor: ...


_ACTIVE: ContextVar[OpRuntime | None] = ContextVar("hscompile_runtime", default=None)


def active_runtime(op: str) -> OpRuntime:
    """The runtime bound by the executor that is running; ``op`` names the caller for the error."""
    runtime = _ACTIVE.get()
    if runtime is None:
        raise RuntimeError(
            f"torch.ops.hybridserve.{op} ran outside a compiled model: these ops act on the runtime of the "
            "hybridserve-compiled model that is executing, and only its executor binds one"
        )
    return runtime


@contextmanager
def bind(runtime: OpRuntime) -> Iterator[None]:
    """Make ``runtime`` the one hybridserve ops act on, for the duration of the block."""
    token = _ACTIVE.set(runtime)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
