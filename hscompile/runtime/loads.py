"""Cache loads: a layer's past tokens copied from the host pools to the device, pipelined.

:class:`LoadPipeline` gathers a mini-batch's past tokens of one layer on the host and starts
their copy; when loads overlap compute (CUDA), taking one load issues the next one in run order
(this layer's next mini-batch, else the next layer's first) so it travels while this one
computes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .blocks import HybridCache
from .device import DeviceBackend, device_backend
from .step_plan import StepPlan

__all__ = ["LoadPipeline"]


class _Counted(Protocol):
    cache_h2d_bytes: int


class LoadPipeline:
    """Issues and hands out the cache loads of one step (see the module docstring)."""

    def __init__(self, device: torch.device, counters: _Counted, overlap: bool | None = None) -> None:
        self.device = device
        self.counters = counters
        self.overlap = overlap
        """Issue the next load before this one computes. Default (None): on CUDA, where loads run
        on a copy stream beside the compute; on the CPU they would only hold memory longer."""
        self._pending: dict[tuple[str, int, int], tuple[torch.Tensor, Any, torch.Tensor]] = {}
        self._backend: DeviceBackend | None = None

    @property
    def overlapping(self) -> bool:
        return self.device.type == "cuda" if self.overlap is None else self.overlap

    def clear(self) -> None:
        """Forget loads in flight (the step ended or was abandoned)."""
        self._pending.clear()

    def _issue(self, cache: HybridCache, plans: list[StepPlan], kind: str, layer: int,
               index: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Gather mini-batch ``index``'s past tokens of ``layer`` on the host and start their copy."""
        plan = plans[index]
        pool = (cache.kv if kind == "kv" else cache.act)[layer]
        slots = plan.kv_slots if kind == "kv" else plan.act_slots
        if self._backend is None:
            self._backend = device_backend(self.device)
        host = torch.empty((slots.numel(), *pool.shape[1:]), dtype=pool.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(pool, 0, slots, out=host)
        self.counters.cache_h2d_bytes += host.numel() * host.element_size()
        if self.device.type == "cpu":
            return host, None, host
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        done = self._backend.copy_to_device(out, host, after=None, label=f"L{layer} {kind} mb{index}",
                                            lane="copy: cache")
        return out, done, host  # the host buffer lives until the copy is done

    def load(self, cache: HybridCache, plans: list[StepPlan], kind: str, layer: int, index: int) -> torch.Tensor:
        """Mini-batch ``index``'s past ``kind`` tokens of ``layer`` on the device."""
        pending = self._pending.pop((kind, layer, index), None)
        out, done, _ = pending if pending is not None else self._issue(cache, plans, kind, layer, index)
        if done is not None:
            assert self._backend is not None
            self._backend.wait(done)
        if self.overlapping:
            following = (layer, index + 1) if index + 1 < len(plans) else (layer + 1, 0)
            if following[0] < cache.spec.num_layers and (kind, *following) not in self._pending:
                self._pending[(kind, *following)] = self._issue(cache, plans, kind, *following)
        return out
