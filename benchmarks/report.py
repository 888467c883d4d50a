"""What every benchmark script ends with: its table on the console, its results as JSON when asked."""

from __future__ import annotations

import json
from typing import Any


def report(table: Any, results: Any, json_path: str | None) -> None:
    """Print ``table`` (a rich Table) and, when ``json_path`` is given, write ``results`` there."""
    from rich.console import Console

    Console().print(table)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
