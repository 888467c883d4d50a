"""The only module that reads environment variables.

``HSCOMPILE_DUMP_DIR``
    When set, the pass manager writes every graph each pass produces into this directory
    (one ``.py`` file per pass and artifact), like ``TORCH_LOGS`` graph dumps.
``HSCOMPILE_CACHE_DIR``, ``XDG_CACHE_HOME``
    Where hardware profiles, converted checkpoints and saved graph captures are kept (see :func:`cache_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "dump_dir"]


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
