"""Activation-estimate pass: the activation memory one call needs on the device.

Precondition: ``graph`` is the dynamo graph ``plan`` was made from; its nodes carry fake values.

Postcondition: an :class:`ActivationEstimate`: the peak, over the graph's execution order, of
the bytes of live non-weight values (user inputs included), freeing each value after its last
use and counting views as free. That is what eager execution of the same ops would hold at
once; the compiled partitions fuse ops and hold less. With dynamic shapes the estimate is an
expression in the graph's size placeholders, evaluated for every call before it runs.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from ..ir.activation import ActivationEstimate
from ..ir.fx import fake_value
from ..ir.plan import ModelPlan

__all__ = ["estimate_activations"]

_VIEW_METHODS = frozenset(
    {"view", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "t", "narrow", "select",
     "as_strided", "split", "chunk", "unbind", "unflatten", "detach", "view_as", "size", "dim"}
)
_VIEW_FUNCTIONS: frozenset[object] = frozenset(
    {torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.narrow, torch.select, torch.split,
     torch.chunk, torch.unbind, torch.t, torch.as_strided, torch.Tensor.view, torch.Tensor.expand}
)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            index = node.args[1]
            items = index if isinstance(index, tuple) else (index,)
            # Basic indexing (ints, slices, None, Ellipsis) is a view; tensor indices gather a copy.
            return not any(isinstance(i, fx.Node) for i in items)
        return node.target in _VIEW_FUNCTIONS
    return False


def _size_expr(size: object) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))  # type: ignore[call-overload]


def _bytes(value: object) -> sympy.Expr:
    if isinstance(value, torch.Tensor):
        numel: sympy.Expr = sympy.Integer(1)
        for size in value.shape:
            numel = numel * _size_expr(size)
        return numel * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum((_bytes(v) for v in value), sympy.Integer(0))
    return sympy.Integer(0)


def estimate_activations(graph: fx.GraphModule, plan: ModelPlan) -> ActivationEstimate:
    """See the module docstring."""
    weights = plan.weight_nodes
    nodes = list(graph.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for position, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = position
    index: dict[sympy.Expr, int] = {}

    def expr_index(expr: sympy.Expr) -> int:
        return index.setdefault(expr, len(index))

    events: list[tuple[tuple[int, int], ...]] = []
    live: dict[fx.Node, int] = {}
    output = next(n for n in nodes if n.op == "output")
    for position, node in enumerate(nodes):
        if node.op == "output" or node.name in weights:
            continue
        size = sympy.Integer(0) if _is_view(node) else _bytes(fake_value(node))
        step: list[tuple[int, int]] = []
        if size != 0:
            i = expr_index(size)
            step.append((1, i))
            if node in last_use and node not in output.all_input_nodes:
                live[node] = i
            elif node not in output.all_input_nodes:  # produced and unused: live only at this step
                step.append((-1, i))
        for arg in node.all_input_nodes:
            if last_use.get(arg) == position and arg in live:
                step.append((-1, live.pop(arg)))
        if step:
            events.append(tuple(step))

    symbols: list[tuple[int, sympy.Symbol]] = []
    hints: dict[sympy.Symbol, int] = {}
    for position, node in enumerate(n for n in nodes if n.op == "placeholder"):
        value = fake_value(node)
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            if any(value.node.expr == known for _, known in symbols):
                continue  # two inputs of one size (e.g. input_ids and attention_mask lengths)
            symbols.append((position, value.node.expr))
            if value.node.hint is not None:  # the size the graph was captured with
                hints[value.node.expr] = int(value.node.hint)
    exprs = tuple(index)
    free = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    missing = free - {s for _, s in symbols}
    if missing:
        raise ValueError(f"activation estimate depends on sizes that are not graph inputs: {sorted(map(str, missing))}")
    estimate = ActivationEstimate(exprs=exprs, events=tuple(events), symbols=tuple(symbols))
    estimate.hint = estimate._peak(tuple(hints.get(s, 1) for _, s in symbols)) if symbols else estimate._peak(())
    return estimate
