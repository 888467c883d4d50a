"""The eager reference of a quantized model: what hscompile's quantized weights stand for.

:func:`reference` returns a copy of a model whose quantized weights (see
:mod:`hscompile.ir.quant`: the two-dimensional weights of its decoder layers) are replaced by
their quantize -> dequantize round trip. transformers' own ``generate`` on that copy is the
exact reference of a generation that moves the same weights quantized: tests compare greedy
tokens with it token for token, and its logits against the unquantized model's measure what
quantization costs.
"""

from __future__ import annotations

import copy

import torch

from .generation.regions import repeated_layers
from .ir.quant import DEFAULT_GROUP_SIZE, is_quantized_weight, weight_scheme
from .ops.quant import dequantize, quantize

__all__ = ["quantized_weight_names", "reference"]


def quantized_weight_names(model: torch.nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the weights a quantized ``model`` stores quantized."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = []
    for layers in repeated_layers(model):
        for layer in layers:
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
