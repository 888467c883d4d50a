"""Load a local Hugging Face checkpoint for generation: config, safetensors weights, tokenizer.

:func:`from_pretrained` owns what a checkpoint directory may hold and what it must not:

- ``config.json`` (a JSON object with a ``model_type`` transformers has a causal LM for);
- ``model.safetensors``, or shards listed by ``model.safetensors.index.json``; pickle
  checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused, since loading them runs code;
- a tokenizer (``tokenizer.json``, ``tokenizer.model`` or ``tokenizer_config.json``), optional.

Every problem is a :class:`~hscompile.errors.CheckpointError` raised before any generation, naming
the file and what would be valid. Nothing is downloaded (``local_files_only``) and no code from
the checkpoint runs (``trust_remote_code`` is never set). The weights are read by transformers
from the memory-mapped safetensors files into the model once; when the model is compiled, the
layers that stream are moved into one packed host buffer each and their parameters re-pointed
there (:mod:`hscompile.runtime.weights`), so the weights are held once, never twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

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


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"  # the checkpoint's own
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)} (or None for the checkpoint's), got {dtype!r}")


def load_model(checkpoint: Checkpoint, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The checkpoint's causal LM on the host, in eval mode, its weights checked against its config."""
    import transformers

    config = _causal_lm_config(checkpoint)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint.path), config=config, dtype=_dtype(dtype), local_files_only=True, use_safetensors=True,
            output_loading_info=True, attn_implementation="sdpa",
        )
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, OSError) as error:  # e.g. a weight whose shape differs from the config's
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"the weights in {checkpoint.path} do not match its config.json: {first}") from None
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        said = "; ".join(f"{key.replace('_', ' ')}: {', '.join(map(str, names[:5]))}"
                         f"{f' (+{len(names) - 5} more)' if len(names) > 5 else ''}" for key, names in problems.items())
        raise CheckpointError(f"the weights in {checkpoint.path} do not match its config.json ({said})")
    return model.eval()


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

    checkpoint = read_checkpoint(path)
    HybridServeConfig.from_options(options)  # bad options fail before the weights are read
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, dtype)
    return Generator(model, options, tokenizer=tokenizer)
