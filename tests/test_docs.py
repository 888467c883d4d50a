"""docs/BAD_INPUTS.md stays true: every test it names exists, and every message in it is worded as hscompile words it.

Cheap: it parses files, imports nothing of hscompile and compiles nothing.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "BAD_INPUTS.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _rows() -> list[tuple[str, str, str]]:
    """``(input, message, tests)`` of every table row (headers and separators left out)."""
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| ---", "| input |")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, line
        rows.append((cells[0], cells[1], cells[2]))
    return rows


@functools.cache
def _test_names(path: pathlib.Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test"))


@functools.cache
def _messages() -> str:
    """Every string literal in hscompile (f-strings' literal parts each on a line), spaces collapsed."""
    pieces = []
    for path in (ROOT / "hscompile").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(" ".join(node.value.split()))
    return "\n".join(pieces)


def _windows(message: str, size: int = 3) -> list[str]:
    """Runs of ``size`` words of ``message``, not across a cut (``…``) or an alternative (`` / ``)."""
    runs = []
    for segment in re.split(r"…| / ", message.replace("`", "")):
        words = segment.split()
        runs.extend(" ".join(words[i:i + size]) for i in range(len(words) - size + 1))
    return runs


def test_the_bad_inputs_table_has_at_least_30_rows_each_backed_by_a_test_that_exists():
    rows = _rows()
    assert len(rows) >= 30, len(rows)
    for bad_input, _, tests in rows:
        refs = TEST_REF.findall(tests)
        assert refs, f"no test named for {bad_input!r}"
        for file, name in refs:
            path = ROOT / file
            assert path.is_file(), file
            assert name in _test_names(path), f"{file}::{name} does not exist"


def test_every_message_in_the_table_is_worded_as_hscompile_words_it():
    corpus = _messages()
    for bad_input, message, _ in _rows():
        if "*argparse*" in bad_input:  # argparse's own wording
            continue
        assert any(run in corpus for run in _windows(message)), f"{message!r} is in no message of hscompile"
