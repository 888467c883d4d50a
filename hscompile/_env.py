"""The only module that reads environment variables.

``HSCOMPILE_DUMP_DIR``
    When set, the pass manager writes every graph each pass produces into this directory
    (one ``.py`` file per pass and artifact), like ``TORCH_LOGS`` graph dumps.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["dump_dir"]


def dump_dir() -> Path | None:
    """Directory for graph dumps, or None when dumping is off."""
    value = os.environ.get("HSCOMPILE_DUMP_DIR")
    return Path(value) if value else None
