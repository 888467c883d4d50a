"""Hardware profiles: what a device can do, as the cost model needs it.

:func:`tune` measures the device (or loads the profile cached for it) and :func:`load_profile`
reads a profile file, which may describe a machine nobody measured here (the ``profiles/``
directory of the package holds datasheet-derived ones for an A100-40GB on PCIe 4 and an H100 on
PCIe 5). Cached profiles live in :func:`hscompile._env.cache_dir`, one file per device name and
torch version; a file that does not parse, fails validation or describes another device or
torch is measured again, never trusted.

What is measured:

* **link**: host-to-device and device-to-host copy rates from pinned memory (the CPU has no
  pinned memory and no link: the rates are ``memcpy``'s);
* **device memory**: a device-to-device copy, counting bytes read and written;
* **matmul**: GEMMs at the model's width for growing row counts, fitted to
  ``rate(m) = peak * m / (m + half_rows)``, and the rate at which a one-row GEMM reads a weight
  too big for cache (decode's bound; a copy's bandwidth can be several times higher);
* **attention**: causal SDPA at one prefill-like shape;
* **per-call overhead**: the time of a trivial operator call (Python dispatch plus launch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import _env
from ..errors import ConfigError

OverheadProbe = Callable[[torch.device, int], float]
DiskProbe = Callable[[Path], float]
"""Bytes per second direct reads of a directory's filesystem reach (the front layer passes
:func:`hscompile.runtime.disk.directory_read_bandwidth`: the planner reads no files)."""
"""``probe(device, repeat) -> seconds`` of hscompile's host work per layer per decode step. It runs
the generator, which this layer may not import: the front layer supplies it (see :func:`tune`)."""

__all__ = ["DEFAULT_DISK_BYTES_PER_S", "PROFILE_SCHEMA", "DiskProbe", "HardwareProfile", "OverheadProbe",
           "bundled_profiles", "host_memory_available", "load_profile", "measure", "profile_path", "tune"]

PROFILE_SCHEMA = 1


DEFAULT_DISK_BYTES_PER_S = 2.0e9
"""The disk rate assumed where a profile has none measured: direct reads of an NVMe-class SSD (this
development machine's disk reads 1.9 to 3.3 GB/s). ``hscompile tune --disk DIR`` measures yours."""


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Rates of one device (bytes and FLOP per second), as :mod:`hscompile.planner.cost_model` uses them."""

    schema: int = PROFILE_SCHEMA
    device: str
    """``"cuda"`` or ``"cpu"``."""
    device_name: str
    torch_version: str
    h2d_bytes_per_s: float
    """Host-to-device copies from pinned memory."""
    d2h_bytes_per_s: float
    memory_bytes_per_s: float
    """Device memory bandwidth (bytes read + written per second by a copy)."""
    host_bytes_per_s: float
    """Host memory bandwidth (a host copy, bytes read + written): gathers of cache blocks."""
    matmul_flops_per_s: dict[str, float]
    """GEMM peak by dtype name (``"float16"``, ...)."""
    matmul_half_rows: float
    """GEMM rows at which the rate reaches half its peak."""
    weight_stream_bytes_per_s: float = 0.0
    """How fast a one-row GEMM reads a weight too big for cache: the rate decode steps are
    bound by (0: use ``memory_bytes_per_s``)."""
    attention_flops_per_s: dict[str, float]
    call_seconds: float
    """Fixed cost of one operator call (dispatch + launch)."""
    copies_overlap: bool = True
    """Whether weight copies run beside compute (a CUDA copy stream) or on the same thread (the CPU)."""
    layer_overhead_seconds: float = 0.0
    """hscompile's own cost per layer per decode step beyond the kernels' work (Python, op
    dispatch, cache index plans), measured on tiny models where compute is negligible."""
    device_memory_bytes: int
    host_memory_bytes: int
    disk_bytes_per_s: float = 0.0
    """Direct reads from the filesystem of ``disk_path`` (the disk tier's rate); 0: not measured."""
    disk_path: str = ""
    """The directory ``disk_bytes_per_s`` was measured in (``hscompile tune --disk DIR``)."""
    source: str = ""
    """Where the numbers come from: ``"measured on ... at ..."`` or a datasheet."""

    # -- what the cost model asks ---------------------------------------------------------

    def _rate(self, table: dict[str, float], dtype: str) -> float:
        if dtype in table:
            return table[dtype]
        half = [v for k, v in table.items() if k in ("float16", "bfloat16")]
        return (max(half) if half and dtype in ("float16", "bfloat16") else max(table.values()))

    def gemm_seconds(self, rows: int, k: int, n: int, dtype: str) -> float:
        """One ``(rows x k) @ (k x n)`` product: the slower of compute and memory traffic, plus a call."""
        if rows <= 0:
            return 0.0
        peak = self._rate(self.matmul_flops_per_s, dtype)
        item = _itemsize(dtype)
        compute = 2 * rows * k * n * (rows + self.matmul_half_rows) / (peak * rows)
        weights = self.weight_stream_bytes_per_s or self.memory_bytes_per_s
        memory = k * n * item / weights + (rows * k + rows * n) * item / self.memory_bytes_per_s
        return max(compute, memory) + self.call_seconds

    def attention_seconds(self, batch: int, heads: int, queries: int, keys: int, head_dim: int, dtype: str) -> float:
        """SDPA of ``queries`` over ``keys`` per sequence and head."""
        if batch == 0 or queries == 0:
            return 0.0
        flops = 4 * batch * heads * queries * keys * head_dim
        read = batch * heads * (queries + 2 * keys) * head_dim * _itemsize(dtype)
        return max(flops / self._rate(self.attention_flops_per_s, dtype), read / self.memory_bytes_per_s) + self.call_seconds

    def memory_seconds(self, nbytes: float) -> float:
        """Streaming ``nbytes`` through device memory once (elementwise work)."""
        return nbytes / self.memory_bytes_per_s

    def disk_seconds(self, nbytes: float) -> float:
        """A direct read of ``nbytes`` from the disk the profile measured (``tune --disk``), else
        :data:`DEFAULT_DISK_BYTES_PER_S`."""
        return nbytes / (self.disk_bytes_per_s or DEFAULT_DISK_BYTES_PER_S) if nbytes else 0.0

    def h2d_seconds(self, nbytes: float) -> float:
        return nbytes / self.h2d_bytes_per_s if nbytes else 0.0

    def d2h_seconds(self, nbytes: float) -> float:
        return nbytes / self.d2h_bytes_per_s if nbytes else 0.0

    # -- files ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        """Parse and validate; ``ValueError`` says what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a hardware profile is a JSON object")
        if data.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {data.get('schema')!r}, expected {PROFILE_SCHEMA}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"source", "layer_overhead_seconds", "copies_overlap",
                                               "weight_stream_bytes_per_s", "disk_bytes_per_s", "disk_path"})
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"profile fields missing: {missing}, unknown: {unknown}")
        for key in ("h2d_bytes_per_s", "d2h_bytes_per_s", "memory_bytes_per_s", "host_bytes_per_s"):
            if not isinstance(data[key], (int, float)) or not data[key] > 0:
                raise ValueError(f"profile field {key!r} must be a positive number, got {data[key]!r}")
        for key in ("matmul_half_rows", "call_seconds", "layer_overhead_seconds", "weight_stream_bytes_per_s"):
            if key in data and (not isinstance(data[key], (int, float)) or not data[key] >= 0):
                raise ValueError(f"profile field {key!r} must be a number >= 0, got {data[key]!r}")
        for key in ("matmul_flops_per_s", "attention_flops_per_s"):
            table = data[key]
            if not isinstance(table, dict) or not table or not all(
                isinstance(v, (int, float)) and v > 0 for v in table.values()
            ):
                raise ValueError(f"profile field {key!r} must map dtype names to positive rates")
        if data["device"] not in ("cuda", "cpu"):
            raise ValueError(f"profile device must be 'cuda' or 'cpu', got {data['device']!r}")
        return cls(**data)


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{os.cpu_count()} {platform.processor() or ''}".strip()


def profile_path(device: torch.device) -> Path:
    """The cache file of ``device``'s profile for this torch version."""
    return _env.cache_dir() / "profiles" / f"{_slug(device_name(device))}-torch{_slug(torch.__version__)}.json"


def bundled_profiles() -> dict[str, Path]:
    """Profiles shipped with hscompile for machines you may not have (name -> file)."""
    folder = resources.files("hscompile") / "profiles"
    return {p.name.removesuffix(".json"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def load_profile(path: str | Path) -> HardwareProfile:
    """Read a profile file (a cached one, a bundled one, or one written by hand)."""
    path = Path(path)
    if not path.is_file() and str(path) in bundled_profiles():
        path = bundled_profiles()[str(path)]
    try:
        return HardwareProfile.from_json(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no hardware profile at {path}; bundled ones: {', '.join(sorted(bundled_profiles()))}") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is not a valid hardware profile: {error}") from None


# -- measuring ---------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` after two warm-up calls."""
    samples = []
    for i in range(repeat + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _link(device: torch.device, nbytes: int, repeat: int) -> tuple[float, float]:
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / _timed(lambda: dev.copy_(host, non_blocking=pinned), device, repeat)
    d2h = nbytes / _timed(lambda: host.copy_(dev, non_blocking=pinned), device, repeat)
    return h2d, d2h


def _memory(device: torch.device, nbytes: int, repeat: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / _timed(lambda: b.copy_(a), device, repeat)


def _fit_matmul(
    device: torch.device, dtype: torch.dtype, width: int, rows: Sequence[int], repeat: int
) -> tuple[float, float, float]:
    """``(peak, half_rows, weight_stream)``: ``rate(m) = peak * m / (m + half_rows)`` fitted by least
    squares on ``1/rate`` vs ``1/m`` over ``rows``, and the weight bytes a one-row product reads
    per second.

    The weight is shaped like a decoder MLP's (``4 * width`` outputs of ``width`` inputs): large
    enough to live in memory rather than cache, as a layer's weights do during decode. It is
    applied as the model's linear layers apply theirs (``F.linear``, the weight transposed): on
    the CPU a bfloat16 ``x @ w`` takes a kernel about 70x slower than the one ``F.linear`` takes."""
    weight = torch.randn(4 * width, width, device=device).to(dtype)
    one = torch.randn(1, width, device=device).to(dtype)
    stream = weight.numel() * weight.element_size() / _timed(lambda: F.linear(one, weight), device, repeat)
    points = []
    for m in rows:
        x = torch.randn(m, width, device=device).to(dtype)
        seconds = _timed(lambda x=x: F.linear(x, weight), device, repeat)
        points.append((1.0 / m, seconds / (2 * m * width * 4 * width)))  # 1/rate = 1/peak + (half/peak) / m
    xs, ys = zip(*points)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    intercept = max(mean_y - slope * mean_x, min(ys) / 2)  # a non-positive intercept would mean infinite peak
    return 1.0 / intercept, max(slope, 0.0) / intercept, stream


def _attention(device: torch.device, dtype: torch.dtype, width: int, repeat: int) -> float:
    heads, dim, seq = max(width // 64, 1), 64, 256
    q = torch.randn(2, heads, seq, dim, device=device).to(dtype)
    seconds = _timed(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device, repeat)
    return 4 * 2 * heads * seq * seq * dim / 2 / seconds  # causal: half the products


def _call(device: torch.device) -> float:
    x = torch.zeros(1, device=device)
    calls = 200
    return _timed(lambda: [x.add_(1) for _ in range(calls)], device, 3) / calls


def host_memory_available() -> int | None:
    """Bytes of host memory this machine has available now: ``MemAvailable`` in ``/proc/meminfo``
    (free memory plus the page cache the kernel can reclaim), else the free pages ``sysconf``
    counts; None where neither can be read. A container's cgroup limit is not consulted."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _memory_sizes(device: torch.device) -> tuple[int, int]:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1]), int(host)
    return int(host), int(host)


def measure(
    device: torch.device,
    *,
    dtypes: Sequence[str] = ("float32",),
    width: int = 1024,
    quick: bool = False,
    overhead: OverheadProbe | None = None,
) -> HardwareProfile:
    """Measure ``device`` (seconds on a CPU, about one on a GPU). ``width`` is the GEMM width
    (use the model's hidden size); ``quick`` uses smaller buffers and fewer repeats.
    ``overhead``, when given, measures hscompile's per-layer overhead (the front layer passes
    :func:`hscompile.generation.measure_layer_overhead`, which compiles two tiny models in this
    process: do it in a process of its own, e.g. ``hscompile tune``)."""
    repeat = 3 if quick else 7
    nbytes = (16 if quick else 128) * 2**20
    rows = (8, 64, 256) if quick or device.type == "cpu" else (16, 128, 1024, 4096)
    h2d, d2h = _link(device, nbytes, repeat)
    memory = _memory(device, nbytes, repeat)
    host = _memory(torch.device("cpu"), nbytes, repeat)
    matmul, half, streams = {}, [], []
    attention = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        peak, half_rows, stream = _fit_matmul(device, dtype, width, rows, repeat)
        matmul[name] = peak
        half.append(half_rows)
        streams.append(stream)
        attention[name] = _attention(device, dtype, width, repeat)
    device_memory, host_memory = _memory_sizes(device)
    return HardwareProfile(
        device=device.type,
        device_name=device_name(device),
        torch_version=torch.__version__,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        memory_bytes_per_s=memory,
        host_bytes_per_s=host,
        matmul_flops_per_s=matmul,
        matmul_half_rows=statistics.fmean(half),
        weight_stream_bytes_per_s=min(streams),
        attention_flops_per_s=attention,
        call_seconds=_call(device),
        copies_overlap=device.type == "cuda",
        layer_overhead_seconds=overhead(device, 2 if quick else 3) if overhead is not None else 0.0,
        device_memory_bytes=device_memory,
        host_memory_bytes=host_memory,
        source=f"measured by hscompile.tune on {time.strftime('%Y-%m-%d %H:%M')} (width {width}{', quick' if quick else ''})",
    )


def tune(
    device: str | torch.device | None = None,
    *,
    dtypes: Sequence[str] = ("float32",),
    width: int = 1024,
    force: bool = False,
    quick: bool = False,
    overhead: OverheadProbe | None = None,
    disk: tuple[Path, DiskProbe] | None = None,
) -> HardwareProfile:
    """The profile of ``device`` (default: CUDA if available): the cached one when it is valid,
    for this device and torch, and covers ``dtypes``; else a fresh measurement, then cached.
    Without ``overhead`` (what hscompile uses implicitly) the per-layer overhead is not measured
    and a cached profile that lacks it is good enough; :func:`hscompile.tune` measures it.
    ``disk``: ``(directory, probe)``: the disk rate of that directory is measured (each time it is
    asked for: a disk's rate depends on the directory) and kept in the profile."""
    resolved = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    path = profile_path(resolved)
    profile = None
    if not force and path.is_file():
        try:
            cached = HardwareProfile.from_json(path.read_text())
        except (ValueError, TypeError):
            cached = None  # corrupt or foreign: measured again below
        if (
            cached is not None
            and cached.device_name == device_name(resolved)
            and cached.torch_version == torch.__version__
            and all(d in cached.matmul_flops_per_s for d in dtypes)
            and (cached.layer_overhead_seconds > 0 or overhead is None)
        ):
            if disk is None:
                return cached
            profile = cached
    if profile is None:
        profile = measure(resolved, dtypes=dtypes, width=width, quick=quick, overhead=overhead)
    if disk is not None:
        directory, probe = disk
        profile = dataclasses.replace(profile, disk_bytes_per_s=probe(directory), disk_path=str(directory))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(profile.to_json())
    temporary.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return profile
