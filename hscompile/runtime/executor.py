"""The executor: runs a lowered schedule and keeps its run-time counters."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["Executor"]


class Executor:
    """Runs the lowered schedule GraphModule, the very object ``inspect`` shows.

    Compiled models are inference-only: the schedule runs under ``torch.no_grad()``.
    """

    def __init__(self, schedule: fx.GraphModule) -> None:
        self.schedule = schedule
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        with torch.no_grad():
            out = self.schedule(*args)
        self.calls += 1
        return out

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls}
