"""Small helpers over torch.fx graphs captured by dynamo. Pure functions; none mutates its input."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "SdpaCall",
    "backward_slice",
    "extract_subgraph",
    "fake_value",
    "is_sdpa",
    "module_paths",
    "normalize_module_path",
    "normalize_sdpa",
    "placeholder_source",
    "static_int",
    "structural_key",
]

# Dynamo records SDPA at torch level; AOT-level graphs carry the aten op.
_SDPA_TARGETS: frozenset[object] = frozenset(
    {
        F.scaled_dot_product_attention,
        torch._C._nn.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: dict[str, object] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def fake_value(node: fx.Node) -> Any:
    """The fake value dynamo (``example_value``) or AOT (``val``) recorded for ``node``, or None."""
    value = node.meta.get("val")
    return node.meta.get("example_value") if value is None else value


def static_int(value: object) -> int | None:
    """``value`` as a Python int when it is a concrete or statically known size, else None."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_number else None
    return None


_PATH_TOKEN = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]")


_ROOT = re.compile(r"^(?:[LG]\['[^']*'\]|[A-Za-z_][A-Za-z0-9_]*)(?:\[(?:\d+|'[^']*')\])*")
"""The traced module's own source: a local or global name and any subscripts that reach the module
through the frame's arguments. Dynamo spells every step *inside* the module as an attribute
(``._modules['x']``, ``.model``), never as a bare subscript, so subscripts right after the name
still name the root: ``L['self']`` when ``forward`` is the traced frame, ``L['args'][0]`` when a
``def wrapper(*args, **kwargs)`` decorator is (transformers >= 5.24 wraps ``forward`` in
``deprecate_kwarg``), ``L['kwargs']['self']`` when ``self`` is passed by keyword."""


def normalize_module_path(raw: str) -> str:
    """The module path inside the traced model, whatever frame dynamo started from.

    ``"L['self'].model.layers.0.self_attn"``, ``"L['args'][0].model.layers.0.self_attn"``,
    ``"L['self']._modules['model']._modules['layers']._modules['0']._modules['self_attn']"`` and
    ``"L['self'].model.layers.0.forward.__self__.self_attn"`` all give
    ``"model.layers.0.self_attn"``: a key of ``model.named_modules()`` (and, with the parameter's
    name appended, of ``model.named_parameters()``).
    """
    match = _ROOT.match(raw)
    text = raw[match.end():] if match else raw
    # Paths in nn_module_stack are dotted already ("layers.0.mlp"), sources use _modules['x'].
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        match = _PATH_TOKEN.match(text, pos)
        if match is None:
            # A dotted integer segment such as ".0" (nn_module_stack spells ModuleList children so).
            digits = re.match(r"\.(\d+)", text[pos:])
            if digits is None:
                break
            parts.append(digits.group(1))
            pos += digits.end()
            continue
        parts.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    # ``<module>.forward.__self__`` is ``<module>``: dynamo reaches a module so when its forward is
    # a bound method of the instance (hscompile's layer regions bind one during tracing).
    while "__self__" in parts:
        at = parts.index("__self__")
        del parts[max(at - 1, 0):at + 1]
    return ".".join(parts)


def module_paths(node: fx.Node) -> list[str]:
    """Module paths of ``node``'s ``nn_module_stack``, outermost first, e.g. ``["model", "model.layers.0"]``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return []
    paths = []
    for value in stack.values():
        raw = value[0] if isinstance(value, tuple) else str(value)
        path = normalize_module_path(raw)
        if path:
            paths.append(path)
    return paths


@dataclass(frozen=True, slots=True)
class PlaceholderSource:
    """What a dynamo placeholder stands for."""

    kind: str
    """``"parameter"``, ``"buffer"``, ``"input"`` (a user argument) or ``"size"`` (a symbolic int)."""
    qualname: str
    """Dotted path inside the model for parameters and buffers (``"model.layers.0.mlp.up_proj.weight"``),
    the argument's source for user inputs (``"args[0]"``, ``"kwargs['attention_mask']"``)."""


def placeholder_source(node: fx.Node) -> PlaceholderSource:
    """Classify a dynamo placeholder from its ``grapharg`` source and example value."""
    # Dynamo keeps the source on the node (``_dynamo_source``) after it drops ``meta["grapharg"]``.
    source = getattr(node, "_dynamo_source", None) or getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if source is not None else None
    if callable(name):  # older torch: Source.name() is a method
        name = name()
    example = fake_value(node)
    if isinstance(example, (torch.SymInt, int)) and not isinstance(example, bool):
        return PlaceholderSource("size", name or node.name)
    if name is not None and "._parameters[" in name:
        return PlaceholderSource("parameter", normalize_module_path(name))
    if name is not None and "._buffers[" in name:
        return PlaceholderSource("buffer", normalize_module_path(name))
    if name is not None:
        text = name[1:] if name.startswith("L[") else name
        text = re.sub(r"^\['([^']*)'\]", r"\1", text)
        return PlaceholderSource("input", text)
    return PlaceholderSource("input", node.name)


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA_TARGETS


@dataclass(frozen=True, slots=True)
class SdpaCall:
    """Arguments of one scaled_dot_product_attention call, by name."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    dropout_p: object
    is_causal: object
    scale: object
    enable_gqa: object


def normalize_sdpa(node: fx.Node) -> SdpaCall:
    """Bind an SDPA node's positional and keyword arguments to parameter names."""
    bound: dict[str, object] = dict(_SDPA_DEFAULTS)
    for name, arg in zip(_SDPA_PARAMS, node.args):
        bound[name] = arg
    bound.update(node.kwargs)
    return SdpaCall(**bound)  # type: ignore[arg-type]


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def backward_slice(targets: Iterable[fx.Node], *, inside: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """All nodes ``inside`` the region that ``targets`` depend on (targets included), in graph order.

    The walk stops at nodes outside the region; they are the slice's inputs.
    """
    seen: set[fx.Node] = set()
    stack = [t for t in targets if inside(t)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n in _node_inputs(node) if inside(n) and n not in seen)
    if not seen:
        return []
    graph = next(iter(seen)).graph
    return [n for n in graph.nodes if n in seen]


def slice_inputs(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """Values used by ``nodes`` but defined outside them, in order of first use."""
    members = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in _node_inputs(node):
            if arg not in members:
                inputs.setdefault(arg, None)
    return list(inputs)


def extract_subgraph(
    root: fx.GraphModule,
    nodes: Sequence[fx.Node],
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    *,
    class_name: str = "Partition",
) -> fx.GraphModule:
    """A standalone GraphModule computing ``outputs`` from ``inputs`` with copies of ``nodes``.

    Precondition: every value ``nodes`` use is in ``nodes`` or ``inputs`` (checked).
    The result returns a tuple of ``len(outputs)`` values; placeholders keep the names and
    fake values of ``inputs``; ``get_attr`` targets are copied from ``root``.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        placeholder = graph.placeholder(value.name)
        placeholder.meta = {k: v for k, v in value.meta.items() if k in ("val", "example_value", "tensor_meta")}
        env[value] = placeholder
    attrs: dict[str, Any] = {}

    def lookup(arg: fx.Node) -> fx.Node:
        try:
            return env[arg]
        except KeyError:
            raise ValueError(f"extract_subgraph: {arg.name!r} is used but is neither a member nor an input") from None

    for node in nodes:
        if node.op == "placeholder":
            raise ValueError(f"extract_subgraph: placeholder {node.name!r} must be an input, not a member")
        if node.op == "get_attr":
            attrs[str(node.target)] = _get_attr(root, str(node.target))
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(o) for o in outputs))
    module = torch.nn.Module()
    for target, value in attrs.items():
        _set_attr(module, target, value)
    return fx.GraphModule(module, graph, class_name=class_name)


def _get_attr(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _set_attr(root: torch.nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(last, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(last, value)
    else:
        setattr(module, last, value)


def _target_repr(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{qualname}"


def _meta_repr(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shape, stride = tuple(str(s) for s in value.shape), tuple(str(s) for s in value.stride())
        return f"T({shape},{stride},{value.dtype},{value.device.type})"
    if isinstance(value, torch.SymInt | int):
        return f"I({value})" if not isinstance(value, int) else "I"
    return type(value).__name__


def structural_key(gm: fx.GraphModule) -> str:
    """A hash that is equal for two GraphModules exactly when running one can stand in for the other.

    It covers every node's op, target and arguments (with node references replaced by
    their position), constants, and the shape/stride/dtype/device of every placeholder's
    fake value; it ignores node names and module-stack metadata.
    """
    index: dict[fx.Node, int] = {}
    tokens: list[str] = []

    def arg_repr(arg: Any) -> str:
        if isinstance(arg, fx.Node):
            return f"%{index[arg]}"
        if isinstance(arg, (list, tuple)):
            inner = ",".join(arg_repr(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
        if isinstance(arg, dict):
            return "{" + ",".join(f"{k}:{arg_repr(v)}" for k, v in arg.items()) + "}"
        if isinstance(arg, slice):
            return f"slice({arg_repr(arg.start)},{arg_repr(arg.stop)},{arg_repr(arg.step)})"
        if isinstance(arg, float):
            return float.hex(arg)
        return repr(arg)

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            tokens.append(f"P:{_meta_repr(fake_value(node))}")
        elif node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                digest = hashlib.sha256(data).hexdigest()
            else:
                digest = repr(value)
            tokens.append(f"A:{_meta_repr(value)}:{digest}")
        else:
            tokens.append(f"{node.op}:{_target_repr(node)}:{arg_repr(node.args)}:{arg_repr(dict(node.kwargs))}")
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:16]
