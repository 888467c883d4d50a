"""The only module that reads environment variables.

``HSCOMPILE_DUMP_DIR``
    When set, the pass manager writes every graph each pass produces into this directory
    (one ``.py`` file per pass and artifact), like ``TORCH_LOGS`` graph dumps.
``HSCOMPILE_CACHE_DIR``, ``XDG_CACHE_HOME``
    Where hardware profiles, converted checkpoints and saved graph captures are kept (see :func:`cache_dir`).
``HSCOMPILE_ASYNC_SIM``
    A test tool: ``late``, ``early`` or ``random:SEED`` makes ``device="cpu"`` a simulated asynchronous
    device (:mod:`hscompile.runtime.simulated`) whose copies complete as late as CUDA's stream and
    event semantics allow (``late``), at once (``early``) or at a seeded random legal point, their
    destinations poisoned until then (see :func:`async_sim`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["async_sim", "cache_dir", "dump_dir", "offload_dir"]


def dump_dir() -> Path | None:
    """Directory for graph dumps, or None when dumping is off."""
    value = os.environ.get("HSCOMPILE_DUMP_DIR")
    return Path(value) if value else None


def cache_dir() -> Path:
    """Where hscompile keeps per-machine data (hardware profiles, converted checkpoints, saved graph
    captures under ``graphs/``): ``$HSCOMPILE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/hscompile``, else ``~/.cache/hscompile``."""
    explicit = os.environ.get("HSCOMPILE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "hscompile"


def offload_dir(option: str | None) -> Path:
    """The ``offload_dir`` option's directory, else ``offload/`` under :func:`cache_dir`."""
    return Path(option).expanduser() if option is not None else cache_dir() / "offload"


def async_sim() -> str | None:
    """The simulated asynchronous device's schedule (``late``, ``early``, ``random:SEED``), or None
    when ``HSCOMPILE_ASYNC_SIM`` is unset or empty (the CPU device is then synchronous)."""
    value = os.environ.get("HSCOMPILE_ASYNC_SIM", "").strip()
    if not value:
        return None
    mode, _, seed = value.partition(":")
    if mode in ("late", "early") and not seed:
        return mode
    if mode == "random":
        try:
            return f"random:{int(seed)}"
        except ValueError:
            pass
    raise ValueError(f"HSCOMPILE_ASYNC_SIM must be late, early or random:SEED (SEED an integer), got {value!r}")
