"""Tuning from the front: the hardware profile, with hscompile's own per-layer overhead measured
by running the generator (which the planner, below it, may not import)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..planner import hardware
from ..planner.hardware import HardwareProfile
from ..runtime.disk import directory_read_bandwidth
from .generator import Generator

__all__ = ["measure_layer_overhead", "tune"]


def measure_layer_overhead(device: torch.device, repeat: int) -> float:
    """Seconds of hscompile's host work per layer per decode step: the generator on models too
    small to compute anything, 4 layers against 2 (a :data:`~hscompile.planner.hardware.OverheadProbe`)."""
    import transformers

    def step(layers: int) -> float:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        generator = Generator(model, {"device": str(device), "lowering": "eager", "act_ratio": 0.5, "block_size": 4})
        ids = torch.randint(3, 64, (2, 8))
        generator.generate(ids, max_new_tokens=3)
        times = []
        for new in (2, 10):
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                generator.generate(ids, max_new_tokens=new)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        return (times[1] - times[0]) / 8

    small, large = step(2), step(4)
    return max((large - small) / 2, 0.0)


def tune(
    device: str | torch.device | None = None,
    *,
    dtypes: Sequence[str] = ("float32",),
    width: int = 1024,
    force: bool = False,
    quick: bool = False,
    overhead: bool = True,
    disk: str | Path | None = None,
) -> HardwareProfile:
    """:func:`hscompile.planner.hardware.tune`, measuring hscompile's per-layer overhead too unless
    ``overhead=False`` (the probe runs the generator, which the planner may not import), and the
    direct-read rate of the filesystem of ``disk`` (a checkpoint's or an offload directory) when given."""
    if disk is not None and not Path(disk).is_dir():  # before measuring anything
        raise ValueError(f"--disk {disk}: not a directory; name a checkpoint's or an offload directory")
    return hardware.tune(device, dtypes=dtypes, width=width, force=force, quick=quick,
                         overhead=measure_layer_overhead if overhead else None,
                         disk=None if disk is None else (Path(disk), directory_read_bandwidth))
