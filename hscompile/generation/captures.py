"""Captured graphs kept on disk, so a later generator (in this process or another) skips dynamo.

Dynamo's capture is most of a warm start: with Inductor's caches warm, a 32-layer model still
spent about half its first call tracing. A generator therefore saves each graph dynamo captured
for it (flat, regions inlined, with its fake values and module stacks) under
``$HSCOMPILE_CACHE_DIR/graphs/<key>/``, and a later generator whose key matches builds its
:class:`~hscompile.backend.CompiledModel` from the saved graph and calls it directly.

The key says everything the graph was traced from; a graph is reused only where all of it is
equal, else it is ignored and dynamo captures (and saves) anew (:func:`structure_key`):

- the versions of Python, torch and transformers, and the hash of hscompile's own sources;
- the default dtype (not the grad mode: a generator captures under ``no_grad`` only; not the
  options: the passes, which read them, run again);
- the model: every module's class and path, the hash of the source file of each class it is
  made of (an edited modeling file is a new key), every instance attribute that is a plain value
  (config fields, scales, flags: dynamo bakes them into the graph), every parameter and buffer's
  name, shape, stride, dtype and device. Weight values are not part of it (the graph does not
  depend on them). A model with forward hooks, or an attribute that cannot be described, is not
  keyed: its graphs are neither saved nor reused. hscompile's own attribute, the generators
  ``hscompile.generate`` keeps on the model (:data:`~hscompile.generation.kept.KEPT_ATTRIBUTE`), is
  left out: the forward never reads it, and a kept generator would otherwise unkey the model.

A saved graph serves a call only if the call passes what dynamo guarded: each input's dtype,
rank and static sizes (checked before loading), then the shape environment's guards on its
symbolic sizes (checked after; a graph whose guards fail is set aside for the process). A file
that cannot be read is deleted and rebuilt. Writes are atomic (a file appears whole or not at
all), so processes may share the directory. At most 32 graphs a key and 64 keys are kept (the least
recently used key goes first); a temporary file a killed process left is removed after an hour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .. import _env
from .kept import KEPT_ATTRIBUTE

if TYPE_CHECKING:
    from ..backend import CompiledModel

__all__ = ["Binding", "CaptureStore", "SavedGraph", "sources_hash", "structure_key"]

_LOG = logging.getLogger("hscompile.generation")

FORMAT = 1
"""The layout of a saved graph; a file of another layout is ignored (and replaced)."""
_KEEP_META = ("val", "example_value", "nn_module_stack")
"""Node metadata the passes read (``grapharg`` would pickle the weights themselves)."""
_MAX_GRAPHS = 32
"""Saved graphs per key, at most (a model called with ever-new shapes stops saving)."""
_MAX_KEYS = 64
"""Keys kept, at most: saving under a new key removes the least recently used beyond it."""
_STALE_SECONDS = 3600
"""A temporary file this old was left by a process killed while saving (a save takes a second)."""
INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The generator's tensor arguments (``graphs.entry_point``), in the order bindings name them."""


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a placeholder's value comes from at a call."""

    kind: str
    """``"input"`` (one of :data:`INPUTS`), ``"size"`` / ``"stride"`` (of an input, ``dim``),
    ``"parameter"`` or ``"buffer"`` (of the model, by qualified name)."""
    name: str
    dim: int = -1


@dataclass(frozen=True, slots=True)
class InputSpec:
    """An input tensor as the graph was traced for it: ``sizes`` has None where the size is symbolic."""

    name: str
    dtype: str
    sizes: tuple[int | None, ...]

    def admits(self, tensor: torch.Tensor) -> bool:
        if str(tensor.dtype) != self.dtype or tensor.dim() != len(self.sizes) or not tensor.is_contiguous():
            return False
        # Dynamo specialises sizes 0 and 1: a symbolic size never stands for them.
        return all(size == want if want is not None else size >= 2 for size, want in zip(tensor.shape, self.sizes))


@dataclass(slots=True)
class SavedGraph:
    """One saved capture: its signature (read with the file) and, once loaded, its graph."""

    path: Path
    inputs: tuple[InputSpec, ...]
    bindings: tuple[Binding, ...]
    payload: bytes
    """The graph, pickled with its fake values (loaded only when a call's inputs admit it)."""
    compiled: CompiledModel | None = None
    """The :class:`~hscompile.backend.CompiledModel` built from it, once built."""
    graph: fx.GraphModule | None = None
    """The graph, once loaded."""
    guards: Any = None
    """``(shape_env, code, positions)``: the shape guards (compiled) the arguments at ``positions``
    must pass (None: none)."""
    refused: bool = False
    """Its load failed in this process: not tried again."""

    def admits(self, tensors: dict[str, torch.Tensor]) -> bool:
        return not self.refused and all(spec.admits(tensors[spec.name]) for spec in self.inputs)

    def arguments(self, tensors: dict[str, torch.Tensor], state: Callable[[str], torch.Tensor]) -> list[Any]:
        """The call's arguments in placeholder order."""
        args: list[Any] = []
        for binding in self.bindings:
            if binding.kind == "input":
                args.append(tensors[binding.name])
            elif binding.kind == "size":
                args.append(tensors[binding.name].shape[binding.dim])
            elif binding.kind == "stride":
                args.append(tensors[binding.name].stride(binding.dim))
            else:
                args.append(state(binding.name))
        return args

    @property
    def symbolic(self) -> list[int]:
        """Positions of the arguments the shape guards read (the inputs and their sizes)."""
        return [i for i, b in enumerate(self.bindings) if b.kind in ("input", "size", "stride")]

    def guards_pass(self, args: Sequence[Any]) -> bool:
        """Whether the call with ``args`` passes the graph's shape guards (see :meth:`watch`)."""
        if self.guards is None:
            return not self.refused
        shape_env, code, positions = self.guards
        return bool(shape_env.evaluate_guards_expression(code, [args[i] for i in positions]))

    def examples(self, graph: fx.GraphModule, args: Sequence[Any]) -> list[Any]:
        """What dynamo would give the backend for ``graph`` at a call with ``args``: the fake values
        of symbolic sizes, the real tensors otherwise. The sizes' hints become this call's, as for a
        capture made at this call (the placement plans activations at the hints), and the guards
        those of the capture (:meth:`watch`)."""
        import sympy

        nodes = _placeholders(graph)
        hints: dict[Any, int] = {}
        examples: list[Any] = []
        for binding, node, arg in zip(self.bindings, nodes, args, strict=True):
            value = _fake(node)
            if binding.kind in ("size", "stride") and isinstance(value, torch.SymInt):
                if isinstance(value.node.expr, sympy.Symbol):
                    hints[value.node.expr] = int(arg)
                examples.append(value)
            else:
                examples.append(arg)
        if hints:
            env = next(v.node.shape_env for v in examples if isinstance(v, torch.SymInt))
            table = getattr(env, "backed_var_to_val", None)  # torch 2.13; var_to_val before
            table = table if table is not None else env.var_to_val
            for symbol, value in hints.items():
                table[symbol] = sympy.Integer(value)
            for node in (nodes[i] for i in self.symbolic):
                for size in _symbolic_sizes(_fake(node)):
                    if size.node.expr.free_symbols <= hints.keys():
                        size.node._hint = int(size.node.expr.xreplace(hints))
        self.watch(graph)
        return examples

    def watch(self, graph: fx.GraphModule) -> None:
        """Take the shape guards of ``graph``'s inputs from its shape environment as it is now
        (after compiling, with the guards the passes added)."""
        positions = self.symbolic
        nodes = _placeholders(graph)
        values = [_fake(nodes[i]) for i in positions]
        shape_env = next((v.node.shape_env for v in values if isinstance(v, torch.SymInt)), None)
        if shape_env is None:
            shape_env = next((v.fake_mode.shape_env for v in values if hasattr(v, "fake_mode")), None)
        code = None if shape_env is None else shape_env.produce_guards_expression(values, ignore_static=False)
        # Compiled once: they are evaluated at every step this graph serves.
        self.guards = None if code is None else (shape_env, compile(code, "<saved graph guards>", "eval"), positions)


def _symbolic_sizes(value: Any) -> list[torch.SymInt]:
    if isinstance(value, torch.SymInt):
        return [value]
    if isinstance(value, torch.Tensor):
        return [s for s in (*value.shape, *value.stride(), value.storage_offset()) if isinstance(s, torch.SymInt)]
    return []


def _fake(node: fx.Node) -> Any:
    from ..ir.fx import fake_value

    return fake_value(node)


def binding_of(node: fx.Node) -> Binding | None:
    """The binding of a dynamo placeholder from its source, or None when it is none this store knows
    (then the graph is not saved)."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    from ..ir.fx import placeholder_source

    source = getattr(node, "_dynamo_source", None)
    if isinstance(source, LocalSource) and source.local_name in INPUTS:
        return Binding("input", source.local_name)
    if (isinstance(source, TensorPropertySource) and isinstance(source.base, LocalSource)
            and source.base.local_name in INPUTS and source.prop in (TensorProperty.SIZE, TensorProperty.STRIDE)):
        kind = "size" if source.prop is TensorProperty.SIZE else "stride"
        return Binding(kind, source.base.local_name, int(source.idx))
    if source is None:
        return None
    described = placeholder_source(node)
    if described.kind in ("parameter", "buffer"):
        return Binding(described.kind, described.qualname)
    return None


class CaptureStore:
    """The saved graphs of one structure key (see the module docstring). Held by one generator."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory / key
        self.key = key
        self.graphs: list[SavedGraph] | None = None
        """Read on first use (the directory may gain files from other processes until then)."""

    @classmethod
    def for_model(cls, model: nn.Module, sources: str) -> CaptureStore | None:
        """The store of ``model`` (``sources``: :func:`sources_hash`), or None when the model cannot be keyed."""
        key = structure_key(model, sources)
        if key is None:
            _LOG.debug("graphs of this model are not saved: it has forward hooks or state that cannot be keyed")
            return None
        return cls(_env.cache_dir() / "graphs", key)

    def saved(self) -> list[SavedGraph]:
        """The graphs saved under this key, read once (marks the key as used)."""
        if self.graphs is None:
            self.graphs = []
            if self.directory.is_dir():
                _touch(self.directory)
                now = time.time()
                for stale in self.directory.glob("*.tmp"):
                    if now - _mtime(stale) > _STALE_SECONDS:
                        _forget(stale)
                for path in sorted(self.directory.glob("*.graph")):
                    entry = self._read(path)
                    if entry is not None:
                        self.graphs.append(entry)
        return self.graphs

    def _read(self, path: Path) -> SavedGraph | None:
        try:
            with path.open("rb") as handle:
                header = pickle.load(handle)
                payload = handle.read()
            if header.get("format") != FORMAT or header.get("key") != self.key:
                raise ValueError("written by another version")
            inputs = tuple(InputSpec(*spec) for spec in header["inputs"])
            bindings = tuple(Binding(*b) for b in header["bindings"])
        except Exception as error:  # noqa: BLE001 - any unreadable file is dropped and rebuilt
            _LOG.info("ignoring the saved graph %s (%s): it will be captured again", path, error)
            _forget(path)
            return None
        return SavedGraph(path, inputs, bindings, payload)

    def load(self, entry: SavedGraph) -> fx.GraphModule | None:
        """The graph of ``entry`` with fresh fake values (read once), or None (the file is then deleted)."""
        if entry.graph is not None or entry.refused:
            return entry.graph
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        try:
            mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
            graph = GraphPickler.loads(entry.payload, mode)
            assert isinstance(graph, fx.GraphModule)
            for node, binding in zip(_placeholders(graph), entry.bindings, strict=True):
                node._dynamo_source = _SavedSource(binding)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001
            _LOG.info("ignoring the saved graph %s (%s): it will be captured again", entry.path, error)
            entry.refused = True
            _forget(entry.path)
            return None
        entry.graph = graph
        return graph

    def save(self, graph: fx.GraphModule, example_inputs: Sequence[Any]) -> Path | None:
        """Write ``graph`` (flat, as dynamo captured it for the generator) unless the store is full
        or the graph has something it cannot save; returns the file written."""
        placeholders = _placeholders(graph)
        bindings = [binding_of(node) for node in placeholders]
        output = next(n for n in graph.graph.nodes if n.op == "output")
        if (None in bindings or any(n.op == "get_attr" for n in graph.graph.nodes)
                or not isinstance(output.args[0], (tuple, list)) or len(output.args[0]) != 1):
            # A generator's graph returns the logits alone; a saved graph is called without dynamo,
            # which would rebuild any other output structure.
            _LOG.debug("not saving a graph: a placeholder, constant or output this store cannot bind")
            return None
        inputs = [(b.name, str(example.dtype), tuple(None if isinstance(s, torch.SymInt) else int(s)
                                                     for s in _fake(node).shape))
                  for b, node, example in zip(bindings, placeholders, example_inputs, strict=True)
                  if b is not None and b.kind == "input"]
        if not self.directory.is_dir():
            _evict(self.directory.parent, keep=_MAX_KEYS - 1)
        self.directory.mkdir(parents=True, exist_ok=True)
        if len(list(self.directory.glob("*.graph"))) >= _MAX_GRAPHS:  # before pickling: that is the cost
            return None
        try:
            payload = _pickle_graph(graph)
        except Exception as error:  # noqa: BLE001 - a graph the pickler cannot take is just not saved
            _LOG.debug("not saving a graph: %s", error)
            return None
        header = {"format": FORMAT, "key": self.key, "inputs": inputs,
                  "bindings": [dataclasses.astuple(b) for b in bindings if b is not None]}
        name = hashlib.sha256(payload).hexdigest()[:24] + ".graph"
        target = self.directory / name
        if target.exists():
            return target
        with tempfile.NamedTemporaryFile(dir=self.directory, delete=False, suffix=".tmp") as handle:
            pickle.dump(header, handle)
            handle.write(payload)
        os.replace(handle.name, target)  # atomic: readers see a whole file or none
        return target


@dataclass(frozen=True, slots=True)
class _SavedSource:
    """Stands in for dynamo's source on a loaded placeholder (:func:`hscompile.ir.fx.placeholder_source`
    reads ``.name``)."""

    binding: Binding

    @property
    def name(self) -> str:
        b = self.binding
        if b.kind == "input":
            return f"L['{b.name}']"
        if b.kind in ("size", "stride"):
            return f"L['{b.name}'].{b.kind}()[{b.dim}]"
        # A parameter or buffer path, in the form dynamo names them.
        *modules, leaf = b.name.split(".")
        table = "_parameters" if b.kind == "parameter" else "_buffers"
        return "L['model']" + "".join(f"._modules['{m}']" for m in modules) + f".{table}['{leaf}']"


def _placeholders(graph: fx.GraphModule) -> list[fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "placeholder"]


def _pickle_graph(graph: fx.GraphModule) -> bytes:
    """``graph`` pickled with the metadata the passes read, in a module of its own (no submodules,
    no dynamo state)."""
    from torch.fx._graph_pickler import Options

    # A copy (nodes and metadata): a module built around ``graph.graph`` itself would take it over
    # from the module dynamo handed the backend.
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph.graph, {}))
    clean = fx.GraphModule(nn.Module(), copy)
    return _pickler().dumps(clean, Options(ops_filter=None, node_metadata_key_filter=lambda k: k in _KEEP_META))


def _pickler() -> type:
    """torch's graph pickler, clearing the fake mode of a view's base too (torch clears only the
    view's own, and a fake mode cannot be pickled; the unpickler sets both)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx._graph_pickler import GraphPickler, _TensorPickleData

    class Pickler(GraphPickler):
        def reducer_override(self, obj: object) -> Any:
            if isinstance(obj, FakeTensor):
                data = _TensorPickleData(self._meta_tensor_describer, obj)
                data.metadata = _without_fake_mode(data.metadata)
                return _TensorPickleData.unpickle, (data, self._unpickle_state)
            return super().reducer_override(obj)

    return Pickler


def _without_fake_mode(desc: Any) -> Any:
    base = getattr(desc, "base", None)
    return dataclasses.replace(desc, fake_mode=None, base=None if base is None else _without_fake_mode(base))


def _evict(root: Path, keep: int) -> None:
    """Remove the least recently used key directories under ``root`` beyond ``keep`` (another
    process reading one has its graphs in memory already, or captures them again)."""
    keys = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    for old in sorted(keys, key=_mtime, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _forget(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# -- the key -----------------------------------------------------------------------------------

def structure_key(model: nn.Module, sources: str | None = None) -> str | None:
    """A hash of everything a captured graph of ``model`` depends on (see the module docstring),
    or None when the model has something that cannot be keyed safely. ``sources`` is
    :func:`sources_hash` (computed here when not given)."""
    import transformers

    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            digest.update(repr(part).encode())
            digest.update(b"\0")

    add(FORMAT, sys.version_info[:3], torch.__version__, transformers.__version__, sources or sources_hash(),
        torch.get_default_dtype())  # not grad mode: a generator always captures under no_grad
    if _global_hooks():
        return None
    described: dict[int, str] = {}
    files: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks")):
            return None
        cls = type(module)
        add(path, f"{cls.__module__}.{cls.__qualname__}")
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch.") or klass is object:
                continue
            file = _source_file(klass)
            if file is not None and file not in files:
                files[file] = _file_hash(file) + _namespace_code(klass.__module__)
        for name, value in sorted(vars(module).items()):
            if name in ("_parameters", "_buffers", "_modules", "training", KEPT_ATTRIBUTE) or "hook" in name:
                continue
            text = _describe(value, described, depth=0)
            if text is None:
                return None
            add(name, text)
        for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            add(name, _tensor_layout(tensor), getattr(tensor, "requires_grad", False))
    add(sorted(files.items()))
    return digest.hexdigest()[:32]


_PLAIN = (int, float, str, bool, bytes, type(None), torch.dtype, torch.device)


def _describe(value: object, seen: dict[int, str], depth: int) -> str | None:
    """A text that changes whenever ``value`` could change what dynamo traces, or None."""
    if isinstance(value, _PLAIN) or value is Ellipsis:
        return repr(value)
    if id(value) in seen:
        return seen[id(value)]
    text: str | None
    if isinstance(value, nn.Module):
        text = "module"  # keyed where named_modules reaches it
    elif isinstance(value, torch.Tensor):
        # A plain tensor attribute may be read as a constant: its values are part of the key.
        if value.numel() > 1 << 16 or value.is_meta:
            return None
        data = value.detach().cpu().contiguous()
        text = f"{_tensor_layout(value)}:{hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()}"
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = [_describe(v, seen, depth + 1) for v in (sorted(value, key=repr) if isinstance(value, (set, frozenset))
                                                         else value)]
        text = None if None in items else f"{type(value).__name__}({','.join(items)})"  # type: ignore[arg-type]
    elif isinstance(value, dict):
        items = [(repr(k), _describe(v, seen, depth + 1)) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]
        text = None if any(v is None for _, v in items) else f"dict({items})"
    elif callable(value) and hasattr(value, "__qualname__"):
        text = _function_code(value)
    elif hasattr(value, "to_json_string"):  # a transformers config
        text = value.to_json_string(use_diff=False)
    elif hasattr(value, "__dict__") and depth < 3:
        inner = _describe(vars(value), seen, depth + 1)
        text = None if inner is None else f"{type(value).__module__}.{type(value).__qualname__}{inner}"
    else:
        return None
    if text is not None:
        seen[id(value)] = text
    return text


def _namespace_code(name: str) -> str:
    """What the functions of a model's source module are now, beyond its file: a function replaced
    in its namespace, a method patched on one of its classes, or a function registered in a
    registry it holds (transformers' attention functions) is a new key, as it would be traced anew."""
    module = sys.modules.get(name)
    digest = hashlib.sha256()
    for key, value in sorted(vars(module).items()) if module is not None else ():
        if key.startswith("__") or isinstance(value, types.ModuleType):
            continue
        if isinstance(value, type):
            text = f"{value.__module__}.{value.__qualname__}"
            if value.__module__ == name:
                text += repr(_functions(vars(value)))
        elif isinstance(value, types.FunctionType):
            text = _function_code(value)
        else:
            # A registry (a dict of functions, or an object holding such dicts): its functions only;
            # other state (a logger's caches) changes as it is used and would only miss the cache.
            tables = [value] if isinstance(value, dict) else [
                v for v in (*getattr(value, "__dict__", {}).values(), *vars(type(value)).values())
                if isinstance(v, dict)]
            found = [_functions(table) for table in tables]
            if not any(found):
                continue
            text = repr(found)
        digest.update(f"{key}={text}\0".encode())
    return digest.hexdigest()[:16]


def _functions(table: dict) -> list[tuple[str, str]]:
    return sorted((str(k), _function_code(v)) for k, v in table.items()
                  if isinstance(v, (types.FunctionType, staticmethod, classmethod, property)))


def _function_code(value: object) -> str:
    function = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
    code = getattr(function, "__code__", None)
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"
    return name if code is None else f"{name}:{_code_hash(code)}"


def _code_hash(code: types.CodeType) -> str:
    """A hash of what ``code`` does, the same in every process (a nested function's code object
    would show its address in a plain ``repr`` of the constants)."""
    return hashlib.sha256(code.co_code + repr((_stable(code.co_consts), code.co_names)).encode()).hexdigest()[:16]


def _stable(value: object) -> str:
    """``repr(value)`` for a code constant, the same in every process: nested code by its hash, and
    sets sorted (their order follows string hashing, which differs between processes)."""
    if isinstance(value, types.CodeType):
        return _code_hash(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_stable(v) for v in value) + ")"
    if isinstance(value, frozenset):
        return "frozenset(" + ",".join(sorted(_stable(v) for v in value)) + ")"
    return repr(value)


def _tensor_layout(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)}/{tuple(tensor.stride())}/{tensor.dtype}/{tensor.device}"


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def _source_file(klass: type) -> str | None:
    module = sys.modules.get(klass.__module__)
    file = getattr(module, "__file__", None)
    return file if file and os.path.exists(file) else None


def _file_hash(file: str) -> str:
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


def sources_hash() -> str:
    """hscompile's own Python sources (a development checkout changes without a version bump)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
