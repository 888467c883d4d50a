"""Devices the runtime drives: CUDA (streams, events, pinned host memory) and CPU.

Both expose the same operations with the same byte accounting. On CUDA, copies are issued
on a dedicated copy stream and ordered by events, so a copy overlaps compute on the current
stream; on CPU every copy is synchronous and events are no-ops. Everything above this module
is device-agnostic, which is what lets the whole runtime be tested on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CpuDevice", "CudaDevice", "DeviceBackend", "Timeline", "device_backend"]


@dataclass(slots=True)
class Timeline:
    """Events recorded on the copy and compute streams while a call runs (CUDA only).

    ``spans`` holds ``(stream, label, start_event, end_event)``; :meth:`resolve` turns them into
    milliseconds relative to the first event once the device is synchronised.
    """

    spans: list[tuple[str, str, Any, Any]] = field(default_factory=list)

    def resolve(self) -> list[tuple[str, str, float, float]]:
        if not self.spans:
            return []
        origin = self.spans[0][2]
        return [(s, label, origin.elapsed_time(a), origin.elapsed_time(b)) for s, label, a, b in self.spans]


class DeviceBackend:
    """The operations the runtime needs from a device. See :class:`CpuDevice` and :class:`CudaDevice`."""

    device: torch.device
    timeline: Timeline | None = None

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host ``uint8`` buffer copies can start from (pinned where that makes copies asynchronous)."""
        raise NotImplementedError

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str) -> Any:
        """Copy ``src`` (host) into ``dst`` (device) once ``after`` (an event or None) has happened.

        Returns an event that marks the copy done (None where copies are synchronous).
        """
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """Make subsequent compute wait for ``event``."""

    def record(self) -> Any:
        """An event marking everything issued to the compute stream so far."""
        return None

    def synchronize(self) -> None:
        """Wait for all outstanding work."""

    def mark(self, label: str) -> Any:
        """Start a compute span for the timeline (no-op unless a timeline is attached)."""
        return None

    def end_mark(self, label: str, start: Any) -> None:
        """End a compute span started by :meth:`mark`."""


class CpuDevice(DeviceBackend):
    """Synchronous copies on the CPU, with the same accounting as CUDA."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str) -> Any:
        dst.copy_(src)
        return None


class CudaDevice(DeviceBackend):
    """A copy stream beside the compute stream; pinned host buffers; event ordering."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str) -> Any:
        timing = self.timeline is not None
        start = torch.cuda.Event(enable_timing=timing)
        done = torch.cuda.Event(enable_timing=timing)
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            start.record(self.copy_stream)
            dst.copy_(src, non_blocking=True)
            done.record(self.copy_stream)
        if self.timeline is not None:
            self.timeline.spans.append(("copy", label, start, done))
        return done

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def mark(self, label: str) -> Any:
        if self.timeline is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def end_mark(self, label: str, start: Any) -> None:
        if self.timeline is None or start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self.timeline.spans.append(("compute", label, start, end))


def device_backend(device: torch.device) -> DeviceBackend:
    return CudaDevice(device) if device.type == "cuda" else CpuDevice()
