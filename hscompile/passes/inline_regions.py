"""Inline nested compile regions: one flat graph for the passes, whatever way dynamo captured it.

Dynamo traces a function marked with ``torch.compiler.nested_compile_region`` once and calls the
traced body through the ``invoke_subgraph`` higher-order op at every call site (hscompile's
generator marks the decoder layers so, which keeps tracing from growing with depth). Every pass
after this one reads the flat graph dynamo would have produced without regions: one node per op,
each op's ``nn_module_stack`` naming the module it ran in.

Before (abridged)::

    subgraph_1 = get_attr(subgraph_0)   # the body traced at layers.0
    invoke_subgraph_1 = invoke_subgraph(subgraph_1, 'subgraph_0', s44, hidden_states, l_..._layers_1_..._q_proj_weight, ...)
    hidden_states_3 = getitem(invoke_subgraph_1, 0)

After: the body's nodes copied in place of the call, reading the call's arguments, with
``nn_module_stack`` entries under ``layers.0`` rewritten to ``layers.1``; its output replaces the
``getitem``.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

__all__ = ["has_regions", "inline_regions", "region_calls"]

_SIZE_METHODS = frozenset({"size", "dim", "stride", "numel"})
# Pure scalar operators (never setitem or the in-place ones, which may mutate a tensor).
_PURE_OPERATORS: frozenset[object] = frozenset({
    operator.getitem, operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le, operator.add,
    operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.neg, operator.not_,
    operator.and_, operator.or_,
})


def _is_invoke(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "_name", None) == "invoke_subgraph"


def has_regions(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls any nested compile region."""
    return any(_is_invoke(node) for node in gm.graph.nodes)


def inline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every ``invoke_subgraph`` call replaced by its body (nested ones too).

    Invariant: the result computes what ``gm`` computes; its placeholders are ``gm``'s, in
    order, with their metadata and dynamo sources; it calls no region and holds no subgraph
    module; an inlined node's ``nn_module_stack`` is its call site's stack followed by the
    body's entries below the module the body was traced at, rebased onto the call's module.
    Size queries and scalar arithmetic that nothing reads are dropped (:func:`_drop_dead_scalars`).
    A graph without regions or such dead scalars is returned as it is.
    """
    region_bodies = {str(n.args[0].target) for n in gm.graph.nodes if _is_invoke(n)}
    if not region_bodies and not any(_dead_scalar(n) for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    bodies: dict[str, fx.GraphModule] = {}  # each body flattened once, however many layers call it
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in region_bodies:
            continue
        if _is_invoke(node):
            name = str(node.args[0].target)
            if name not in bodies:
                bodies[name] = inline_regions(getattr(gm, name))
            body = bodies[name]
            env[node] = _inline_call(graph, body, [env[a] if isinstance(a, fx.Node) else a for a in node.args[2:]],
                                     node.meta.get("nn_module_stack") or {})
            continue
        if node.op == "call_function" and node.target is operator.getitem and _is_invoke(node.args[0]):
            env[node] = env[node.args[0]][node.args[1]]
            continue
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op == "placeholder":
            # Dynamo's source for the placeholder (read by the analysis): not part of meta.
            source = getattr(node, "_dynamo_source", None)
            if source is not None:
                copied._dynamo_source = source  # type: ignore[attr-defined]
        env[node] = copied
    _drop_dead_scalars(graph)
    children = {name: module for name, module in gm.named_children() if name not in region_bodies}
    flat = fx.GraphModule(children, graph, class_name=type(gm).__name__)
    flat.meta.update(gm.meta)
    return flat


def _inline_call(graph: fx.Graph, body: fx.GraphModule, args: list[Any], call_stack: dict[str, Any]) -> tuple:
    """Copy ``body`` into ``graph`` reading ``args``; its outputs, as the call's tuple."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise RuntimeError(f"a nested compile region takes {len(placeholders)} inputs but is called with {len(args)}")
    env: dict[fx.Node, Any] = dict(zip(placeholders, args, strict=True))
    rebase = _Rebase(call_stack)
    out: Any = ()
    for node in body.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        if node.op == "get_attr":
            raise RuntimeError(f"a nested compile region reads attribute {node.target!r}; hscompile inlines only "
                               "regions whose parameters dynamo lifted as inputs")
        copied = graph.node_copy(node, lambda n: env[n])
        stack = node.meta.get("nn_module_stack")
        if stack:
            copied.meta["nn_module_stack"] = rebase(stack)
        env[node] = copied
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _drop_dead_scalars(graph: fx.Graph) -> None:
    """Remove size queries and scalar arithmetic nothing reads. Dynamo leaves them in a region's
    body (shape checks it resolved while tracing), and in a flat capture of layers it met through
    the regions' wrapper but traced one by one (two layers that differ). Later passes would count
    them as computation of the layer, and one after attention that reads the repeated K/V would
    keep that tensor alive past the attention that replaces it."""
    for node in reversed(graph.nodes):
        if _dead_scalar(node):
            graph.erase_node(node)


def _dead_scalar(node: fx.Node) -> bool:
    if node.users or node.op not in ("call_method", "call_function"):
        return False
    return (node.op == "call_method" and node.target in _SIZE_METHODS) or (
        node.op == "call_function" and node.target in _PURE_OPERATORS)


class _Rebase:
    """Rewrites a body node's ``nn_module_stack`` for one call site (see :func:`inline_regions`)."""

    def __init__(self, call_stack: dict[str, Any]) -> None:
        self.call = list(call_stack.items())
        self.call_path = _path(self.call[-1][1]) if self.call else ""

    def __call__(self, stack: dict[str, Any]) -> dict[str, Any]:
        entries = list(stack.items())
        depth = len(self.call)
        if depth == 0 or len(entries) < depth:
            return dict(stack)
        home = _path(entries[depth - 1][1])
        rebased = dict(self.call)
        for key, value in entries[depth:]:
            path = _path(value)
            if path.startswith(home):
                path = self.call_path + path[len(home):]
            entry = (path, *value[1:]) if isinstance(value, tuple) else path
            # Keys are module ids in dynamo's stacks: key by path so that two call sites stay apart.
            rebased[f"{key}@{path}"] = entry
        return rebased


def _path(value: Any) -> str:
    return value[0] if isinstance(value, tuple) else str(value)


def region_calls(gm: fx.GraphModule) -> tuple[int, int]:
    """``(bodies, calls)``: how many region bodies dynamo traced for ``gm`` and how many times
    ``gm`` calls them (a decoder whose layers all share one body: ``(1, layers)``)."""
    calls = [n for n in gm.graph.nodes if _is_invoke(n)]
    return len({str(n.args[0].target) for n in calls}), len(calls)
