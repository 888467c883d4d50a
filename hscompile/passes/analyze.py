"""Analysis pass: find the decoder structure in a dynamo graph.

Precondition: ``gm`` is a graph captured by dynamo from a decoder-only model: parameters
and buffers are placeholders (dynamo's default since torch 2.5), every compute node
carries ``meta["nn_module_stack"]``, attention is ``scaled_dot_product_attention``.

Postcondition: a frozen :class:`~hscompile.ir.plan.ModelPlan`; ``gm`` is unchanged.

Nothing here knows model class names. Layers are found structurally: the attention calls
must sit one per indexed child of one module list (``<container>.<i>``); every node is
then owned by the layer whose path is in its module stack, or it is *pre* (computed before
the layers from inputs and non-layer weights) or *post* (computed from the last layer's
output). Within a layer, the hidden input is the value the previous layer passes on, the
attention site is the SDPA call, and the recompute slice is the backward slice of the
(pre-GQA-replication) K and V up to the values the layer receives from outside.

Before, for one Llama layer (abridged)::

    hidden_states_10 = to(hidden_states_9)        # layers.1.input_layernorm ... (hidden input: hidden_states_9)
    linear_8 = linear(hidden_states_12, k_proj_w) # layers.1.self_attn.k_proj
    k_embed_1 = add(mul_9, mul_10)                # rotary on K, reads cos_2/sin_2 from pre
    key_1 = reshape(expand(getitem(k_embed_1)))   # repeat_kv (GQA)
    attn_output_5 = scaled_dot_product_attention(q_embed_1, key_1, value_1, attn_mask=attention_mask, ...)

After: ``LayerPlan(index=1, hidden_input="hidden_states_9", attention=AttentionSite(key="k_embed_1",
num_heads=4, num_kv_heads=2, repeat_nodes=(...)), recompute=RecomputeSlice(nodes=(...),
external_inputs=("cos_2", "sin_2")))``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..ir.fx import (
    PlaceholderSource,
    backward_slice,
    fake_value,
    is_sdpa,
    module_paths,
    normalize_module_path,
    normalize_sdpa,
    placeholder_source,
    slice_inputs,
    static_int,
)
from ..ir.plan import AttentionSite, LayerPlan, ModelPlan, PositionSlice, RecomputeSlice, WeightRef

__all__ = ["analyze"]

# Ops that only replicate or re-view K/V heads for GQA (transformers' repeat_kv and kin).
_REPEAT_METHODS = frozenset({"expand", "expand_as", "reshape", "view", "contiguous", "repeat_interleave", "repeat", "unsqueeze"})
_REPEAT_FUNCTIONS: frozenset[object] = frozenset(
    {operator.getitem, torch.repeat_interleave, torch.reshape, torch.unsqueeze, torch.Tensor.expand, torch.Tensor.reshape}
)
_DROPOUT_FUNCTIONS: frozenset[object] = frozenset({F.dropout, torch.dropout, torch.nn.functional.dropout1d})
_SOFTMAX_TARGETS: frozenset[object] = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, "softmax"})


def analyze(gm: fx.GraphModule) -> ModelPlan:
    """Find the decoder layers, their checkpoints, attention sites and K/V recompute slices.

    Raises :class:`~hscompile.errors.UnsupportedModelError` naming what is missing when the
    graph does not have the structure hscompile needs.
    """
    return _Analysis(gm).run()


def _same_size(a: object, b: object) -> bool:
    return str(a) == str(b)


def _shape(node: fx.Node) -> tuple[object, ...] | None:
    value = fake_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _size_only(node: fx.Node, owner: dict[fx.Node, int]) -> bool:
    """Whether ``node`` computes a symbolic size (a SymInt, or a plain int) from the graph's inputs
    and other such sizes alone, none of a layer's values."""
    return _is_size(node) and all(a.op == "placeholder" or (a not in owner and _is_size(a))
                                  for a in node.all_input_nodes)


def _is_size(node: fx.Node) -> bool:
    value = fake_value(node)
    return isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool)


@dataclass(slots=True)
class _Weight:
    node: fx.Node
    source: PlaceholderSource
    index: int


class _Analysis:
    """One analysis run; holds indexes over the graph so each question is asked once."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.sources = {p: placeholder_source(p) for p in placeholders}
        self.weights = {
            p: _Weight(p, src, i)
            for i, (p, src) in enumerate(self.sources.items())
            if src.kind in ("parameter", "buffer")
        }
        self.compute = [n for n in self.nodes if n.op not in ("placeholder", "output")]

    # -- driver -------------------------------------------------------------------------

    def run(self) -> ModelPlan:
        self._check_inference_mode()
        container, sdpa_by_layer = self._find_layer_container()
        owner = self._assign_layers(container, set(sdpa_by_layer))
        pre, post = self._split_pre_post(owner)
        members: dict[int, list[fx.Node]] = {i: [] for i in sdpa_by_layer}
        for node in self.compute:
            if node in owner:
                members[owner[node]].append(node)
        weight_owner = self._assign_weights(owner)

        layers: list[LayerPlan] = []
        previous_output: fx.Node | None = None
        indices = sorted(members)
        for i in indices:
            nodes = members[i]
            layer = self._layer_plan(
                i, container, nodes, sdpa_by_layer[i], owner, set(post), previous_output, weight_owner,
                is_last=(i == indices[-1]),
            )
            layers.append(layer)
            previous_output = self._by_name(layer.output)

        global_weights = tuple(
            self._weight_ref(w, local=None) for p, w in self.weights.items() if p not in weight_owner and p.users
        )
        first_input = self._by_name(layers[0].hidden_input)
        hidden_shape = _shape(first_input)
        assert hidden_shape is not None
        hidden_size = static_int(hidden_shape[-1])
        if hidden_size is None:
            raise UnsupportedModelError(
                f"the hidden size of {first_input.name!r} is symbolic ({hidden_shape[-1]}); it must be static")
        sizes = {p for p, src in self.sources.items() if src.kind == "size"}
        return ModelPlan(
            positions=self._position_slice(layers, set(pre), sizes),
            layer_container=container,
            layers=tuple(layers),
            pre_nodes=tuple(n.name for n in pre),
            post_nodes=tuple(n.name for n in post),
            global_weights=global_weights,
            inputs=tuple(p.name for p, s in self.sources.items() if s.kind == "input"),
            sizes=tuple(p.name for p, s in self.sources.items() if s.kind == "size"),
            hidden_size=hidden_size,
            dtype=fake_value(first_input).dtype,
        )

    # -- whole-graph structure ----------------------------------------------------------

    def _check_inference_mode(self) -> None:
        for node in self.compute:
            if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
                if training is True and p not in (0, 0.0):
                    raise UnsupportedModelError(
                        f"the model is in training mode: {node.name!r} applies dropout (p={p}); "
                        "hscompile compiles inference graphs, call model.eval() first"
                    )

    def _find_layer_container(self) -> tuple[str, dict[int, fx.Node]]:
        sdpas = [n for n in self.compute if is_sdpa(n)]
        if not sdpas:
            uses_softmax = any(
                n.target in _SOFTMAX_TARGETS for n in self.compute if n.op in ("call_function", "call_method")
            )
            hint = (
                " The graph computes attention with softmax/matmul ops (an 'eager' attention implementation):"
                " load the model with attn_implementation='sdpa'."
                if uses_softmax
                else ""
            )
            raise UnsupportedModelError(
                "no attention found: the graph has no scaled_dot_product_attention call. hscompile needs "
                f"each decoder layer's attention as SDPA (transformers' default attn_implementation='sdpa').{hint}"
            )
        # prefix -> layer index -> SDPA nodes under <prefix>.<index>
        candidates: dict[str, dict[int, list[fx.Node]]] = {}
        for sdpa in sdpas:
            found: set[tuple[str, int]] = set()
            for path in module_paths(sdpa):
                parts = path.split(".")
                for j in range(1, len(parts)):
                    if parts[j].isdigit():
                        found.add((".".join(parts[:j]), int(parts[j])))
            for prefix, index in found:
                candidates.setdefault(prefix, {}).setdefault(index, []).append(sdpa)
        covering = {
            prefix: by_index
            for prefix, by_index in candidates.items()
            if sum(len(v) for v in by_index.values()) == len(sdpas)
        }
        if not covering:
            where = sorted({(module_paths(s) or ["<no module>"])[-1] for s in sdpas})
            raise UnsupportedModelError(
                "no repeated decoder layers found under a ModuleList: hscompile needs each attention call "
                "inside an indexed child of one module list (like model.layers.<i>), but the "
                f"{len(sdpas)} attention call(s) sit in {', '.join(where[:4])}"
                + (" ..." if len(where) > 4 else "")
            )
        # The outermost list that holds one attention per child is the layer stack.
        for prefix in sorted(covering, key=lambda p: (p.count("."), p)):
            by_index = covering[prefix]
            if all(len(v) == 1 for v in by_index.values()):
                return prefix, {i: v[0] for i, v in by_index.items()}
        prefix = min(covering, key=lambda p: (p.count("."), p))
        index, calls = next((i, v) for i, v in sorted(covering[prefix].items()) if len(v) > 1)
        raise UnsupportedModelError(
            f"layer {prefix}.{index} calls attention {len(calls)} times ({', '.join(c.name for c in calls)}); "
            "hscompile supports decoder layers with exactly one attention call"
        )

    def _assign_layers(self, container: str, attention_layers: set[int]) -> dict[fx.Node, int]:
        owner: dict[fx.Node, int] = {}
        depth = container.count(".") + 1
        for node in self.compute:
            for path in module_paths(node):
                parts = path.split(".")
                if len(parts) > depth and ".".join(parts[:depth]) == container and parts[depth].isdigit():
                    owner[node] = int(parts[depth])
                    break
            if node in owner and _size_only(node, owner):
                # Arithmetic on the graph's symbolic sizes (``batch * seq`` for a token count): dynamo
                # records each expression once, in the first layer that asks, and later layers read
                # it. It holds no layer's data, so it belongs before the layers, read by each.
                del owner[node]
        without = sorted(set(owner.values()) - attention_layers)
        if without:
            raise UnsupportedModelError(
                f"layer {container}.{without[0]} has no attention call; hscompile supports decoders in which "
                "every layer has one (no attention-free or recurrent layers)"
            )
        return owner

    def _split_pre_post(self, owner: dict[fx.Node, int]) -> tuple[list[fx.Node], list[fx.Node]]:
        """Non-layer nodes are *pre* unless they depend on a layer; then they are *post*."""
        after_layers: set[fx.Node] = set()
        for node in self.compute:
            if node in owner or any(a in after_layers for a in node.all_input_nodes):
                after_layers.add(node)
        post = [n for n in self.compute if n not in owner and n in after_layers]
        post_set = set(post)
        for node in self.compute:
            if node in owner:
                between = [a for a in node.all_input_nodes if a in post_set]
                if between:
                    raise UnsupportedModelError(
                        f"{between[0].name!r} is computed between decoder layers outside any layer (it reads a "
                        f"layer's output and feeds layer {owner[node]}); hscompile needs layers connected only "
                        "through their hidden state"
                    )
        pre = [n for n in self.compute if n not in owner and n not in after_layers]
        return pre, post

    def _assign_weights(self, owner: dict[fx.Node, int]) -> dict[fx.Node, int]:
        """A weight belongs to a layer when that layer's nodes are its only users."""
        weight_owner: dict[fx.Node, int] = {}
        for placeholder in self.weights:
            layers = {owner.get(user) for user in placeholder.users}
            if len(layers) == 1 and None not in layers:
                weight_owner[placeholder] = layers.pop()  # type: ignore[assignment]
        return weight_owner

    # -- one layer -----------------------------------------------------------------------

    def _layer_plan(
        self,
        index: int,
        container: str,
        nodes: list[fx.Node],
        sdpa: fx.Node,
        owner: dict[fx.Node, int],
        post: set[fx.Node],
        previous_output: fx.Node | None,
        weight_owner: dict[fx.Node, int],
        *,
        is_last: bool,
    ) -> LayerPlan:
        path = f"{container}.{index}"
        members = set(nodes)
        output, extra_outputs = self._layer_outputs(path, index, nodes, owner, post, is_last)
        inputs = slice_inputs(nodes)
        own_weights = [n for n in inputs if weight_owner.get(n) == index]
        others = [n for n in inputs if n not in own_weights]

        if previous_output is not None:
            if previous_output not in others:
                raise UnsupportedModelError(
                    f"layer {path} does not read the hidden state {previous_output.name!r} passed on by the "
                    "layer before it"
                )
            hidden_input = previous_output
        else:
            hidden_input = self._first_hidden_input(path, others, output, owner)
        shared = [n for n in others if n is not hidden_input]

        attention = self._attention_site(path, sdpa, members)
        recompute = self._recompute_slice(path, attention, members, hidden_input, set(own_weights))
        module_type = self._module_type(sdpa, path)
        return LayerPlan(
            index=index,
            module_path=path,
            module_type=module_type,
            nodes=tuple(n.name for n in nodes),
            weights=tuple(self._weight_ref(self.weights[w], local=path) for w in own_weights),
            hidden_input=hidden_input.name,
            output=output.name,
            shared_inputs=tuple(n.name for n in shared),
            extra_outputs=tuple(n.name for n in extra_outputs),
            attention=attention,
            recompute=recompute,
        )

    def _layer_outputs(
        self,
        path: str,
        index: int,
        nodes: list[fx.Node],
        owner: dict[fx.Node, int],
        post: set[fx.Node],
        is_last: bool,
    ) -> tuple[fx.Node, list[fx.Node]]:
        passed: list[fx.Node] = []
        returned: list[fx.Node] = []
        for node in nodes:
            users = [u for u in node.users if owner.get(u) != index]
            if not users:
                continue
            for user in users:
                if user.op == "output":
                    continue
                if owner.get(user) == index + 1 or user in post:
                    continue
                where = f"layer {owner[user]}" if user in owner else "the computation before the layers"
                raise UnsupportedModelError(
                    f"{node.name!r} of layer {path} is read by {user.name!r} in {where}; hscompile needs layers "
                    "connected only through the hidden state each passes to the next"
                )
            if any(u.op != "output" for u in users):
                passed.append(node)
            else:
                returned.append(node)
        if len(passed) > 1:
            raise UnsupportedModelError(
                f"layer {path} passes {len(passed)} values on ({', '.join(n.name for n in passed)}); hscompile "
                "needs layers connected only through one hidden state"
            )
        if not passed:
            if is_last:
                # No head after the layers: the graph returns the last hidden state itself.
                hidden = [n for n in returned if len(_shape(n) or ()) == 3]
                if len(hidden) == 1:
                    return hidden[0], [n for n in returned if n is not hidden[0]]
            raise UnsupportedModelError(f"layer {path} passes no hidden state on to the next layer or the head")
        return passed[0], returned

    def _first_hidden_input(
        self, path: str, candidates: list[fx.Node], output: fx.Node, owner: dict[fx.Node, int]
    ) -> fx.Node:
        out_shape = _shape(output)
        matching = [
            n
            for n in candidates
            if n not in self.weights
            and (shape := _shape(n)) is not None
            and out_shape is not None
            and len(shape) == len(out_shape)
            and all(_same_size(a, b) for a, b in zip(shape, out_shape))
            and fake_value(n).dtype.is_floating_point
        ]
        private = [n for n in matching if all(owner.get(u, -1) in (owner.get(output), None) or u.op == "output" for u in n.users)]
        chosen = private if len(private) == 1 else matching
        if len(chosen) > 1:
            # Several inputs shaped like the output (rotary tables of a one-head model, head_dim ==
            # hidden): the hidden state is the one the residual additions carry to the output.
            residual = _residual_sources(output)
            chosen = [n for n in chosen if n in residual] or chosen
        if len(chosen) != 1:
            names = ", ".join(n.name for n in matching) or "none"
            raise UnsupportedModelError(
                f"cannot tell which input of layer {path} is its hidden state: it reads {len(matching)} "
                f"value(s) shaped like its output {tuple(out_shape or ())} ({names})"
            )
        return chosen[0]

    def _attention_site(self, path: str, sdpa: fx.Node, members: set[fx.Node]) -> AttentionSite:
        call = normalize_sdpa(sdpa)
        if call.dropout_p not in (0, 0.0):
            raise UnsupportedModelError(
                f"attention {sdpa.name!r} in {path} uses dropout_p={call.dropout_p}; call model.eval() first"
            )
        for name, value, kinds in (("is_causal", call.is_causal, (bool,)), ("enable_gqa", call.enable_gqa, (bool,)),
                                   ("scale", call.scale, (float, int, type(None)))):
            if not isinstance(value, kinds):
                raise UnsupportedModelError(
                    f"attention {sdpa.name!r} in {path}: {name}={value!r} is computed at run time; it must be a constant. "
                    + _lifted_float_cause()
                )
        if not all(isinstance(a, fx.Node) for a in (call.query, call.key, call.value)):
            raise UnsupportedModelError(f"attention {sdpa.name!r} in {path}: query, key and value must be tensors")
        q_shape = _shape(call.query)
        if q_shape is None or len(q_shape) != 4:
            raise UnsupportedModelError(
                f"attention {sdpa.name!r} in {path}: query must be (batch, heads, seq, head_dim), got {q_shape}"
            )
        num_heads, head_dim = static_int(q_shape[1]), static_int(q_shape[3])
        if num_heads is None or head_dim is None:
            raise UnsupportedModelError(f"attention {sdpa.name!r} in {path}: heads and head_dim must be static, got {q_shape}")
        key, key_chain = self._before_head_replication(call.key, num_heads, members)
        value, value_chain = self._before_head_replication(call.value, num_heads, members)
        k_shape, v_shape = _shape(key), _shape(value)
        assert k_shape is not None and v_shape is not None
        kv_heads, v_heads = static_int(k_shape[1]), static_int(v_shape[1])
        if kv_heads is None or kv_heads != v_heads or num_heads % kv_heads:
            raise UnsupportedModelError(
                f"attention {sdpa.name!r} in {path}: key/value heads {k_shape[1]}/{v_shape[1]} do not divide the "
                f"{num_heads} query heads"
            )
        if static_int(k_shape[3]) != head_dim or static_int(v_shape[3]) != head_dim:
            raise UnsupportedModelError(
                f"attention {sdpa.name!r} in {path}: key/value head_dim {k_shape[3]}/{v_shape[3]} differs from the "
                f"query's {head_dim}; hscompile supports equal head dims"
            )
        new_key, past_key = self._cache_concat(key)
        new_value, past_value = self._cache_concat(value)
        if (past_key is None) != (past_value is None):
            raise UnsupportedModelError(f"attention {sdpa.name!r} in {path}: only one of K and V extends a cache")
        chain = set(key_chain) | set(value_chain)
        # A replication node is dropped only when nothing but the chain or attention reads it.
        repeat = [n for n in self.nodes if n in chain and all(u in chain or u is sdpa for u in n.users)]
        mask = call.attn_mask
        if mask is not None and not isinstance(mask, fx.Node):
            raise UnsupportedModelError(f"attention {sdpa.name!r} in {path}: attn_mask must be a tensor or None")
        return AttentionSite(
            sdpa=sdpa.name,
            query=call.query.name,
            key=key.name,
            value=value.name,
            attn_mask=mask.name if mask is not None else None,
            is_causal=bool(call.is_causal),
            scale=float(call.scale) if call.scale is not None else None,
            num_heads=num_heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            repeat_nodes=tuple(n.name for n in repeat),
            new_key=new_key.name,
            new_value=new_value.name,
            past_key=past_key.name if past_key is not None else None,
            past_value=past_value.name if past_value is not None else None,
        )

    @staticmethod
    def _cache_concat(node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
        """``(new, past)`` when ``node`` is transformers' cache update ``cat([past, new], dim=-2)``."""
        if not (node.op == "call_function" and node.target is torch.cat):
            return node, None
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (2, -2)):
            return node, None
        past, new = parts
        new_shape = _shape(new)
        if new_shape is None or len(new_shape) != 4:
            return node, None
        return new, past

    def _before_head_replication(
        self, start: fx.Node, num_heads: int, members: set[fx.Node]
    ) -> tuple[fx.Node, list[fx.Node]]:
        """Walk back from SDPA's key/value through repeat_kv-style views to the K/V with kv heads.

        Returns the earliest ``(batch, h, seq, head_dim)`` node on the chain (``h`` dividing
        ``num_heads``) and the chain nodes after it (the replication to drop).
        """
        start_shape = _shape(start)
        assert start_shape is not None
        best, chain, seen = start, [], [start]
        node = start
        while node in members and self._is_replication_op(node):
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if not inputs:
                break
            node = inputs[0]
            seen.append(node)
            shape = _shape(node)
            if (
                shape is not None
                and len(shape) == 4
                and _same_size(shape[0], start_shape[0])
                and _same_size(shape[2], start_shape[2])
                and _same_size(shape[3], start_shape[3])
                and (heads := static_int(shape[1])) is not None
                and heads > 0
                and num_heads % heads == 0
            ):
                best = node
                chain = seen[:-1]
        return best, chain

    @staticmethod
    def _is_replication_op(node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in _REPEAT_METHODS
        if node.op == "call_function" and node.target in _REPEAT_FUNCTIONS:
            if node.target is operator.getitem:
                index = node.args[1]
                items = index if isinstance(index, tuple) else (index,)
                return all(i is None or i is Ellipsis or i == slice(None) for i in items)
            return True
        return False

    def _recompute_slice(
        self, path: str, attention: AttentionSite, members: set[fx.Node], hidden_input: fx.Node, own_weights: set[fx.Node]
    ) -> RecomputeSlice:
        # Recompute the new tokens' K/V from their checkpoint: never the cache's past.
        key, value = self._by_name(attention.new_key), self._by_name(attention.new_value)
        nodes = backward_slice([key, value], inside=lambda n: n in members)
        inputs = slice_inputs(nodes)
        if hidden_input not in inputs:
            raise UnsupportedModelError(
                f"K/V of layer {path} do not depend on the layer input {hidden_input.name!r}; "
                "they cannot be recomputed from an activation checkpoint"
            )
        weights = [n for n in inputs if n in self.weights]
        external = [n for n in inputs if n is not hidden_input and n not in self.weights]
        return RecomputeSlice(
            nodes=tuple(n.name for n in nodes),
            hidden_input=hidden_input.name,
            weights=tuple(n.name for n in weights),
            external_inputs=tuple(n.name for n in external),
            key=key.name,
            value=value.name,
        )

    def _position_slice(self, layers: list[LayerPlan], pre: set[fx.Node], sizes: set[fx.Node]) -> PositionSlice | None:
        """Slice the recompute slices' non-size external inputs back to one integer position tensor."""
        outputs: dict[fx.Node, None] = {}
        for layer in layers:
            for name in layer.recompute.external_inputs:
                node = self._by_name(name)
                if node not in sizes:
                    outputs[node] = None
        if not outputs:
            return None

        def integer(node: fx.Node) -> bool:
            value = fake_value(node)
            return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool

        outside = [n for n in outputs if n not in pre]
        if outside:
            raise UnsupportedModelError(
                f"the K/V recompute slices read {outside[0].name!r}, which is not computed before the layers; K/V can "
                "only be recomputed from a checkpoint when their other inputs depend on positions alone"
            )

        def integer_view(node: fx.Node) -> bool:
            # position_ids[:, None, :] and kin: walk through to the base (batch, seq) positions.
            return integer(node) and self._is_replication_op(node) and all(integer(a) for a in node.all_input_nodes)

        nodes = backward_slice(outputs, inside=lambda n: n in pre and (not integer(n) or integer_view(n)))
        inputs = slice_inputs(nodes)
        position_inputs = [n for n in inputs if integer(n)]
        weights = [n for n in inputs if n in self.weights]
        size_inputs = [n for n in inputs if n in sizes]
        others = [n for n in inputs if n not in position_inputs and n not in weights and n not in size_inputs]
        if others or len(position_inputs) != 1:
            read = ", ".join(n.name for n in (others or position_inputs)) or "no position tensor"
            raise UnsupportedModelError(
                "the position-dependent inputs of the K/V recompute slices (rotary tables) must be computed from one "
                f"integer position tensor and buffers; they read {read}"
            )
        return PositionSlice(
            nodes=tuple(n.name for n in nodes),
            positions=position_inputs[0].name,
            weights=tuple(n.name for n in weights),
            sizes=tuple(n.name for n in size_inputs),
            outputs=tuple(n.name for n in outputs),
        )

    # -- small helpers -------------------------------------------------------------------

    def _by_name(self, name: str) -> fx.Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def _weight_ref(self, weight: _Weight, *, local: str | None) -> WeightRef:
        value = fake_value(weight.node)
        shape = tuple(int(s) for s in value.shape)
        qualname = weight.source.qualname
        local_name = qualname[len(local) + 1:] if local and qualname.startswith(local + ".") else qualname
        return WeightRef(
            node=weight.node.name,
            qualname=qualname,
            local_name=local_name,
            kind=weight.source.kind,  # type: ignore[arg-type]
            shape=shape,
            dtype=value.dtype,
            nbytes=value.numel() * value.element_size(),
            input_index=weight.index,
        )

    @staticmethod
    def _module_type(node: fx.Node, path: str) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        for value in stack.values():
            if isinstance(value, tuple) and len(value) > 1 and normalize_module_path(value[0]) == path:
                cls = value[1]
                return getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")
        return "?"


def _lifted_float_cause() -> str:
    """Why dynamo made a float of the model a run-time input, and what to do about it."""
    import torch._dynamo

    if not torch._dynamo.config.assume_static_by_default:
        return ("torch.compile(..., dynamic=True) makes dynamo lift float attributes (like attention's scale) as "
                "run-time inputs: compile without dynamic=True (sizes that change become dynamic after one "
                "recompilation), or set torch._dynamo.config.specialize_float = True")
    return ("Dynamo lifts a float attribute (like attention's scale) as a run-time input when it changed since an "
            "earlier compilation of the same class (another model size in this process): set "
            "torch._dynamo.config.specialize_float = True, or torch._dynamo.reset() between models")


_ADDS = {operator.add, torch.add, torch.Tensor.add, torch.ops.aten.add.Tensor}
_CASTS = {"to", "float", "type", "add"}


def _residual_sources(output: fx.Node) -> set[fx.Node]:
    """Nodes that reach ``output`` through additions (and dtype casts) only: the residual stream."""
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in _CASTS):
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
    return seen
