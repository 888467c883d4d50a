"""What the runtime needs from a device: :class:`DeviceBackend`, the base of the CUDA, CPU and
simulated asynchronous devices (:mod:`~hscompile.runtime.device`, :mod:`~hscompile.runtime.simulated`).
Its own module so that the simulator and the factory that picks it import it without a circle."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..ir.cache import pinned_bytes

__all__ = ["DeviceBackend", "pinned_bytes"]


class DeviceBackend:
    """The operations the runtime needs from a device. See :class:`~hscompile.runtime.device.CpuDevice`,
    :class:`~hscompile.runtime.device.CudaDevice` and :class:`~hscompile.runtime.simulated.SimulatedAsyncDevice`."""

    device: torch.device
    asynchronous: bool = False
    """Whether copies run beside the compute (then their buffers must live until their event)."""
    pins_host: bool = False
    """Whether host memory copies start from is allocated pinned (``pin_memory=True``: CUDA only)."""
    async_sim: str | None = None
    """The schedule of a simulated asynchronous device (``HSCOMPILE_ASYNC_SIM``); None on a real one."""
    deferred_copies: int = 0
    """Copies a simulated device completed after the call that issued them (0 on a real device)."""
    host_syncs: int = 0
    """Waits of the host on the device so far (:meth:`fetch`, :meth:`synchronize`)."""
    host_threads: bool = True
    """Whether another host thread may wait for this backend's events (:meth:`host_wait`): the disk
    tier's reader does. False on the simulated device, whose state one thread owns."""

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the host, once the device has computed it: the one counted host wait a step needs.
        """
        self.host_syncs += 1
        return x.cpu()

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (host) on the device, in order with the compute stream, without the host waiting."""
        return x.to(self.device)

    def host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor copies can start from or land in (pinned where copies are asynchronous)."""
        return torch.empty(shape, dtype=dtype)

    def is_pinned(self, t: torch.Tensor) -> bool:
        """Whether copies may start from ``t`` as it is (on CUDA: pinned memory)."""
        return t.is_pinned()

    def host_bytes(self, nbytes: int) -> int:
        """The host memory an allocation of ``nbytes`` by :meth:`host_tensor` really takes (the pinned
        allocator rounds it up)."""
        return nbytes

    def release_host_cache(self) -> None:
        """Free the host allocator's cached, unused blocks (pinned memory, on CUDA)."""

    def tracking(self, *host: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """A step's torch calls (on the simulated device: checked; ``host`` names the caller's host tensors)."""
        return contextlib.nullcontext()

    def untracked(self) -> contextlib.AbstractContextManager[None]:
        """A block inside :meth:`tracking` that must not be watched (dynamo traces there)."""
        return contextlib.nullcontext()

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                     lane: str = "copy: cache") -> Any:
        """Copy ``src`` (device) into ``dst`` (host, pinned where copies are asynchronous) once
        ``after`` (an event or None) has happened; returns an event marking it done (None where
        copies are synchronous). The host must not read ``dst`` before that event."""
        raise NotImplementedError

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host ``uint8`` buffer copies can start from (pinned where that makes copies asynchronous)."""
        return self.host_tensor((nbytes,), torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy_to_device(self, dst: torch.Tensor, src: torch.Tensor, *, after: Any, label: str,
                       lane: str = "copy: weights") -> Any:
        """Copy ``src`` (host) into ``dst`` (device) once ``after`` (an event or None) has happened.

        Returns an event that marks the copy done (None where copies are synchronous). ``label``
        and ``lane`` name the copy on a timeline being recorded.
        """
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """Make subsequent compute wait for ``event``."""

    def record(self) -> Any:
        """An event marking everything issued to the compute stream so far."""
        return None

    def synchronize(self) -> None:
        """Wait for all outstanding work."""
        self.host_syncs += 1

    def host_wait(self, event: Any) -> None:
        """Block the calling host thread until ``event`` (a copy's, or None) has happened. Not a
        wait of the step: the disk tier's reader thread calls it before it reuses a staging slot."""

    def check_host_write(self, t: torch.Tensor, *, what: str) -> None:
        """The host is about to write ``t`` outside torch (a disk read into it): on the simulated
        device, an error when a copy that has not run yet still reads it."""
