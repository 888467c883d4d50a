"""Plan a model without running it: what ``hscompile inspect PATH`` does.

The model is built from its config on the meta device (no weights are read, nothing is
allocated), captured by dynamo, and taken through every pass but lowering: the result shows
the plan, the placement under a device budget and the schedule a real run would execute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from .backend import compile_graph
from .config import HybridServeConfig
from .errors import ConfigError
from .inspection import Inspection, inspect

__all__ = ["load_config", "plan_model"]


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    """A model config from a ``config.json`` file or a local checkpoint directory (never downloaded)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; give a config.json file or a checkpoint directory")
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a config.json file or a local checkpoint directory")
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{path} has no 'model_type'; it is not a transformers config")
    return transformers.AutoConfig.for_model(model_type, **data)


def _dtype(config: transformers.PretrainedConfig, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; expected float32, float16 or bfloat16")
    return value


def plan_model(
    source: str | Path | transformers.PretrainedConfig,
    *,
    batch: int = 1,
    seq: int = 512,
    dtype: str | torch.dtype | None = None,
    options: Mapping[str, Any] | None = None,
) -> Inspection:
    """Plan ``source`` (a config, a ``config.json`` or a checkpoint directory) for ``batch`` x ``seq`` tokens.

    ``options`` are the backend options; ``device`` may name a device this machine lacks.
    """
    config = source if isinstance(source, transformers.PretrainedConfig) else load_config(source)
    config.use_cache = False
    hs_config = HybridServeConfig.from_options(options, check_device=False)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=_dtype(config, dtype)).eval()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    captured: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Any:
        captured.append((gm, list(example_inputs)))
        return gm.forward  # runs on meta tensors: shapes only, no compute

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(ids)
    gm, example_inputs = captured[-1]
    return inspect(compile_graph(gm, example_inputs, hs_config, plan_only=True))
