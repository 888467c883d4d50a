"""The package's imports, walked: no import circle, and every import goes down the layers.

Lazy imports inside functions and ``TYPE_CHECKING`` imports count. The layers (DESIGN.md,
docs/ARCHITECTURE.md): ``ir/`` (plain data) imports only the base modules; ``ops/`` and
``planner/`` import ``ir/``; ``passes/`` imports ``ir/``, ``ops/`` and ``planner/``; ``runtime/``
imports ``ir/`` and ``ops/``; ``passes/`` and ``runtime/`` never import each other; the front
(everything else) may import any layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "hscompile"

BASE = {"hscompile._env", "hscompile.config", "hscompile.errors"}
ALLOWED = {
    "base": {"base"},
    "ir": {"base", "ir"},
    "ops": {"base", "ir", "ops"},
    "planner": {"base", "ir", "planner"},
    "passes": {"base", "ir", "ops", "planner", "passes"},
    "runtime": {"base", "ir", "ops", "runtime"},
    "front": {"base", "ir", "ops", "planner", "passes", "runtime", "front"},
}
"""Which layers a module of each layer may import."""


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


def layer(module: str) -> str:
    """The layer of a module: ``base``, a folder with a layer of its own, or ``front``."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "front"


def test_the_walk_sees_the_imports_it_should():
    graph = import_graph()
    assert graph.has_edge("hscompile.backend", "hscompile.passes.analyze")
    assert graph.has_edge("hscompile.runtime.executor", "hscompile.runtime.weights")
    assert graph.has_edge("hscompile.generation.generator", "hscompile.text")  # a lazy import inside a method


def test_every_module_has_a_layer_and_the_layers_are_those_of_the_design():
    graph = import_graph()
    folders = {m.split(".")[1] for m in graph if m.count(".") >= 2}
    assert folders == {"ir", "ops", "planner", "passes", "runtime", "generation"}
    assert layer("hscompile.ir.plan") == "ir" and layer("hscompile.generation.generator") == "front"
    assert layer("hscompile.ops") == "ops" and layer("hscompile.config") == "base"


def test_every_import_goes_down_the_layers():
    graph = import_graph()
    upward = sorted((a, b) for a, b in graph.edges if layer(b) not in ALLOWED[layer(a)])
    assert not upward, f"imports that cross the layers upward or sideways: {upward}"


def test_passes_and_runtime_never_import_each_other():
    graph = import_graph()
    crossings = [(a, b) for a, b in graph.edges if {layer(a), layer(b)} == {"passes", "runtime"}]
    assert not crossings, crossings


def test_there_is_no_import_circle():
    graph = import_graph()
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, f"import circles: {circles}"
