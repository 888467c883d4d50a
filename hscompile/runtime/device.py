"""Devices the runtime drives: CUDA (streams, events, pinned host memory) and CPU.

Both expose the same operations with the same byte accounting. On CUDA, copies are issued
on a dedicated copy stream and ordered by events, so a copy overlaps compute on the current
stream; on CPU every copy is synchronous and events are no-ops. Everything above this module
is device-agnostic, which is what lets the whole runtime be tested on a machine without a GPU.
With ``HSCOMPILE_ASYNC_SIM`` set (a test tool), the CPU device is a
:class:`~hscompile.runtime.simulated.SimulatedAsyncDevice` instead: the CUDA paths, with CUDA's
copy-stream semantics, on the CPU.

Every wait of the host on the device goes through :meth:`DeviceBackend.fetch` or
:meth:`DeviceBackend.synchronize` and is counted in :attr:`DeviceBackend.host_syncs`, on the
CPU as on CUDA (where the CPU backend does not wait, it counts the same calls), so a test on
either can hold the hot path to its one wait per step.
"""

from __future__ import annotations

from typing import Any

import torch

from .._env import async_sim
from .device_base import DeviceBackend, pinned_bytes
from .simulated import SimulatedAsyncDevice
from .timeline import active_timeline

__all__ = ["CpuDevice", "CudaDevice", "DeviceBackend", "device_backend"]


class CpuDevice(DeviceBackend):
    """Synchronous copies on the CPU, with the same accounting as CUDA."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def is_pinned(self, t: torch.Tensor) -> bool:
        return True  # copies are synchronous: any host memory will do

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                       lane: str = "copy: weights") -> Any:
        timeline = active_timeline()
        if timeline is None:
            dst.copy_(src)
        else:
            with timeline.span(lane, label, bytes=src.numel() * src.element_size()):
                dst.copy_(src)
        return None

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                     lane: str = "copy: cache") -> Any:
        return self.copy_to_device(dst, src, after=after, label=label, lane=lane)


class CudaDevice(DeviceBackend):
    """A copy stream beside the compute stream; pinned host buffers; event ordering."""

    asynchronous = True
    pins_host = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def host_bytes(self, nbytes: int) -> int:
        return pinned_bytes(nbytes)

    def release_host_cache(self) -> None:
        torch._C._host_emptyCache()

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return x.to(self.device)
        # A pageable copy would wait for the compute stream to drain first (cudaMemcpy's staging).
        return (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                       lane: str = "copy: weights") -> Any:
        timeline = active_timeline()
        done = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            record = None if timeline is None else timeline.begin(
                lane, label, stream=self.copy_stream, bytes=src.numel() * src.element_size())
            dst.copy_(src, non_blocking=True)
            done.record(self.copy_stream)
            if record is not None:
                timeline.end(record, stream=self.copy_stream)
        return done

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                     lane: str = "copy: cache") -> Any:
        return self.copy_to_device(dst, src, after=after, label=label, lane=lane)

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.host_syncs += 1
        torch.cuda.synchronize(self.device)

    def host_wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()


def device_backend(device: torch.device) -> DeviceBackend:
    """A new backend for ``device`` (each with its own copy stream): CUDA's, else the CPU's, which is
    the simulated asynchronous device when ``HSCOMPILE_ASYNC_SIM`` names a schedule."""
    if device.type == "cuda":
        return CudaDevice(device)
    schedule = async_sim()
    if schedule is not None and device.type == "cpu":
        return SimulatedAsyncDevice(schedule)
    return CpuDevice()
