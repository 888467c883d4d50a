"""docs/ARCHITECTURE.md opens with a file index: one row per module under hscompile/, and each
row's key names exist in its module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hscompile"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _rows() -> dict[str, list[str]]:
    """File (relative to hscompile/) -> the key names of its row."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith(".py`"):
            rows[cells[0].strip("`")] = re.findall(r"`(\w+)`", cells[2])
    return rows


def _defined(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def test_every_module_has_a_row_and_every_row_a_module():
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    rows = set(_rows())
    assert not modules - rows, f"modules missing from the file index of docs/ARCHITECTURE.md: {sorted(modules - rows)}"
    assert not rows - modules, f"rows of the file index naming no module: {sorted(rows - modules)}"


def test_the_key_names_of_each_row_are_defined_in_its_module():
    missing = [(file, name) for file, names in _rows().items() if (PACKAGE / file).exists()
               for name in names if name not in _defined(PACKAGE / file)]
    assert not missing, f"names the file index gives that its modules do not define: {missing}"
