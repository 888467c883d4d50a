"""The one configuration tree of hscompile.

``torch.compile(model, backend="hybridserve", options={...})`` hands a flat dict of
options to the backend; :meth:`HybridServeConfig.from_options` validates it into the frozen
tree below. Every field is documented with its unit. Every bad value raises
:class:`~hscompile.errors.ConfigError` naming the option and what would be valid, and an
unknown key raises one listing the valid keys.

:data:`OPTIONS` is the single list of option keys: the README table, the CLI flags and the
error messages are checked against it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import torch

from .errors import ConfigError

__all__ = [
    "OPTIONS",
    "OptionSpec",
    "CacheConfig",
    "HybridServeConfig",
    "MemoryConfig",
    "QuantConfig",
    "ScheduleConfig",
    "act_ratio_value",
    "format_bytes",
    "parse_bytes",
]

Auto: TypeAlias = Literal["auto"]
Lowering: TypeAlias = Literal["inductor", "eager"]

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object, *, key: str) -> int:
    """Parse a byte count: a positive int, or a string such as ``"512MiB"``, ``"8GiB"``, ``"1.5GB"``.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024), case-insensitive.
    """
    valid = "a positive int of bytes or a string such as '512MiB', '8GiB' or '1.5GB'"
    if isinstance(value, bool):
        raise ConfigError(f"option {key!r}: got {value!r}; expected {valid}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"option {key!r}: got {value}; expected {valid}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is not None:
            number, unit = match.groups()
            multiplier = _UNITS.get(unit.lower() or "b")
            if multiplier is not None:
                nbytes = math.floor(float(number) * multiplier)
                if nbytes > 0:
                    return nbytes
        raise ConfigError(
            f"option {key!r}: cannot read {value!r} as a size; expected {valid} "
            f"(units: {', '.join(['B', 'kB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'])})"
        )
    raise ConfigError(f"option {key!r}: got {type(value).__name__} {value!r}; expected {valid}")


def format_bytes(nbytes: float) -> str:
    """Render a byte count with a binary unit, e.g. ``format_bytes(3 << 29) == '1.50 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def _resolve_device(value: object, *, check: bool = True) -> torch.device:
    valid = "'cpu', 'cuda', 'cuda:N' or a torch.device of those types"
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ConfigError(f"option 'device': cannot read {value!r}; expected {valid}") from None
    else:
        raise ConfigError(f"option 'device': got {type(value).__name__} {value!r}; expected {valid}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"option 'device': {str(device)!r} is not supported; expected {valid}")
    if device.type == "cuda" and not check:
        return torch.device("cuda", device.index or 0)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"option 'device': {str(device)!r} was asked for but CUDA is not available on this machine; "
                "use device='cpu'"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(
                f"option 'device': {str(device)!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", index)
    return device


def default_device() -> torch.device:
    """The device used when the ``device`` option is not given: CUDA when available, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryConfig:
    """Memory budgets. ``None`` means: measure what is free when the model is compiled."""

    device_memory: int | None = None
    """Bytes of accelerator memory hscompile may use (resident and streamed weights,
    cache staging buffers, activations). A promise: the runtime never exceeds it."""

    host_memory: int | None = None
    """Bytes of host memory for the weight store and the KV/ACT block pools."""

    offload_dir: str | None = None
    """Where layers kept on disk that must be converted first (another dtype, ``weight_quant``) are
    written once; None: ``offload/`` under hscompile's cache directory (``_env.offload_dir``)."""

    def __post_init__(self) -> None:
        for name in ("device_memory", "host_memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"option {name!r}: got {value!r}; expected a positive number of bytes or None")
        if self.offload_dir is not None and (not isinstance(self.offload_dir, str) or not self.offload_dir):
            raise ConfigError(f"option 'offload_dir': got {self.offload_dir!r}; expected a directory path")


def act_ratio_value(ratio: object, where: str) -> float | Auto:
    """``ratio`` as an ACT ratio: ``"auto"`` or a float in [0, 1]. The one check of a ratio, for
    the option and for a call's own (``where`` names it in the :class:`ConfigError`)."""
    if ratio == "auto":
        return "auto"
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"{where}: got {ratio!r}; expected a float in [0, 1] or 'auto'")
    return float(ratio)


DiskCache: TypeAlias = Literal["auto", "on", "off"]
DISK_CACHE: tuple[str, ...] = ("auto", "on", "off")
"""Values of the ``disk_cache`` option."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheConfig:
    """How per-token attention state is cached in host memory."""

    act_ratio: float | Auto = "auto"
    """Fraction of cached tokens kept as activation checkpoints (ACT blocks, K/V recomputed
    on the device) rather than as K/V blocks; in [0, 1]. ``"auto"``: chosen by the cost model."""

    block_size: int = 16
    """Tokens per cache block (KV or ACT); the unit the block allocator hands out."""

    disk_cache: DiskCache = "auto"
    """Where a call's blocks go when the host budget cannot hold its whole batch: ``"off"`` runs
    the batch in waves that fit; ``"on"`` runs it whole, the blocks the host budget leaves out in a
    file of ``offload_dir`` read at every step; ``"auto"``: whichever the cost model predicts faster
    (:func:`hscompile.planner.spill.plan_spill`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_ratio", act_ratio_value(self.act_ratio, "option 'act_ratio'"))
        if self.disk_cache not in DISK_CACHE:
            raise ConfigError(f"option 'disk_cache': got {self.disk_cache!r}; expected one of "
                              f"{', '.join(repr(v) for v in DISK_CACHE)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not 1 <= self.block_size <= 65536:
            raise ConfigError(f"option 'block_size': got {self.block_size!r}; expected an int of tokens in [1, 65536]")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """How steps are ordered on the device."""

    mini_batch_size: int | Auto = "auto"
    """Sequences per mini-batch: a batch is split into mini-batches whose cache loads overlap
    the previous mini-batch's compute. ``"auto"``: chosen by the cost model."""

    prefetch_depth: int = 1
    """How many layers ahead weights are prefetched: the copy of layer ``l + prefetch_depth``
    is issued before the compute of layer ``l``. The device holds ``prefetch_depth + 1``
    streamed layers at once."""

    def __post_init__(self) -> None:
        size = self.mini_batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
            raise ConfigError(f"option 'mini_batch_size': got {size!r}; expected an int >= 2 or 'auto' (a mini-batch "
                              "runs the graph compiled for 2 or more sequences, so it never has fewer than 2)")
        depth = self.prefetch_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"option 'prefetch_depth': got {depth!r}; expected an int >= 1")


WEIGHT_QUANT = ("none", "int8", "int4")
"""Values of the ``weight_quant`` option (formats: :mod:`hscompile.ir.quant`)."""
CACHE_QUANT = ("none", "int8")
"""Values of the ``cache_quant`` option."""


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantConfig:
    """How weights are stored in the host store and moved over the link."""

    weight_quant: str = "none"
    """``"int8"`` (symmetric) or ``"int4"`` (asymmetric): the projections of the decoder layers are
    kept group-wise quantized and dequantized on the device inside the compute; ``"none"``: the
    model's dtype. Norms, biases, embeddings and the head always stay exact."""

    group_size: int = 64
    """Values per quantization group along a weight's input dimension (one scale, and one zero
    point for int4, per group); it must divide every quantized weight's input dimension."""

    cache_quant: str = "none"
    """``"int8"``: cache blocks hold each token's K/V (per head) and checkpoint as int8 values with
    one scale each (symmetric, absmax / 127, in the model's dtype), dequantized on the device as
    they are loaded; ``"none"``: the model's dtype."""

    def __post_init__(self) -> None:
        if self.weight_quant not in WEIGHT_QUANT:
            raise ConfigError(f"option 'weight_quant': got {self.weight_quant!r}; expected one of "
                              f"{', '.join(repr(v) for v in WEIGHT_QUANT)}")
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= 65536:
            raise ConfigError(f"option 'quant_group_size': got {size!r}; expected an int in [2, 65536]")
        if self.weight_quant == "int4" and size % 2:
            raise ConfigError(f"option 'quant_group_size': got {size}; int4 packs two values a byte, so it must be even")
        if self.cache_quant not in CACHE_QUANT:
            raise ConfigError(f"option 'cache_quant': got {self.cache_quant!r}; expected one of "
                              f"{', '.join(repr(v) for v in CACHE_QUANT)}")


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One flat option key of ``torch.compile(..., options=...)``."""

    key: str
    path: tuple[str, ...]
    """Where the value lands in :class:`HybridServeConfig` (attribute names)."""
    values: str
    """Valid values, as shown to users."""
    default: str
    description: str


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("device", ("device",), "'cuda', 'cuda:N', 'cpu' or a torch.device", "'cuda' when available, else 'cpu'",
               "Accelerator that runs the compute; weights and cache live in host memory."),
    OptionSpec("device_memory", ("memory", "device_memory"), "int bytes or a size string ('512MiB', '8GiB')",
               "free device memory", "Device budget for weights, cache staging and activations; never exceeded."),
    OptionSpec("host_memory", ("memory", "host_memory"), "int bytes or a size string",
               "available host memory", "Host budget for the weight store and the KV/ACT block pools; a checkpoint "
               "larger than it (from_pretrained) keeps layers on disk, read at every step."),
    OptionSpec("offload_dir", ("memory", "offload_dir"), "a directory path", "offload/ in hscompile's cache directory",
               "Where layers kept on disk that must be converted (another dtype, weight_quant) are written once; "
               "the checkpoint's own files are read as they are."),
    OptionSpec("act_ratio", ("cache", "act_ratio"), "float in [0, 1] or 'auto'", "'auto'",
               "Fraction of cached tokens kept as activation checkpoints (K/V recomputed on the device)."),
    OptionSpec("block_size", ("cache", "block_size"), "int tokens in [1, 65536]", "16", "Tokens per KV/ACT cache block."),
    OptionSpec("disk_cache", ("cache", "disk_cache"), "'auto', 'on' or 'off'", "'auto'",
               "When host_memory cannot hold a call's whole batch: run it whole with the blocks left out in a file "
               "of offload_dir ('on'), in waves that fit ('off'), or whichever the cost model predicts faster."),
    OptionSpec("mini_batch_size", ("schedule", "mini_batch_size"), "int >= 2 or 'auto'", "'auto'",
               "Sequences per mini-batch of a generation step (at least 2); each layer's weights cross the link "
               "once per step and serve every mini-batch."),
    OptionSpec("prefetch_depth", ("schedule", "prefetch_depth"), "int >= 1", "1",
               "Layers of weights prefetched ahead of the compute."),
    OptionSpec("lowering", ("lowering",), "'inductor' or 'eager'", "'inductor'",
               "Compile partitions with Inductor, or run them eagerly (fast to start, for debugging)."),
    OptionSpec("graph_cache", ("graph_cache",), "True or False", "True",
               "Save captured graphs under $HSCOMPILE_CACHE_DIR/graphs and reuse them (later generators and processes "
               "skip dynamo's capture)."),
    OptionSpec("weight_quant", ("quant", "weight_quant"), "'none', 'int8' or 'int4'", "'none'",
               "Store the decoder layers' projections group-wise quantized; dequantized on the device."),
    OptionSpec("quant_group_size", ("quant", "group_size"), "int in [2, 65536] dividing the input dimensions",
               "64", "Values per quantization group (one scale, and for int4 one zero point, each)."),
    OptionSpec("cache_quant", ("quant", "cache_quant"), "'none' or 'int8'", "'none'",
               "Cache blocks hold K/V and checkpoints as int8 with a scale per token and head; dequantized on loading."),
)
_OPTIONS_BY_KEY = {spec.key: spec for spec in OPTIONS}


@dataclass(frozen=True, kw_only=True, slots=True)
class HybridServeConfig:
    """Everything the backend needs to know, validated. Build it with :meth:`from_options`."""

    device: torch.device = field(default_factory=default_device)
    """Where compute runs."""

    lowering: Lowering = "inductor"
    """``"inductor"`` compiles each partition with Inductor; ``"eager"`` runs the FX partitions as they are."""

    graph_cache: bool = True
    """Save each graph dynamo captures for a generator, and reuse saved ones whose key matches
    (:mod:`hscompile.generation.captures`)."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", _resolve_device(self.device))
        if self.lowering not in ("inductor", "eager"):
            raise ConfigError(f"option 'lowering': got {self.lowering!r}; expected 'inductor' or 'eager'")
        if not isinstance(self.graph_cache, bool):
            raise ConfigError(f"option 'graph_cache': got {self.graph_cache!r}; expected True or False")

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None = None, *, check_device: bool = True) -> HybridServeConfig:
        """Validate a flat options dict (the ``options=`` of ``torch.compile``).

        ``check_device=False`` accepts a CUDA device this machine does not have (for planning
        a run on another machine with ``hscompile inspect``).

        >>> HybridServeConfig.from_options({"device": "cpu", "device_memory": "1GiB"}).memory.device_memory
        1073741824
        """
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"options must be a dict of option keys; got {type(options).__name__}")
        unknown = sorted(str(key) for key in options if key not in _OPTIONS_BY_KEY)
        if unknown:
            raise ConfigError(
                f"unknown option key(s) {', '.join(repr(k) for k in unknown)} for backend 'hybridserve'; "
                f"valid keys: {', '.join(spec.key for spec in OPTIONS)}"
            )
        memory: dict[str, object] = {
            k: parse_bytes(options[k], key=k) for k in ("device_memory", "host_memory") if options.get(k) is not None}
        if options.get("offload_dir") is not None:
            directory = options["offload_dir"]
            memory["offload_dir"] = os.fspath(directory) if isinstance(directory, os.PathLike) else directory
        cache = {k: options[k] for k in ("act_ratio", "block_size", "disk_cache") if k in options}
        schedule = {k: options[k] for k in ("mini_batch_size", "prefetch_depth") if k in options}
        quant = {spec.path[-1]: options[spec.key] for spec in OPTIONS if spec.path[0] == "quant" and spec.key in options}
        top: dict[str, object] = {}
        if options.get("device") is not None:
            top["device"] = _resolve_device(options["device"], check=check_device)
        for key in ("lowering", "graph_cache"):
            if key in options:
                top[key] = options[key]
        return cls(
            memory=MemoryConfig(**memory),  # type: ignore[arg-type]
            cache=CacheConfig(**cache),  # type: ignore[arg-type]
            schedule=ScheduleConfig(**schedule),  # type: ignore[arg-type]
            quant=QuantConfig(**quant),  # type: ignore[arg-type]
            **top,  # type: ignore[arg-type]
        )

    def to_options(self) -> dict[str, object]:
        """The flat options dict that :meth:`from_options` turns back into this config."""
        out: dict[str, object] = {}
        for spec in OPTIONS:
            value: object = self
            for attr in spec.path:
                value = getattr(value, attr)
            if value is not None:
                out[spec.key] = str(value) if isinstance(value, torch.device) else value
        return out
