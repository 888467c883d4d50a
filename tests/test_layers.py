"""The package's imports, walked: no import circle, and no new import between passes/ and runtime/.

Lazy imports inside functions and ``TYPE_CHECKING`` imports count. DESIGN.md's layering (passes/
and runtime/ never import each other) is not true yet: the list below is what main had when this
test was written (2026-12-02), and the one-way-house issue empties it. Until then that part is a
ratchet: an import that adds a crossing fails here; removing one asks for the list to shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "hscompile"

KNOWN_CROSSINGS = {
    ("hscompile.passes.placement", "hscompile.runtime.cost_model"),
    ("hscompile.runtime.blocks", "hscompile.passes.plan"),
    ("hscompile.runtime.cache", "hscompile.passes.recompute"),
    ("hscompile.runtime.cost_model", "hscompile.passes.plan"),
    ("hscompile.runtime.executor", "hscompile.passes.memory"),
    ("hscompile.runtime.executor", "hscompile.passes.placement"),
    ("hscompile.runtime.minibatch", "hscompile.passes.graph_utils"),
}
"""passes/ <-> runtime/ imports on main today (the one-way-house issue removes them)."""



def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> nx.DiGraph:
    """Module -> module edges for every import of a hscompile module by another, anywhere in the file."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from x import y`: the module x.y where y is one, else x itself.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def test_the_walk_sees_the_imports_it_should():
    graph = import_graph()
    assert graph.has_edge("hscompile.backend", "hscompile.passes.analyze")
    assert graph.has_edge("hscompile.runtime.executor", "hscompile.runtime.weights")
    assert graph.has_edge("hscompile.generation", "hscompile.text")  # a lazy import inside a method


def test_no_new_import_between_passes_and_runtime():
    graph = import_graph()
    crossings = {(a, b) for a, b in graph.edges if {_folder(a), _folder(b)} == {"passes", "runtime"}}
    assert crossings <= KNOWN_CROSSINGS, f"new passes<->runtime imports: {sorted(crossings - KNOWN_CROSSINGS)}"


def test_there_is_no_import_circle():
    graph = import_graph()
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles}"
