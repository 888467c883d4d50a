"""The frozen result of :func:`hscompile.passes.analyze.analyze`: what the model is made of.

The plan refers to graph nodes by name (``str``), never by ``fx.Node``: it is plain data,
safe to keep, print and compare, and no pass can mutate the graph through it. Use
:meth:`ModelPlan.node` to resolve a name in the graph the plan was made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

__all__ = ["AttentionSite", "LayerPlan", "ModelPlan", "PositionSlice", "RecomputeSlice", "WeightRef"]


@dataclass(frozen=True, slots=True)
class WeightRef:
    """One parameter or buffer of the model, as a placeholder of the captured graph."""

    node: str
    """Placeholder name in the captured graph."""
    qualname: str
    """Dotted name in the model (``"model.layers.0.self_attn.q_proj.weight"``)."""
    local_name: str
    """Name relative to its owner layer (``"self_attn.q_proj.weight"``); the qualname for non-layer weights."""
    kind: Literal["parameter", "buffer"]
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    input_index: int
    """Position among the graph's placeholders (the index into dynamo's example inputs)."""


@dataclass(frozen=True, slots=True)
class AttentionSite:
    """The one attention call of a decoder layer."""

    sdpa: str
    """The scaled_dot_product_attention node."""
    query: str
    """Query as fed to attention: ``(batch, num_heads, seq, head_dim)``, rotary applied."""
    key: str
    """Key before any GQA head replication: ``(batch, num_kv_heads, seq, head_dim)``, rotary applied.
    This is what a KV block stores."""
    value: str
    """Value before any GQA head replication: ``(batch, num_kv_heads, seq, head_dim)``."""
    attn_mask: str | None
    """The mask argument (a node computed before the layers, or inside it), or None."""
    is_causal: bool
    scale: float | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    repeat_nodes: tuple[str, ...]
    """Nodes that only replicate K/V heads for GQA (``repeat_kv``); attention does this itself."""
    new_key: str = ""
    """K of the new tokens alone. Equal to :attr:`key`, except in graphs that carry a
    transformers cache, where :attr:`key` is ``cat([past_key, new_key])``."""
    new_value: str = ""
    past_key: str | None = None
    """The cache's past K (a graph input, or an empty tensor made in the graph on the first
    step) when :attr:`key` concatenates it with the new tokens' K; else None."""
    past_value: str | None = None

    @property
    def kv_values_per_token(self) -> int:
        """Values a KV block holds per token: ``2 * num_kv_heads * head_dim``."""
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class RecomputeSlice:
    """The part of a layer that turns its input hidden state (the activation checkpoint) into K and V.

    Running these nodes on a token's layer input reproduces the K and V that the full layer
    feeds to attention for that token, skipping attention, the output projection and the
    MLP of every earlier layer.
    """

    nodes: tuple[str, ...]
    """Slice nodes in graph order (input norm, k/v projection (+bias), rotary on K, ...)."""
    hidden_input: str
    """The layer input placeholder of the slice (the activation checkpoint)."""
    weights: tuple[str, ...]
    """Weight placeholders the slice reads (norm weight, k/v weights and biases)."""
    external_inputs: tuple[str, ...]
    """Other values from outside the layer the slice reads, e.g. rotary ``cos``/``sin``
    computed once per model from the positions, or symbolic sizes."""
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class PositionSlice:
    """How the position-dependent inputs of the recompute slices (rotary cos/sin) are computed.

    The backward slice, inside the computation before the layers, from those inputs down to
    one integer position tensor ``(batch or 1, seq)``, buffers (``inv_freq``) and sizes. It lets
    the runtime compute them for any set of cached tokens at their true positions.
    """

    nodes: tuple[str, ...]
    positions: str
    """The integer position tensor the tables are computed from (``position_ids``)."""
    weights: tuple[str, ...]
    """Buffers it reads (``inv_freq``)."""
    sizes: tuple[str, ...]
    """Size placeholders it reads (dynamic shapes)."""
    outputs: tuple[str, ...]
    """The recompute slices' position-dependent inputs, e.g. ``("cos_2", "sin_2")``."""


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One decoder layer: a repeated child of the layer container."""

    index: int
    module_path: str
    """``"model.layers.3"``."""
    module_type: str
    """Class name of the layer module (``"LlamaDecoderLayer"``); for display only."""
    nodes: tuple[str, ...]
    """Compute nodes of the layer, in graph order."""
    weights: tuple[WeightRef, ...]
    """Parameters and buffers owned by this layer, in order of first use."""
    hidden_input: str
    """The layer's input hidden state ``(batch, seq, hidden)``: the activation checkpoint site."""
    output: str
    """The hidden state the layer passes on to the next layer (or to the head)."""
    shared_inputs: tuple[str, ...]
    """Values from outside the layer it reads besides its hidden input and its own weights:
    rotary cos/sin, the attention mask, non-layer weights, symbolic sizes."""
    extra_outputs: tuple[str, ...]
    """Layer values returned by the graph directly (e.g. K/V when the model returns its cache)."""
    attention: AttentionSite
    recompute: RecomputeSlice

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What the analysis found in the captured graph."""

    layer_container: str
    """Path of the module list holding the decoder layers (``"model.layers"``)."""
    layers: tuple[LayerPlan, ...]
    pre_nodes: tuple[str, ...]
    """Compute before the first layer: embeddings, positions, rotary tables, masks."""
    post_nodes: tuple[str, ...]
    """Compute after the last layer: final norm, LM head."""
    global_weights: tuple[WeightRef, ...]
    """Weights outside the layers (embeddings, final norm, LM head, rotary buffers). A tied
    LM head is the embedding weight: one placeholder, listed and counted once."""
    inputs: tuple[str, ...]
    """Placeholders for user arguments (``input_ids``, ``attention_mask``, ...)."""
    sizes: tuple[str, ...]
    """Placeholders for symbolic sizes (dynamic shapes)."""
    hidden_size: int
    dtype: torch.dtype
    """Dtype of the layer input hidden state (the activation checkpoint)."""
    positions: PositionSlice | None = None
    """How the recompute slices' position-dependent inputs are made; None when they have
    none (learned absolute positions are already part of the checkpoint)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def global_weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.global_weights)

    @property
    def weight_bytes(self) -> int:
        return self.layer_weight_bytes + self.global_weight_bytes

    @property
    def weights(self) -> tuple[WeightRef, ...]:
        """Every weight of the model, once: the global weights, then each layer's."""
        return (*self.global_weights, *(w for layer in self.layers for w in layer.weights))

    @property
    def weight_nodes(self) -> frozenset[str]:
        """The placeholder names of :attr:`weights`."""
        return frozenset(w.node for w in self.weights)

    @staticmethod
    def node(gm: fx.GraphModule, name: str) -> fx.Node:
        """Resolve a node name of this plan in the graph it was made from."""
        for node in gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in the graph")
