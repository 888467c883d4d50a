"""Plan a model without running it: what ``hscompile inspect PATH`` does.

The model is built from its config on the meta device (no weights are read, nothing is
allocated), captured by dynamo, and taken through every pass but lowering: the result shows the
plan, the placement under a device budget and the schedule a real run would execute. Weights
larger than the host budget (``host_memory``, else what this machine has available) are planned
as ``from_pretrained`` would load them: the layers past what the budget keeps are marked as on disk
(:func:`plan_disk_layers`), and placement plans them as read at every step.
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
from .generation.regions import repeated_layers
from .generation.validation import check_experts
from .inspection import Inspection, inspect
from .ir.cache import max_positions
from .ir.layout import DISK_SLOTS, plan_on_disk, read_bytes
from .planner.budget import HostBudget, check_host_weights, host_layers, machine_budget
from .planner.cost_model import ModelDims

__all__ = ["check_config", "check_host_weights_of", "check_positions", "load_config", "max_positions",
           "plan_disk_layers", "plan_model", "weights_dtype"]


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    """A model config from a ``config.json`` file or a local checkpoint directory (never downloaded),
    its core sizes checked (:func:`check_config`) before any model is built from it."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; give a config.json file or a checkpoint directory")
        file = path / "config.json"
    elif path.is_file():
        file = path
    else:
        raise ConfigError(f"{path} does not exist; give a config.json file or a local checkpoint directory")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); a config is a JSON object") from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise ConfigError(f"{file} holds a JSON {kind}; a config is a JSON object")
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(f"{file} has no 'model_type'; it is not a transformers config")
    if model_type not in transformers.CONFIG_MAPPING:  # a lazy mapping: its .get() finds nothing
        raise ConfigError(f"{file}: model_type {model_type!r} is not one transformers {transformers.__version__} "
                          "knows; decoders it knows include llama, mistral, qwen2, opt, gpt2")
    # Before transformers sees them: its configs divide by some of these sizes.
    check_config(data, str(file), aliases=transformers.CONFIG_MAPPING[model_type].attribute_map)
    try:
        if path.is_dir():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        else:
            config = transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError, OSError, ArithmeticError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{file} is not a valid {model_type} config: {first}") from None
    check_config(config, str(file))
    return config


_JSON_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}

_POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "max_position_embeddings")
"""The sizes :func:`check_config` requires to be integers >= 1 where a config has them (and ``head_dim``)."""


def check_config(config: transformers.PretrainedConfig | Mapping[str, Any], where: str = "the config", *,
                 aliases: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming the key if a core size of ``config`` is not valid: each of
    ``_POSITIVE_SIZES`` it has must be an integer >= 1, ``hidden_size`` a multiple of
    ``num_attention_heads`` (unless the config gives a ``head_dim`` of its own) and
    ``num_attention_heads`` a multiple of ``num_key_value_heads``.

    ``config`` is a transformers config, or the ``config.json`` dict it is made from (with
    ``aliases``, the config class's ``attribute_map``: gpt2's ``n_embd`` is ``hidden_size``).
    Sizes a config lacks are not checked; ``where`` names it in the message."""
    if isinstance(config, Mapping):
        names = dict(aliases or {})

        def get(name: str) -> Any:
            return config.get(names.get(name, name), config.get(name))
    else:
        names = dict(type(config).attribute_map)

        def get(name: str) -> Any:
            return getattr(config, name, None)

    sizes: dict[str, int] = {}
    for name in _POSITIVE_SIZES:
        value = get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: {names.get(name, name)} must be an integer >= 1, got {value!r}")
        sizes[name] = value
    hidden, heads, kv_heads = (sizes.get(n) for n in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = get("head_dim")
    # transformers fills head_dim with hidden // heads where a config.json gives none: that one is not the config's own.
    own_head_dim = head_dim is not None and (hidden is None or heads is None or head_dim != hidden // heads)
    if hidden and heads and hidden % heads and not own_head_dim:
        raise ConfigError(f"{where}: {names.get('hidden_size', 'hidden_size')} {hidden} is not a multiple of "
                          f"{names.get('num_attention_heads', 'num_attention_heads')} {heads}; give sizes where it is "
                          "(or the head_dim of the model)")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"{where}: {names.get('num_attention_heads', 'num_attention_heads')} {heads} is not a "
                          f"multiple of num_key_value_heads {kv_heads}; each K/V head serves a whole group of heads")
    if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1):
        raise ConfigError(f"{where}: head_dim must be an integer >= 1, got {head_dim!r}")
    check_experts(dict(config) if isinstance(config, Mapping) else config, where)


def check_positions(config: transformers.PretrainedConfig, tokens: int, what: str, where: str = "the config") -> None:
    """Raise :class:`ConfigError` if ``tokens`` positions (``what`` names where they come from) are
    more than a model of ``config`` takes."""
    found = max_positions(config)
    if found is not None and tokens > found[0]:
        limit, key = found
        raise ConfigError(f"{what} is {tokens} positions, more than the model's maximum of {limit} ({key} in {where}); "
                          f"give at most {limit}")


def weights_dtype(config: transformers.PretrainedConfig, dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` (a name or a torch dtype), else the config's own, else float32; only float dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"unknown dtype {name!r}; expected float32, float16 or bfloat16")
    return value


def check_host_weights_of(model: torch.nn.Module, config: HybridServeConfig) -> None:
    """Refuse ``model`` (built on the meta device: nothing allocated) when a layer of its weights,
    or all of them, cannot fit the memory this machine has available
    (:func:`~hscompile.planner.budget.check_host_weights`), where ``config`` plans a run on this
    machine: a plan for a device this machine lacks is for another machine, whose memory is not known."""
    device = config.device
    here = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    budget = machine_budget() if here else None
    dims = ModelDims.from_model(model)
    what = f"a {type(model).__name__} of {dims.layers} layers, hidden size {dims.hidden}, {dims.dtype}"
    check_host_weights([dims.layer_weight_bytes] * dims.layers, dims.global_weight_bytes, budget, what=what)


def plan_disk_layers(model: torch.nn.Module, config: HybridServeConfig) -> int:
    """How many layers of ``model`` (built on the meta device) a loader would leave on disk under
    the host budget (``host_memory``, else this machine's available memory where ``config`` plans a
    run on this machine): the split :func:`~hscompile.planner.budget.host_layers` makes for
    ``from_pretrained``, from the layers' sizes alone. Their weights are marked as on disk
    (:func:`~hscompile.ir.layout.plan_on_disk`), laid out one after another as a checkpoint holds
    them. A budget too small even for the disk tier is a
    :class:`~hscompile.errors.BudgetError` giving the minimum."""
    device = config.device
    here = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    budget = (HostBudget(config.memory.host_memory, option=True) if config.memory.host_memory is not None
              else machine_budget() if here else None)
    containers = repeated_layers(model)
    if budget is None or not containers:
        return 0
    layers = containers[0]
    layer_bytes = [sum(p.nbytes for p in layer.parameters()) for layer in layers]
    global_bytes = sum(p.nbytes for p in model.parameters()) - sum(layer_bytes)
    dims = ModelDims.from_model(model)
    what = f"a {type(model).__name__} of {dims.layers} layers, hidden size {dims.hidden}, {dims.dtype}"
    held = host_layers(layer_bytes, global_bytes, budget, staging=DISK_SLOTS * read_bytes(max(layer_bytes)), what=what)
    offset = 0
    for layer in layers[held:]:
        for parameter in layer.parameters():
            offset += -offset % parameter.element_size()
            plan_on_disk(parameter, "(the checkpoint's files)", offset)
            offset += parameter.nbytes
    return len(layers) - held


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
    check_config(config)
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    check_positions(config, seq, f"seq {seq}")
    config.use_cache = False
    hs_config = HybridServeConfig.from_options(options, check_device=False)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=weights_dtype(config, dtype)).eval()
    plan_disk_layers(model, hs_config)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    captured: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Any:
        captured.append((gm, list(example_inputs)))
        return gm.forward  # runs on meta tensors: shapes only, no compute

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(ids)
    gm, example_inputs = captured[-1]
    return inspect(compile_graph(gm, example_inputs, hs_config, plan_only=True))
