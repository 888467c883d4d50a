"""Trace a decoder layer once, not once per layer.

Dynamo inlines every layer's ``forward`` as it meets it: capture time grows with depth (9.8 of
the 10.7 s of SmolLM2's first call went there). Marking the layers as one
``torch.compiler.nested_compile_region`` makes dynamo trace the first layer and stamp that body
out for every layer whose inputs pass the same guards; the backend inlines the calls again
(:func:`hscompile.passes.inline_regions.inline_regions`), so the passes see the graph they always saw.

The layers are found structurally, as the analysis finds them: a module list of two or more
modules of one class with the same parameter names, shapes and dtypes. The regions are bound
to the layer instances only during the generator's own calls (:meth:`LayerRegions.applied`),
so the user's model is left as it was between calls and under any other compiler.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["LayerRegions", "repeated_layers"]


def repeated_layers(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost module lists of ``model`` whose children are two or more modules of one class
    with the same parameters (names, shapes, dtypes) and no ``forward`` of their own instance
    (a hook library's wrapper, which a region must not bypass)."""
    found: list[nn.ModuleList] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        first = module[0]
        signature = _parameters(first)
        if all(type(child) is type(first) and "forward" not in vars(child) and _parameters(child) == signature
               for child in module):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _parameters(module: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())


def _region(forward: Callable[..., object], calls: int) -> Callable[..., object] | None:
    """A replacement for the layers' ``forward`` that calls ``forward`` through one nested compile
    region, or None when this torch has no regions.

    The region takes flat arguments (the module, a string naming the call's structure, then its
    leaves): dynamo fingerprints flat arguments directly but runs its pytree flatten, symbolically,
    for keyword or nested ones, a cost paid at every layer. ``calls`` distinct traced bodies are
    allowed, so a model whose layers all differ traces each, as without regions, rather than fail.
    """
    mark = getattr(torch.compiler, "nested_compile_region", None)
    if mark is None:
        return None

    def body(module: nn.Module, structure: str, *leaves: object) -> object:
        args, kwargs = _unflatten(structure, leaves)
        return forward(module, *args, **kwargs)

    if "max_reuse_entries" in inspect.signature(mark).parameters:
        region = mark(body, max_reuse_entries=max(calls, 8))
    else:
        region = mark(body)

    def call(module: nn.Module, *args: object, **kwargs: object) -> object:
        leaves: list[object] = []
        layout: list[str] = []
        for value in (*args, *kwargs.values()):
            if type(value) is tuple:  # (cos, sin) and kin: one level, the rest stay leaves
                layout.append(str(len(value)))
                leaves.extend(value)
            else:
                layout.append("-")
                leaves.append(value)
        return region(module, f"{len(args)}|{','.join(kwargs)}|{','.join(layout)}", *leaves)

    return call


def _unflatten(structure: str, leaves: tuple[object, ...]) -> tuple[list[object], dict[str, object]]:
    """The positional and keyword arguments :func:`_region`'s ``call`` flattened into ``structure``."""
    positional, names, layout = structure.split("|")
    values: list[object] = []
    at = 0
    for entry in layout.split(",") if layout else ():
        if entry == "-":
            values.append(leaves[at])
            at += 1
        else:
            values.append(tuple(leaves[at:at + int(entry)]))
            at += int(entry)
    count = int(positional)
    return values[:count], dict(zip(names.split(",") if names else (), values[count:], strict=True))


class LayerRegions:
    """The repeated layers of one model, each bound to its class's ``forward`` marked as a region."""

    def __init__(self, model: nn.Module) -> None:
        self._bound: list[tuple[nn.Module, Callable[..., object]]] = []
        variable = _region_variable()
        if variable is None:
            return
        self._variable = variable
        for layers in repeated_layers(model):
            region = _region(type(layers[0]).forward, len(layers))
            if region is None:
                return
            # One bound method per layer for the generator's lifetime: dynamo guards on it.
            self._bound.extend((layer, types.MethodType(region, layer)) for layer in layers)

    def __len__(self) -> int:
        return len(self._bound)

    def disable(self) -> None:
        """Trace the layers one by one from now on (dynamo could not trace them as a region)."""
        self._bound.clear()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The layers call their regions inside this block, their class's ``forward`` after it."""
        if not self._bound:
            yield
            return
        for layer, bound in self._bound:
            layer.forward = bound  # type: ignore[method-assign]
        try:
            with _aliased_inputs_allowed(self._variable):
                yield
        finally:
            for layer, _ in self._bound:
                vars(layer).pop("forward", None)


def _region_variable() -> type | None:
    """Dynamo's tracer of ``invoke_subgraph``, where this torch keeps it (None: not found, and the
    layers are then traced one by one, as without regions)."""
    for module in ("torch._dynamo.variables.invoke_subgraph", "torch._dynamo.variables.higher_order_ops"):
        try:
            variable = getattr(importlib.import_module(module), "InvokeSubgraphHigherOrderVariable", None)
        except ImportError:
            continue
        if variable is not None and hasattr(variable, "supports_aliasing"):
            return variable
    return None


@contextlib.contextmanager
def _aliased_inputs_allowed(variable: type) -> Iterator[None]:
    """Let a region take inputs that share storage while dynamo traces it.

    A layer's weights are views of one packed buffer (``hscompile.loading`` reads a layer so, and
    a streamed layer's host store adopts it), and dynamo refuses a region whose inputs alias: the
    region would reach AOTAutograd, whose functionalization of a region cannot handle it. The
    hybridserve backend inlines every region before anything else sees the graph (the flat graph
    dynamo gives without regions, aliasing included, which is how every weight is read
    anyway), so the refusal does not apply. Restored on exit: other compilations keep the check.
    """
    before = vars(variable).get("supports_aliasing")
    variable.supports_aliasing = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if before is None:
            del variable.supports_aliasing  # type: ignore[attr-defined]
        else:
            variable.supports_aliasing = before  # type: ignore[attr-defined]
