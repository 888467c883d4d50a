"""The eager reference of a quantized model: what hscompile's quantized weights stand for.

:func:`reference` returns a copy of a model whose quantized weights (see
:mod:`hscompile.ir.quant`: the two-dimensional weights of its decoder layers) are replaced by
their quantize -> dequantize round trip. transformers' own ``generate`` on that copy is the
exact reference of a generation that moves the same weights quantized: tests compare greedy
tokens with it token for token, and its logits against the unquantized model's measure what
quantization costs. :func:`reference_cache` is the same for ``cache_quant``: a transformers
cache whose stored K/V make the round trip of int8 cache blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError
from .generation.regions import repeated_layers
from .ir.cache import ConfigDims, checkpoint_tokens
from .ir.quant import DEFAULT_GROUP_SIZE, is_quantized_weight, weight_scheme
from .ops.quant import dequantize, dequantize_rows, quantize, quantize_rows

__all__ = ["act_tokens_of", "decoder_layers", "quantized_weight_names", "reference", "reference_cache"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, as hscompile's analysis finds them: the module list as long as
    the config's layer count (a one-layer model's list repeats nothing), else the repeated layers."""
    count = ConfigDims.of(model.config).layers if hasattr(model, "config") else None
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if lists:
        return list(lists[0])
    return [layer for found in repeated_layers(model) for layer in found]


def quantized_weight_names(model: torch.nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the weights a quantized ``model`` stores quantized."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = []
    for layer in decoder_layers(model):
        for p in layer.parameters():
            if is_quantized_weight(tuple(p.shape), p.dtype, in_layer=True):
                found.append(names[id(p)])
    return found


@torch.no_grad()
def reference(model: torch.nn.Module, *, weight_quant: str = "int8",
              quant_group_size: int = DEFAULT_GROUP_SIZE) -> torch.nn.Module:
    """A deep copy of ``model`` whose quantized weights are their ``weight_quant`` round trip.

    Every other parameter and buffer is copied unchanged. A group size that does not divide a
    weight's last dimension is refused naming the weight and the sizes that would divide it.
    """
    scheme = weight_scheme(weight_quant, quant_group_size)
    names = quantized_weight_names(model)
    out = copy.deepcopy(model)
    if scheme is None:
        return out
    for name in names:
        scheme.check(name, tuple(out.get_parameter(name).shape))
    for name in names:
        weight = out.get_parameter(name)
        weight.copy_(dequantize(quantize(weight, scheme, name)))
    return out


def _round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` through an int8 cache block: one scale per row of its last dimension (a head's K or V)."""
    d = x.shape[-1]
    return dequantize_rows(quantize_rows(x.reshape(-1, d), d), (d,), d, x.dtype).reshape(x.shape)


def reference_cache(model: torch.nn.Module, *, cache_quant: str = "int8", checkpoints: bool = False,
                    act_tokens: Sequence[int] | None = None, pads: Sequence[int] | None = None) -> Any:
    """A transformers cache for ``model.generate(..., past_key_values=...)`` that keeps every past
    token as an int8 cache block would (``cache_quant="int8"``): attention reads the new tokens'
    own K/V and, for the past, what hscompile's cache gives back. For a token of a KV block that
    is the round trip of its K/V; for a token of an ACT block, the K/V the layer computes from the
    round trip of its input hidden state: the layer is run again on it, by its own code, until its
    attention hands K/V to the cache.

    Which tokens are ACT: all (``checkpoints=True``, ``act_ratio=1``), none (the default,
    ``act_ratio=0``), or per batch row the first ``act_tokens[r]`` real tokens (hscompile's block
    split, :func:`act_tokens_of`), after ``pads[r]`` left-padding positions.

    The cache must serve one ``generate`` call of ``model``; hooks on the decoder layers record
    their inputs while it is used."""
    import transformers

    if cache_quant != "int8":
        raise ConfigError(f"reference_cache: cache_quant must be 'int8', got {cache_quant!r}")
    layers = decoder_layers(model)
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    class _Captured(Exception):
        def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
            self.key, self.value = key, value

    class _Capture(transformers.DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise _Captured(key_states, value_states)

    class RoundTripCache(transformers.DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            n = key_states.shape[-2]
            act = self._act_mask(layer_idx, key_states)  # (batch, n): which new tokens are checkpoints
            stored_key, stored_value = _round_trip(key_states), _round_trip(value_states)
            if bool(act.any()):
                key_act, value_act = self._from_checkpoint(layer_idx)
                where = act[:, None, :, None]
                stored_key = torch.where(where, key_act, stored_key)
                stored_value = torch.where(where, value_act, stored_value)
            keys, values = super().update(stored_key, stored_value, layer_idx, *args, **kwargs)
            return (torch.cat((keys[..., :-n, :], key_states), dim=-2),
                    torch.cat((values[..., :-n, :], value_states), dim=-2))

        def _act_mask(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
            batch, n = key_states.shape[0], key_states.shape[-2]
            if act_tokens is None:
                return torch.full((batch, n), checkpoints, dtype=torch.bool)
            start = self.get_seq_length(layer_idx) if len(self.layers) > layer_idx else 0
            real = torch.arange(start, start + n).unsqueeze(0) - torch.tensor(pads or [0] * batch).unsqueeze(1)
            return (real >= 0) & (real < torch.tensor(list(act_tokens)).unsqueeze(1))

        def _from_checkpoint(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
            args, kwargs = inputs[layer_idx]
            hidden = _round_trip_rows(args[0] if args else kwargs["hidden_states"])
            capture = _Capture(config=model.config)
            args = (hidden, *(capture if a is self else a for a in args[1:])) if args else args
            kwargs = {k: (capture if v is self else v) for k, v in kwargs.items()}
            if not args:
                kwargs["hidden_states"] = hidden
            try:
                layers[layer_idx](*args, **kwargs)
            except _Captured as captured:
                return captured.key, captured.value
            raise RuntimeError(f"layer {layer_idx} did not hand its K/V to the cache")

    def record(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not any(isinstance(v, _Capture) for v in kwargs.values()):
                inputs[index] = (args, kwargs)
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(record(index), with_kwargs=True)
    return RoundTripCache(config=model.config)


def act_tokens_of(lengths: Sequence[int], max_new_tokens: int, act_ratio: float, block_size: int) -> list[int]:
    """How many of each sequence's first real tokens hscompile keeps as checkpoints, for prompts of
    ``lengths`` generating ``max_new_tokens``: its block split of the whole sequence (ACT blocks first)."""
    return [checkpoint_tokens(n + max_new_tokens, act_ratio, block_size) for n in lengths]


def _round_trip_rows(hidden: torch.Tensor) -> torch.Tensor:
    """A hidden state through an int8 ACT block: one scale per token."""
    d = hidden.shape[-1]
    return dequantize_rows(quantize_rows(hidden.reshape(-1, d), d), (d,), d, hidden.dtype).reshape(hidden.shape)
