"""Load a local Hugging Face checkpoint for generation: config, safetensors weights, tokenizer.

:func:`from_pretrained` owns what a checkpoint directory may hold and what it must not:

- ``config.json`` (a JSON object with a ``model_type`` transformers has a causal LM for);
- ``model.safetensors``, or shards listed by ``model.safetensors.index.json``; pickle
  checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused, since loading them runs code;
- a tokenizer (``tokenizer.json``, ``tokenizer.model`` or ``tokenizer_config.json``), optional.

Every problem is a :class:`~hscompile.errors.CheckpointError` raised before any generation, naming
the file and what would be valid. Nothing is downloaded (``local_files_only``) and no code from
the checkpoint runs (``trust_remote_code`` is never set). The weights are read from the
safetensors files (plain reads, no memory map) straight into their final host buffers: each
decoder layer's into one packed buffer laid out as the host store streams it, so the compiled
model adopts those buffers and the weights are held once, never twice (:func:`load_model`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from ._env import offload_dir
from .errors import CheckpointError, ConfigError
from .ir.layout import DISK_SLOTS, HOST_WEIGHTS_ATTR, disk_extents, map_file, read_bytes, staging_bytes
from .runtime.disk import offload_file, offload_source

if TYPE_CHECKING:
    from .ir.layout import GroupLayout
    from .planner.budget import HostBudget

__all__ = ["Checkpoint", "from_pretrained", "read_checkpoint"]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint directory holds, checked (see :func:`read_checkpoint`)."""

    path: Path
    config: dict[str, Any]
    """``config.json`` as read."""
    weight_files: tuple[Path, ...]
    """The safetensors files, one or the shards of the index."""
    has_tokenizer: bool

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files on disk."""
        return sum(f.stat().st_size for f in self.weight_files)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Check a checkpoint directory before anything is loaded; see the module docstring."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root} does not exist; give a local checkpoint directory (config.json + model.safetensors)")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; give a local checkpoint directory (config.json + model.safetensors)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root} has no config.json; a checkpoint directory holds config.json and model.safetensors")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(config).__name__}; a config is a JSON object")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{config_path} has no 'model_type'; it is not a transformers config")
    _check_model_type(config_path, config)
    from .generation.validation import check_experts, check_not_prequantized

    check_not_prequantized(config.get("quantization_config"), f"the checkpoint {root}")
    check_experts(config, str(config_path))
    index = root / WEIGHTS_INDEX
    if (root / WEIGHTS).is_file():
        files: tuple[Path, ...] = (root / WEIGHTS,)
    elif index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' naming the shard of each weight")
        files = tuple(root / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {root}: {', '.join(missing)}")
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{root} holds pickle weights ({', '.join(pickles)}), which hscompile does not load: loading a "
                "pickle runs arbitrary code. Convert them to safetensors once, e.g. with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir) (safetensors is its default)"
            )
        raise CheckpointError(f"{root} has no {WEIGHTS} or {WEIGHTS_INDEX}; give a checkpoint with safetensors weights")
    has_tokenizer = any((root / name).is_file() for name in TOKENIZER_FILES)
    return Checkpoint(path=root, config=config, weight_files=files, has_tokenizer=has_tokenizer)


def _check_model_type(config_path: Path, config: Mapping[str, Any]) -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        remote = " It asks for code of its own (auto_map), which hscompile never runs." if "auto_map" in config else ""
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} has no causal LM in transformers "
            f"{transformers.__version__}.{remote} Supported decoders include llama, mistral, qwen2, opt, gpt2"
        )


def _causal_lm_config(checkpoint: Checkpoint) -> Any:
    import transformers

    model_type = checkpoint.config["model_type"]
    try:
        return transformers.AutoConfig.from_pretrained(str(checkpoint.path), local_files_only=True)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise CheckpointError(f"{checkpoint.path / 'config.json'} is not a valid {model_type} config: {error}") from None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A requested weights dtype, checked (None, the checkpoint's own, is resolved from its files)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)} (or None for the checkpoint's), got {dtype!r}")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True, slots=True)
class _Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _tensor_index(checkpoint: Checkpoint) -> dict[str, _Stored]:
    """Every tensor of the checkpoint, read from the safetensors headers (8-byte length + JSON)."""
    index: dict[str, _Stored] = {}
    for file in checkpoint.weight_files:
        try:
            with file.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 0 < length < 100 * 2**20:
                    raise ValueError(f"a header of {length} bytes")
                header = json.loads(handle.read(length))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file} is not a safetensors file ({error})") from None
        base = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = entry["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: tensor {name!r} has a header hscompile cannot read ({entry!r})"[:300]) from None
            index[name] = _Stored(file=file, start=base + begin, nbytes=end - begin, dtype=dtype, shape=shape)
    return index


_LAYER_NAME = re.compile(r"^(.+?)\.(\d+)\.(.+)$")


def _layers(names: Sequence[str]) -> dict[str, dict[int, list[str]]]:
    """The tensors of the repeated layers: ``{container: {index: [local names]}}`` for the container
    (``model.layers``) with the most numbered children; the rest are the model's global tensors."""
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = _LAYER_NAME.match(name)
        if match:
            found.setdefault(match.group(1), {}).setdefault(int(match.group(2)), []).append(match.group(3))
    if not found:
        return {}
    container = max(found, key=lambda c: len(found[c]))
    return {container: found[container]} if len(found[container]) > 1 else {}


class _Ref:
    """What :func:`~hscompile.ir.layout.layout_group` reads of a weight."""

    __slots__ = ("node", "shape", "dtype", "nbytes")

    def __init__(self, node: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.node, self.shape, self.dtype = node, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize


def _read_into(handle: BinaryIO, stored: _Stored, out: torch.Tensor) -> None:
    """Read a stored tensor from its open file into ``out`` (contiguous, its shape): straight into
    ``out``'s bytes when the dtypes agree, else through a temporary in the file's dtype."""
    target = out if out.dtype == stored.dtype else torch.empty(stored.shape, dtype=stored.dtype)
    raw = target.reshape(-1).view(torch.uint8)  # contiguous: a view of the same bytes
    handle.seek(stored.start)
    if handle.readinto(memoryview(raw.numpy())) != stored.nbytes:
        raise CheckpointError(f"{stored.file} ends before the tensor at byte {stored.start}; the file is truncated")
    if target is not out:
        out.copy_(target)


def _state_dict(checkpoint: Checkpoint, dtype: torch.dtype | None, pin: bool, budget: HostBudget | None = None,
                offload: Path | None = None) -> tuple[dict[str, torch.Tensor], torch.dtype, int]:
    """The checkpoint's tensors, each layer's packed into one host buffer (see :func:`load_model`),
    or mapped from its file when the host ``budget`` cannot hold it (decided from the files' headers
    first: nothing is allocated before). Also returns the host bytes given to the weights when
    layers stay on disk (else 0)."""
    from .planner.budget import host_layers

    index = _tensor_index(checkpoint)
    floats = {s.dtype for s in index.values() if s.dtype.is_floating_point}
    if dtype is None:
        declared = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype")
        dtype = DTYPES.get(str(declared).removeprefix("torch.")) if declared else None
        if dtype is None:
            dtype = floats.pop() if len(floats) == 1 else torch.float32

    def target(stored: _Stored) -> torch.dtype:
        return dtype if stored.dtype.is_floating_point else stored.dtype

    layouts = _layer_layouts(index, target)
    packed = {prefix + weight.node for prefix, layout in layouts for weight in layout.weights}
    outside = sum(math.prod(s.shape) * target(s).itemsize for name, s in index.items() if name not in packed)
    mappable = [_mappable([index[prefix + w.node] for w in layout.weights], target) for prefix, layout in layouts]

    def layer_staging(prefix: str, layout: GroupLayout, as_stored: bool) -> int:
        if not as_stored:  # read from its converted copy, packed as the layout says
            return read_bytes(layout.nbytes)
        return staging_bytes(disk_extents([(str(index[prefix + w.node].file), index[prefix + w.node].start,
                                            index[prefix + w.node].nbytes) for w in layout.weights]))

    staging = DISK_SLOTS * max((layer_staging(p, lay, m) for (p, lay), m in zip(layouts, mappable, strict=True)),
                               default=0)
    held = host_layers([layout.nbytes for _, layout in layouts], outside, budget, staging=staging,
                       what=f"the checkpoint {checkpoint.path}")
    on_disk = layouts[held:]
    state: dict[str, torch.Tensor] = {}
    files = contextlib.ExitStack()
    handles = {f: files.enter_context(f.open("rb")) for f in checkpoint.weight_files}  # one open per file

    def read(stored: _Stored, out: torch.Tensor) -> None:
        _read_into(handles[stored.file], stored, out)

    with files:
        _read_layers(index, layouts[:held], pin, read, state)
        maps: dict[Path, torch.UntypedStorage] = {}
        for (prefix, layout), as_stored in zip(on_disk, mappable[held:], strict=True):
            if as_stored:
                _map_layer(index, prefix, layout, state, maps)
            else:
                _convert_layer(index, prefix, layout, dtype, offload or offload_dir(None), read, state)
        for name, stored in index.items():
            if name not in state:
                tensor = torch.empty(stored.shape, dtype=target(stored))
                read(stored, tensor)
                state[name] = tensor
    host_weights = 0
    if on_disk:
        host_weights = outside + sum(layout.nbytes for _, layout in layouts[:held]) + staging
    return state, dtype, host_weights


def _mappable(tensors: Sequence[_Stored], target: Any) -> bool:
    """Whether a layer kept on disk can be read as the file holds it: in the dtype it runs in, each
    tensor at an offset aligned to its element (safetensors writers align them). Else it is
    converted once into the offload directory (:func:`_convert_layer`)."""
    return all(target(s) == s.dtype and s.start % s.dtype.itemsize == 0 for s in tensors)


def _map_layer(index: dict[str, _Stored], prefix: str, layout: GroupLayout, state: dict[str, torch.Tensor],
               maps: dict[Path, torch.UntypedStorage]) -> None:
    """Each tensor of a layer as a view of its file's memory map (one map per file, in ``maps``):
    nothing is read (the weight store reads layers on disk with direct reads, :mod:`hscompile.runtime.disk`)."""
    for weight in layout.weights:
        stored = index[prefix + weight.node]
        if stored.file not in maps:
            maps[stored.file] = map_file(str(stored.file), stored.file.stat().st_size)
        state[prefix + weight.node] = _view(maps[stored.file], stored.start, stored.dtype, stored.shape)


def _convert_layer(index: dict[str, _Stored], prefix: str, layout: GroupLayout, dtype: torch.dtype, directory: Path,
                   read: Any, state: dict[str, torch.Tensor]) -> None:
    """A layer kept on disk whose file holds it otherwise (another dtype): converted once into a file
    of ``directory`` packed as ``layout`` (keyed by the sources and their files' sizes and times, so
    a changed checkpoint gets a new one), and mapped from there. One layer is in memory at a time."""
    tensors = [index[prefix + w.node] for w in layout.weights]
    identity = {"converted": str(dtype), "layout": [[w.node, w.offset, w.nbytes, str(w.dtype)] for w in layout.weights],
                "sources": [offload_source(s.file, s.start, s.nbytes, s.dtype, s.shape) for s in tensors]}

    def fill(flat: torch.Tensor) -> None:
        for weight, stored in zip(layout.weights, tensors, strict=True):
            read(stored, flat.narrow(0, weight.offset, weight.nbytes).view(weight.dtype).view(weight.shape))

    path = offload_file(directory, identity, layout.nbytes, fill)
    storage = map_file(str(path), layout.nbytes)
    for weight in layout.weights:
        state[prefix + weight.node] = _view(storage, weight.offset, weight.dtype, weight.shape)


def _view(storage: torch.UntypedStorage, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` at byte ``offset`` (a multiple of the element) of ``storage``."""
    return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, tuple(shape))


def _layer_layouts(index: dict[str, _Stored], target: Any) -> list[tuple[str, GroupLayout]]:
    """``(name prefix, layout)`` of each repeated layer, in order: its tensors (in ``target``'s
    dtypes) packed as the host store streams a layer (``placement.group_layouts``: by local
    name, aligned). Reads no weight and allocates nothing."""
    from .ir.layout import layout_group

    layouts = []
    for container, layers in _layers(list(index)).items():
        for number, local in sorted(layers.items()):
            prefix = f"{container}.{number}."
            refs = [_Ref(name, index[prefix + name].shape, target(index[prefix + name])) for name in sorted(local)]
            layouts.append((prefix, layout_group(number, refs)))
    return layouts


def _read_layers(index: dict[str, _Stored], layouts: Sequence[tuple[str, GroupLayout]], pin: bool, read: Any,
                 state: dict[str, torch.Tensor]) -> None:
    """Each repeated layer's tensors into one packed host buffer laid out as ``layouts`` say; fills ``state``."""
    for prefix, layout in layouts:
        # Pinned on CUDA: the host store copies streamed layers from here asynchronously.
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        for packed in layout.weights:
            view = flat.narrow(0, packed.offset, packed.nbytes).view(packed.dtype).view(packed.shape)
            read(index[prefix + packed.node], view)
            state[prefix + packed.node] = view


def load_model(checkpoint: Checkpoint, dtype: str | torch.dtype | None = None, *, pin: bool = False,
               budget: HostBudget | None = None, offload: Path | None = None) -> torch.nn.Module:
    """The checkpoint's causal LM on the host, in eval mode, its weights checked against its config.

    The weights are read from the safetensors files straight into their final place: each
    decoder layer's tensors into one packed host buffer laid out as the host store lays out a
    streamed layer (``placement.group_layouts``: by name, aligned), pinned when ``pin``; the
    other tensors into tensors of their own. transformers builds the model around those tensors
    without copying them, and the compiled model's host store adopts the packed buffers: the
    weights are held once, from the files to the device. A layer whose layout the plan lays out
    differently is copied once more when compiled (correct, only more memory).

    Layers the host ``budget`` cannot hold (:func:`~hscompile.planner.budget.host_layers`, decided
    from the files' headers before anything is allocated) stay on disk: their tensors are views of
    the files' memory maps, which nothing touches (the weight store reads them with direct reads);
    a layer the file holds in another dtype is converted once into ``offload`` (default: the
    ``offload_dir`` default) and mapped from there.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _causal_lm_config(checkpoint)
    state, resolved, host_weights = _state_dict(checkpoint, None if dtype is None else _dtype(dtype), pin, budget,
                                                offload)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    try:
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state, dtype=resolved, output_loading_info=True, attn_implementation="sdpa",
        )
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, OSError) as error:  # e.g. a weight whose shape differs from the config's
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"the weights in {checkpoint.path} do not match its config.json: {first}") from None
    del state
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        said = "; ".join(f"{key.replace('_', ' ')}: {', '.join(map(str, names[:5]))}"
                         f"{f' (+{len(names) - 5} more)' if len(names) > 5 else ''}" for key, names in problems.items())
        raise CheckpointError(f"the weights in {checkpoint.path} do not match its config.json ({said})")
    if (checkpoint.path / "generation_config.json").is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(checkpoint.path), local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"{checkpoint.path / 'generation_config.json'} cannot be read: {error}") from None
    if host_weights:
        setattr(model, HOST_WEIGHTS_ATTR, host_weights)
    return model.eval()


def check_offload_dir(option: str | None, checkpoint: Path) -> Path:
    """The offload directory (:func:`~hscompile._env.offload_dir`), checked before any work: not
    inside the checkpoint (converted layers are never written among its files); when given, an
    existing, writable directory (the default is made when first needed)."""
    directory = offload_dir(option)
    resolved, root = directory.resolve(), checkpoint.resolve()
    if resolved == root or root in resolved.parents:
        raise ConfigError(f"offload_dir {directory} is inside the checkpoint directory {checkpoint}: converted layers "
                          "are never written among a checkpoint's files; give a directory outside it")
    if option is not None:
        if not directory.is_dir():
            raise ConfigError(f"offload_dir {directory} does not exist or is not a directory; create it, or leave "
                              f"offload_dir unset (default: {offload_dir(None)})")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"offload_dir {directory} is not writable by this user; give a directory hscompile may "
                              "write converted layers to")
    return directory


def load_tokenizer(checkpoint: Checkpoint) -> Any | None:
    """The checkpoint's tokenizer, padding on the left (as batched generation needs), or None."""
    if not checkpoint.has_tokenizer:
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"the tokenizer in {checkpoint.path} cannot be loaded: {error}") from None
    tokenizer.padding_side = "left"
    return tokenizer


def from_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    options: Mapping[str, object] | None = None,
) -> Any:
    """A :class:`~hscompile.Generator` for a local checkpoint directory (compiled on first use).

    ``dtype`` is ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default: the checkpoint's own);
    ``options`` are the backend options (``device``, ``device_memory``, ``act_ratio``, ...). The
    generator has ``.model`` and ``.tokenizer`` (None when the checkpoint has none: then only
    token ids can be generated).

    >>> generator = hscompile.from_pretrained("path/to/checkpoint", options={"device_memory": "4GiB"})  # doctest: +SKIP
    >>> generator.generate_text(["The capital of France is"], max_new_tokens=8)[0].text  # doctest: +SKIP
    """
    from .config import HybridServeConfig
    from .generation import Generator
    from .planner.budget import HostBudget, machine_budget

    checkpoint = read_checkpoint(path)
    config = HybridServeConfig.from_options(options)  # bad options fail before the weights are read
    offload = check_offload_dir(config.memory.offload_dir, checkpoint.path)
    tokenizer = load_tokenizer(checkpoint)
    host = config.memory.host_memory
    budget = HostBudget(host, option=True) if host is not None else machine_budget()
    model = load_model(checkpoint, dtype, pin=config.device.type == "cuda", budget=budget, offload=offload)
    return Generator(model, options, tokenizer=tokenizer)
