"""Build the K/V recompute subgraph of a layer from its activation checkpoint.

Precondition: ``plan`` was made by :func:`~hscompile.passes.analyze.analyze` from ``gm``.

Postcondition: a standalone ``GraphModule`` ``f(hidden, *weights, *external_inputs) -> (key, value)``
holding copies of the layer's recompute-slice nodes; ``gm`` is unchanged. ``key`` and
``value`` are the layer's K and V before GQA head replication,
``(batch, num_kv_heads, seq, head_dim)``, exactly as the full layer computes them.

Before (the layer, abridged)::

    h -> input_layernorm -> {q_proj, k_proj, v_proj} -> rotary(q), rotary(k) -> sdpa -> o_proj -> + -> mlp -> +

After (the slice)::

    h -> input_layernorm -> {k_proj, v_proj} -> rotary(k) -> (key, value)
"""

from __future__ import annotations

import torch.fx as fx

from .graph_utils import extract_subgraph
from .plan import LayerPlan

__all__ = ["build_recompute_module"]


def build_recompute_module(gm: fx.GraphModule, layer: LayerPlan) -> fx.GraphModule:
    """The recompute slice of ``layer`` as a runnable GraphModule (see the module docstring)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    piece = layer.recompute
    nodes = [by_name[name] for name in piece.nodes]
    inputs = [by_name[name] for name in (piece.hidden_input, *piece.weights, *piece.external_inputs)]
    outputs = [by_name[piece.key], by_name[piece.value]]
    return extract_subgraph(gm, nodes, inputs, outputs, class_name=f"RecomputeKV_{layer.index}")
