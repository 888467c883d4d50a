"""Build the K/V recompute subgraphs that start from activation checkpoints.

:func:`build_recompute_module` (precondition: ``plan`` was made by
:func:`~hscompile.passes.analyze.analyze` from ``gm``; postcondition: a standalone
``GraphModule`` ``f(hidden, *weights, *external_inputs) -> (key, value)`` holding copies of the
layer's recompute-slice nodes; ``gm`` is unchanged). ``key`` and ``value`` are the layer's K
and V before GQA head replication, ``(batch, num_kv_heads, seq, head_dim)``, exactly as the
full layer computes them.

Before (the layer, abridged)::

    h -> input_layernorm -> {q_proj, k_proj, v_proj} -> rotary(q), rotary(k) -> sdpa -> o_proj -> + -> mlp -> +

After (the slice)::

    h -> input_layernorm -> {k_proj, v_proj} -> rotary(k) -> (key, value)

:func:`build_recompute_program` turns the slices of a graph captured with *dynamic* batch and
sequence sizes into a :class:`RecomputeProgram`: the rotary tables computed at any tokens'
positions, then each layer's slice run on those tokens' checkpoints as one ``(1, N, hidden)``
batch. It checks, numerically, that the slices are token-local (each token's K/V depends on
that token's checkpoint and position only) and shape-generic, which is what makes recomputing
an arbitrary set of cached tokens correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..ir.fx import backward_slice, extract_subgraph, fake_value, slice_inputs, structural_key
from ..ir.plan import LayerPlan, ModelPlan
from ..ir.quant import QuantScheme
from ..ops.quant import quantize
from .quantize_weights import dequantize_inputs, quantized_weights

__all__ = ["RecomputeProgram", "build_recompute_module", "build_recompute_program", "check_token_locality"]


def build_recompute_module(gm: fx.GraphModule, layer: LayerPlan) -> fx.GraphModule:
    """The recompute slice of ``layer`` as a runnable GraphModule (see the module docstring)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    piece = layer.recompute
    nodes = [by_name[name] for name in piece.nodes]
    inputs = [by_name[name] for name in (piece.hidden_input, *piece.weights, *piece.external_inputs)]
    outputs = [by_name[piece.key], by_name[piece.value]]
    return extract_subgraph(gm, nodes, inputs, outputs, class_name=f"RecomputeKV_{layer.index}")


@dataclass(frozen=True, slots=True)
class _SizeBinding:
    """A size input of a piece, read at run time from a tensor input's dimension."""

    tensor_input: int
    dim: int


@dataclass(slots=True)
class _Piece:
    """A lowered slice: what runs, the FX graph it came from, and where its size inputs come from."""

    run: Callable[..., Any]
    graph_module: fx.GraphModule
    sizes: tuple[tuple[int, _SizeBinding], ...]
    """``(input position, binding)`` for every size input."""
    key: str

    def __call__(self, tensors: list[Any]) -> Any:
        args = list(tensors)
        for position, binding in self.sizes:
            args.insert(position, int(args[binding.tensor_input].shape[binding.dim]))
        return self.run(*args)


def _with_sizes(gm: fx.GraphModule, nodes: list[fx.Node], tensor_inputs: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Pull into ``nodes`` the size arithmetic they read; return (nodes, size placeholders read)."""
    members = set(nodes)
    borrowed = [n for n in slice_inputs(nodes) if n.op != "placeholder" and not isinstance(fake_value(n), torch.Tensor)]
    if borrowed:
        extra = backward_slice(borrowed, inside=lambda n: n.op != "placeholder" and not isinstance(fake_value(n), torch.Tensor))
        members.update(extra)
    ordered = [n for n in gm.graph.nodes if n in members]
    sizes = [n for n in slice_inputs(ordered) if n.op == "placeholder" and isinstance(fake_value(n), torch.SymInt)]
    stray = [n for n in slice_inputs(ordered) if n not in sizes and n not in tensor_inputs]
    if stray:
        raise UnsupportedModelError(
            f"the K/V recompute slice reads {stray[0].name!r}, which is neither a checkpoint, a weight, a position "
            "input nor a size"
        )
    return ordered, sizes


def _bind(symbol_node: fx.Node, tensor_inputs: list[fx.Node]) -> _SizeBinding:
    symbol = fake_value(symbol_node).node.expr
    for index, node in enumerate(tensor_inputs):
        value = fake_value(node)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol:
                    return _SizeBinding(index, dim)
    raise UnsupportedModelError(
        f"the recompute slice needs size {symbol_node.name!r} ({symbol}), which is not a dimension of its inputs"
    )


def _piece(
    gm: fx.GraphModule, nodes: list[fx.Node], tensor_inputs: list[fx.Node], outputs: list[fx.Node], name: str
) -> tuple[fx.GraphModule, tuple[tuple[int, _SizeBinding], ...]]:
    ordered, sizes = _with_sizes(gm, nodes, tensor_inputs)
    module = extract_subgraph(gm, ordered, [*tensor_inputs, *sizes], outputs, class_name=name)
    bindings = tuple((len(tensor_inputs) + i, _bind(s, tensor_inputs)) for i, s in enumerate(sizes))
    return module, bindings


@dataclass(slots=True)
class RecomputeProgram:
    """K/V of ACT-cached tokens, from their checkpoints and positions (see the module docstring).

    A slice captured with symbolic sizes runs once on all ``N`` tokens; one captured with a
    static ``(batch, seq)`` runs on tiles of that shape (the last one zero-padded): tokens are
    independent, so any grouping gives the same K/V.
    """

    rotary: _Piece | None
    rotary_outputs: tuple[str, ...]
    layers: dict[int, _Piece]
    externals: dict[int, tuple[str, ...]]
    """Per layer: the rotary outputs its slice reads, in its input order."""
    positions_rank: int
    """Rank of the captured position tensor (1 for ``arange(seq)``, 2 for ``(batch, seq)``)."""
    batch: int | None
    """The checkpoint's captured batch size when static, else None."""
    seq: int | None
    """The checkpoint's captured sequence length when static, else None."""

    @property
    def tokens_per_call(self) -> int | None:
        """Tokens one call recomputes when the shape is static (None: any number)."""
        return self.batch * self.seq if self.batch is not None and self.seq is not None else None

    def _grid(self, n: int) -> tuple[int, int, int]:
        """``(calls, batch, seq)``: how ``n`` tokens are laid out."""
        if self.batch is not None and self.seq is not None:
            return -(-n // (self.batch * self.seq)), self.batch, self.seq
        if self.batch is not None:
            return 1, self.batch, -(-n // self.batch)
        if self.seq is not None:
            return 1, -(-n // self.seq), self.seq
        return 1, 1, n

    def __call__(self, layer: int, act: torch.Tensor, weights: Sequence[torch.Tensor],
                 rotary_weights: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """K/V of ``act`` (``(N, hidden)`` checkpoints at ``positions``), packed ``(N, 2, kv_heads, head_dim)``."""
        n = act.shape[0]
        calls, batch, seq = self._grid(n)
        padded = calls * batch * seq
        if padded != n:
            act = torch.cat((act, act.new_zeros((padded - n, act.shape[1]))))
            positions = torch.cat((positions, positions.new_zeros(padded - n)))
        act = act.view(calls, batch, seq, -1)
        positions = positions.view(calls, batch, seq)
        outs = []
        for i in range(calls):
            tables: dict[str, torch.Tensor] = {}
            if self.rotary is not None:
                pos = positions[i].reshape(-1) if self.positions_rank == 1 else positions[i]
                tables = dict(zip(self.rotary_outputs, self.rotary([pos, *rotary_weights])))
            key, value = self.layers[layer]([act[i], *weights, *(tables[name] for name in self.externals[layer])])
            # (batch, kv_heads, seq, dim) -> (batch * seq, 2, kv_heads, dim)
            stacked = torch.stack((key, value), dim=1).permute(0, 3, 1, 2, 4)
            outs.append(stacked.reshape(batch * seq, 2, key.shape[1], key.shape[3]))
        return torch.cat(outs)[:n] if len(outs) > 1 or padded != n else outs[0]


def _with_parts(module: fx.GraphModule, bindings: tuple[tuple[int, _SizeBinding], ...],
                quantized: dict[int, Any]) -> tuple[fx.GraphModule, tuple[tuple[int, _SizeBinding], ...]]:
    """``module`` taking its quantized weight inputs as parts; its size bindings moved to match."""

    def shift(index: int) -> int:
        return index + sum(len(form[0].parts) - 1 for i, form in quantized.items() if i < index)

    moved = tuple((shift(position), _SizeBinding(shift(b.tensor_input), b.dim)) for position, b in bindings)
    return dequantize_inputs(module, quantized, class_name=type(module).__name__), moved


def _static(size: object) -> int | None:
    return size if isinstance(size, int) else None


def build_recompute_program(
    gm: fx.GraphModule,
    plan: ModelPlan,
    lower: Callable[[fx.GraphModule], Callable[..., Any]],
    weight_format: QuantScheme | None = None,
) -> RecomputeProgram:
    """Slice, lower (once per distinct structure, with ``lower``) and wire the recompute program.

    ``gm`` must be captured with dynamic batch and sequence sizes, so that the slices are
    shape-generic. With ``weight_format`` a layer's slice takes each quantized weight as its
    parts and dequantizes them (:func:`~hscompile.passes.quantize_weights.dequantize_inputs`), as the
    schedule's ``recompute_kv`` passes them.
    """
    formats = quantized_weights(plan, weight_format)
    by_name = {n.name: n for n in gm.graph.nodes}
    rotary = None
    rotary_outputs: tuple[str, ...] = ()
    positions_rank = 0
    lowered: dict[str, Callable[..., Any]] = {}

    def lowered_for(module: fx.GraphModule) -> tuple[Callable[..., Any], str]:
        key = structural_key(module)
        if key not in lowered:
            lowered[key] = lower(module)
        return lowered[key], key

    hidden = fake_value(by_name[plan.layers[0].recompute.hidden_input])
    batch, seq = _static(hidden.shape[0]), _static(hidden.shape[1])
    if plan.positions is not None:
        piece = plan.positions
        positions = by_name[piece.positions]
        positions_rank = fake_value(positions).dim()
        if positions_rank == 1 and batch != 1:
            # One position per column, shared by the rows: tokens of different sequences in one
            # call would get the same positions. Call with a batch of one (only when symbolic).
            if batch is not None:
                raise UnsupportedModelError(
                    "the rotary tables are computed from positions shared by the whole batch and the captured batch "
                    f"size is fixed at {batch}: K/V cannot be recomputed per token; pass position_ids or use act_ratio=0"
                )
            batch = 1
        inputs = [positions, *(by_name[w] for w in piece.weights)]
        module, bindings = _piece(gm, [by_name[n] for n in piece.nodes], inputs, [by_name[o] for o in piece.outputs], "Rotary")
        run, key = lowered_for(module)
        rotary = _Piece(run, module, bindings, key)
        rotary_outputs = piece.outputs

    layers: dict[int, _Piece] = {}
    externals: dict[int, tuple[str, ...]] = {}
    for layer in plan.layers:
        piece = layer.recompute
        external = tuple(n for n in piece.external_inputs if n in rotary_outputs)
        inputs = [by_name[n] for n in (piece.hidden_input, *piece.weights, *external)]
        nodes = [by_name[n] for n in piece.nodes]
        module, bindings = _piece(gm, nodes, inputs, [by_name[piece.key], by_name[piece.value]], f"RecomputeKV_{layer.index}")
        quantized = {1 + i: formats[w] for i, w in enumerate(piece.weights) if w in formats}
        if quantized:
            module, bindings = _with_parts(module, bindings, quantized)
        run, key = lowered_for(module)
        layers[layer.index] = _Piece(run, module, bindings, key)
        externals[layer.index] = external
    return RecomputeProgram(rotary, rotary_outputs, layers, externals, positions_rank, batch, seq)


def check_token_locality(
    program: RecomputeProgram, plan: ModelPlan, weights: dict[str, torch.Tensor], *, tokens: int = 6,
    weight_format: QuantScheme | None = None,
) -> None:
    """Raise :class:`UnsupportedModelError` unless recomputing a permuted set of tokens permutes the result.

    Runs layer 0's slice on random checkpoints at scattered positions, for ``tokens`` and for a
    different count, as the runtime will (``(1, N, hidden)``), on the weights' device; the
    program's quantized weights (``weight_format``) are given as their parts.
    """
    layer = plan.layers[0]
    formats = quantized_weights(plan, weight_format)
    w = []
    for name in layer.recompute.weights:
        if name in formats:
            q = quantize(weights[name], formats[name][0], name)
            w.extend(p for p in (q.values, q.scales, q.zeros) if p is not None)
        else:
            w.append(weights[name])
    rotary = [weights[n] for n in plan.positions.weights] if plan.positions else []
    device, dtype = w[0].device, plan.dtype
    generator = torch.Generator().manual_seed(0)
    act = torch.randn(tokens, plan.hidden_size, generator=generator).to(device=device, dtype=dtype)
    positions = torch.randperm(4 * tokens, generator=generator)[:tokens].to(device)
    order = torch.randperm(tokens, generator=generator).to(device)
    with torch.no_grad():
        full = program(layer.index, act, w, rotary, positions)
        permuted = program(layer.index, act[order], w, rotary, positions[order])
        part = program(layer.index, act[: tokens // 2], w, rotary, positions[: tokens // 2])
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not (torch.allclose(full[order], permuted, atol=tolerance, rtol=0)
            and torch.allclose(full[: tokens // 2], part, atol=tolerance, rtol=0)):
        raise UnsupportedModelError(
            f"the K/V recompute slice of {layer.module_path} is not token-local: recomputing tokens in another order "
            "or a different number of them changes their K/V, so K/V cannot be recomputed from activation checkpoints"
        )
