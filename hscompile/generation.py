"""Batched generation over the hybrid KV/ACT cache.

:class:`Generator` compiles a model for generation once and serves many ``generate`` calls;
:func:`generate` keeps one per model and options. A call:

1. validates everything before any work (shapes, left padding, lengths against the model's
   maximum positions, sampling settings, the host budget for one sequence);
2. admits the sequences into host block pools (two-step allocation: split each sequence's
   blocks between KV and ACT by the ratio, then place them), in waves if the host budget
   cannot hold them all at once: a sequence waits for blocks, it is never dropped or cut short;
3. runs prefill over the prompts, then one decode step per new token. Each step calls the
   model through ``torch.compile`` with a backend that compiles its graph with the cache pass:
   every layer loads its past tokens' K/V and checkpoints, recomputes K/V from the
   checkpoints, attends, and stores the new tokens as K/V or checkpoints;
4. picks tokens greedily or by sampling (temperature, top-k, top-p; seeded), stops each
   sequence at its end-of-sequence token and pads it after, as ``transformers`` does.

Positions follow transformers' convention for left-padded batches (``cumsum(mask) - 1``), so
the cache stores real tokens only and a token's position is its index among them.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .backend import _REGISTRY, CompiledModel, compile_graph
from .config import HybridServeConfig, format_bytes
from .errors import (
    BudgetError,
    HybridServeError,
    UnsupportedModelError,
    surface_through_dynamo,
)
from .passes.graph_utils import fake_value
from .passes.placement import device_budget, resolve_act_ratio
from .policy import CacheBudget
from .runtime import tuner
from .runtime.blocks import CacheSpec, HybridCache
from .runtime.cache import CacheRuntime, StepRequest
from .runtime.cost_model import RATIOS, Decision, ModelDims, choose, sequence_cost
from .runtime.minibatch import SequenceCost, form_minibatches, minibatch_count
from .runtime.tuner import HardwareProfile

if TYPE_CHECKING:
    from .text import Completion, Prompt

__all__ = ["Generator", "generate", "measure_layer_overhead", "tune"]


class _GraphBackend:
    """The dynamo backend of one generator: every graph is compiled with the cache pass."""

    def __init__(self, generator: Generator) -> None:
        self._generator = weakref.ref(generator)
        self.compiled: list[CompiledModel] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_: Any) -> CompiledModel:
        generator = self._generator()
        assert generator is not None
        try:
            compiled = compile_graph(gm, example_inputs, generator.config, cache=(generator._budget(), generator.cache))
        except HybridServeError as error:
            raise surface_through_dynamo(error) from None
        _REGISTRY.record(compiled, example_inputs)
        self.compiled.append(compiled)
        return compiled


class Generator:
    """Generation with weight streaming and the hybrid KV/ACT cache, for one model and options.

    >>> generator = hscompile.Generator(model, options={"device": "cpu", "act_ratio": 0.5})  # doctest: +SKIP
    >>> tokens = generator.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # doctest: +SKIP

    With a ``tokenizer`` (as :func:`hscompile.from_pretrained` gives), :meth:`generate_text` takes
    and returns text.
    """

    def __init__(self, model: torch.nn.Module, options: Mapping[str, object] | None = None, *,
                 tokenizer: Any | None = None) -> None:
        if not hasattr(model, "config"):
            raise UnsupportedModelError("hscompile.generate needs a transformers causal LM (a model with a .config)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        """The model's tokenizer (a transformers tokenizer padding on the left), or None."""
        self.config = HybridServeConfig.from_options(options)
        self.spec = self._config_spec()
        self.act_ratio = resolve_act_ratio(self.config, self.spec.hidden, self.spec.kv_values_per_token)
        self.cache = CacheRuntime(device=self.config.device, act_ratio=self.act_ratio, host_budget=None)
        self.decision: Decision | None = None
        """The cost model's choice for the last call with an ``"auto"`` option (alternatives and why)."""
        self.minibatch_size: int | None = None
        """Rows per mini-batch of the last call (None: every step runs whole)."""
        self._dims: ModelDims | None = None
        self._profile: HardwareProfile | None = None
        self._workload: tuple[int, int, int] | None = None
        self._staging = 0
        self._backend = _GraphBackend(self)
        self._compiled = torch.compile(model, backend=self._backend, fullgraph=True)

    # -- public --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        act_ratio: float | None = None,
        progress: bool = False,
        stopping: Callable[[int, list[int]], bool] | None = None,
    ) -> torch.Tensor:
        """Prompt + new tokens, ``(batch, prompt + n)``, like ``transformers``' ``generate``.

        ``input_ids`` is a left-padded batch; ``attention_mask`` marks real tokens with 1.
        ``act_ratio`` overrides the options' ratio for this call (the compiled graphs do not
        depend on it, so sweeping it costs no compilation). ``progress`` shows a progress bar
        over the steps on the terminal (off by default: a library stays quiet).

        ``seed`` makes sampling reproducible per sequence: one int seeds sequence ``i`` with
        :func:`~hscompile.text.sequence_seed` ``(seed, i)``, a list gives each sequence its own
        seed. A sequence's tokens then depend on its prompt, settings and seed only, not on the
        waves or mini-batches it runs in. ``stopping(row, new_token_ids) -> bool`` ends a sequence
        early (as its end-of-sequence token would): stop strings use it.
        """
        ids, mask = self._validate(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p)
        samplers = _samplers(seed, ids.shape[0]) if do_sample else None
        if act_ratio is not None and (
            isinstance(act_ratio, bool) or not isinstance(act_ratio, (int, float)) or not 0 <= act_ratio <= 1
        ):
            raise ValueError(f"act_ratio must be in [0, 1], got {act_ratio!r}")
        lengths = mask.sum(dim=1)
        totals = [int(n) + max_new_tokens for n in lengths]
        self._workload = (ids.shape[0], int(lengths.max()), max_new_tokens)
        self.cache.act_ratio, self.minibatch_size = self._decide(*self._workload, act_ratio=act_ratio)
        spec = self.spec
        waves = self._waves(spec, totals)
        self._staging = self._worst_staging(spec, max(len(w) for w in waves), max(totals))
        self._check_compiled_budget([(len(w), ids.shape[1], False) for w in waves] + [(len(w), 1, True) for w in waves])
        pieces: list[torch.Tensor] = [torch.empty(0)] * ids.shape[0]
        with _progress(progress, len(waves) * max_new_tokens) as tick:
            for wave in waves:
                sampling = _Sampling(do_sample, temperature, top_k, top_p,
                                     [samplers[i] for i in wave] if samplers is not None else None)
                out = self._generate_wave(spec, ids[wave], mask[wave], [totals[i] for i in wave], max_new_tokens,
                                          sampling, tick, _stopping_for(stopping, wave))
                for row, index in enumerate(wave):
                    pieces[index] = out[row]
        width = max(p.shape[0] for p in pieces)
        pad = self.pad_token_id()
        return torch.stack([torch.cat((p, p.new_full((width - p.shape[0],), pad))) for p in pieces])

    @torch.no_grad()
    def generate_text(
        self,
        prompts: Sequence[Prompt] | Prompt,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        act_ratio: float | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """One :class:`~hscompile.text.Completion` per prompt, in order.

        A prompt is a string, or chat messages (``[{"role": "user", "content": "..."}]``) rendered
        with the tokenizer's chat template; ``chat=True`` renders plain strings as one user turn.
        Prompts are encoded one by one and left-padded together, so greedy ``token_ids`` equal
        transformers' ``generate(do_sample=False)`` whether prompts run together or alone. A stop
        string ends its sequence (``finish_reason="stop"``; the text is cut before it). ``seed`` and
        ``act_ratio``: see :meth:`generate`.
        """
        from .text import complete

        return complete(self, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=stop, chat=chat, act_ratio=act_ratio,
                        progress=progress)

    def stats(self) -> dict[str, Any]:
        """Counters of the cache and of the newest compiled graph."""
        latest = self._backend.compiled[-1].stats() if self._backend.compiled else {}
        decision = {}
        if self.decision is not None:
            best = self.decision.best
            decision = {"predicted_seconds": best.seconds, "predicted_tokens_per_s": best.tokens_per_s,
                        "decision": self.decision.reason}
        return {
            **latest,
            **decision,
            "act_ratio": self.cache.act_ratio,
            "minibatch_size": self.minibatch_size,
            "graphs": len(self._backend.compiled),
            **self.cache.counters.as_stats(),
        }

    @property
    def compiled_graphs(self) -> list[CompiledModel]:
        return list(self._backend.compiled)

    # -- validation ----------------------------------------------------------------------

    def _max_positions(self) -> int | None:
        # planning.max_positions reads the same keys; importing the front layer from here would
        # close an import circle (tests/test_layers.py).
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
        return None

    def _validate(self, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"input_ids must be a 2-D integer tensor (batch, seq); got "
                f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}"
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        ids = input_ids.long().cpu()
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(ids.shape)}; got "
                    f"{tuple(getattr(attention_mask, 'shape', ()))}"
                )
            mask = attention_mask.long().cpu()
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError(f"sequence {int((lengths == 0).nonzero()[0])} of the batch has no tokens (its mask is all 0)")
        # Left padding: once a row's tokens start, they continue to the end.
        started = mask.cumsum(dim=1) > 0
        if bool((started & (mask == 0)).any()):
            raise ValueError(
                "the batch is not left-padded: padding must come before each prompt (e.g. tokenizer.padding_side='left')"
            )
        self.check_prompt_length(int(lengths.max()), max_new_tokens, where="a prompt")
        if do_sample:
            if not (isinstance(temperature, (int, float)) and temperature > 0):
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
            if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
                raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        return ids, mask

    def check_prompt_length(self, tokens: int, max_new_tokens: int, *, where: str) -> None:
        """Refuse a prompt of ``tokens`` tokens that, with ``max_new_tokens``, would pass the model's
        positions (or its sliding window); ``where`` names the prompt in the message."""
        limit = self._max_positions()
        if limit is not None and tokens > limit:
            raise ValueError(f"{where} has {tokens} tokens, more than the model's maximum positions ({limit})")
        if limit is not None and tokens + max_new_tokens > limit:
            raise ValueError(
                f"{where} of {tokens} tokens + max_new_tokens={max_new_tokens} = {tokens + max_new_tokens} tokens "
                f"exceeds the model's maximum positions ({limit}); use max_new_tokens <= {limit - tokens}"
            )
        window = getattr(self.model.config, "sliding_window", None)
        if isinstance(window, int) and tokens + max_new_tokens > window:
            raise UnsupportedModelError(
                f"this model attends within a sliding window of {window} tokens; generating past it "
                f"({tokens + max_new_tokens} tokens for {where}) is not supported yet: use max_new_tokens <= "
                f"{window - tokens}"
            )

    # -- the cache -------------------------------------------------------------------------

    def _config_spec(self) -> CacheSpec:
        """The cache dimensions the model's config declares; each compiled graph checks them
        against what its analysis found (:meth:`CacheRuntime.configure`)."""
        config = self.model.config
        try:
            layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
        except AttributeError as error:
            raise UnsupportedModelError(f"the model's config does not describe its layers: {error}") from None
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        dtype = next(self.model.parameters()).dtype
        return CacheSpec(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, dtype=dtype,
                         block_size=self.config.cache.block_size, heads=heads)

    def _sequence_bytes(self, spec: CacheSpec, tokens: int) -> int:
        kv, act = HybridCache.blocks_for(spec, self.cache.act_ratio, tokens)
        return kv * spec.kv_block_bytes + act * spec.act_block_bytes

    def _waves(self, spec: CacheSpec, totals: Sequence[int]) -> list[list[int]]:
        """Batches of sequences whose blocks fit the host budget together (one batch without a budget)."""
        budget = self.config.memory.host_memory
        if budget is None:
            return [list(range(len(totals)))]
        waves: list[list[int]] = [[]]
        used = 0
        for index, tokens in enumerate(totals):
            need = self._sequence_bytes(spec, tokens)
            if need > budget:
                raise BudgetError(
                    f"host_memory={format_bytes(budget)} cannot hold even one sequence: sequence {index} needs "
                    f"{math.ceil(tokens / spec.block_size)} blocks of {spec.block_size} tokens "
                    f"({format_bytes(need)}, {need} bytes) for {tokens} tokens; use host_memory >= {need}"
                )
            if used + need > budget:
                waves.append([])
                used = 0
            waves[-1].append(index)
            used += need
        return waves

    def _worst_staging(self, spec: CacheSpec, batch: int, longest: int) -> int:
        """Staging bytes of the longest step this call can have: the last decode step, whose past
        holds every earlier token (the budget of new graphs holds it)."""
        past = longest - 1
        kv_blocks, act_blocks = HybridCache.blocks_for(spec, self.cache.act_ratio, past)
        act = min(past, act_blocks * spec.block_size)
        if self.minibatch_size is not None:  # one mini-batch is staged at a time
            batch = math.ceil(batch / minibatch_count(batch, self.minibatch_size))
        staged = spec.staging_bytes(batch, past, 1, batch * (past - act), batch * act)
        if self.cache._overlapping():  # the next mini-batch's loads are in flight
            staged += batch * ((past - act) * spec.kv_values_per_token + act * spec.hidden) * spec.dtype.itemsize
        return staged

    def _budget(self) -> CacheBudget:
        if self.cache.spec is None:
            self.cache.configure(self.spec)
        minibatches = 1
        if self._workload is not None and self.minibatch_size is not None:
            minibatches = math.ceil(self._workload[0] / self.minibatch_size)
        return CacheBudget(act_ratio=self.cache.act_ratio, staging_bytes=self._staging, workload=self._workload,
                           profile=self._profile, minibatches=minibatches)

    def _decide(self, batch: int, prompt: int, new_tokens: int, *, act_ratio: float | None) -> tuple[float, int | None]:
        """``(act_ratio, mini-batch rows or None)`` for this call: the configured values, and for
        ``"auto"`` the cost model's choice on this device's profile (measured once and cached,
        see :func:`hscompile.tune`)."""
        ratio = act_ratio if act_ratio is not None else self.config.cache.act_ratio
        size = self.config.schedule.mini_batch_size
        fixed_size = None if size == "auto" or size >= batch else size
        if ratio != "auto" and size != "auto":
            return float(ratio), fixed_size
        dims = self._model_dims()
        if self._profile is None:
            self._profile = tuner.tune(self.config.device, dtypes=(dims.dtype,), width=dims.hidden, quick=True)
        try:
            self.decision = choose(
                dims, self._profile, batch=batch, prompt=prompt, new_tokens=new_tokens,
                device_budget=device_budget(self.config), depths=(self.config.schedule.prefetch_depth,),
                activations=dims.prefill_activation_bytes(batch, prompt),
                block_size=self.config.cache.block_size,
                ratios=(float(ratio),) if ratio != "auto" else RATIOS,
                minibatches=None if size == "auto" else (math.ceil(batch / size),),
            )
        except ValueError:  # nothing fits: placement refuses the budget with the minimum that would work
            return (self.act_ratio if ratio == "auto" else float(ratio)), fixed_size
        best = self.decision.best.choice
        chosen = float(ratio) if ratio != "auto" else best.act_ratio
        if size != "auto":
            return chosen, fixed_size
        return chosen, (math.ceil(batch / best.minibatches) if best.minibatches > 1 else None)

    def _model_dims(self) -> ModelDims:
        if self._dims is None:
            self._dims = ModelDims.from_model(self.model)
        return self._dims

    def _groups(self, mask: torch.Tensor | None) -> list[list[int]] | None:
        """The mini-batches of the next step (None: run it whole): sequences grouped so each
        group's cache loads and compute are balanced, in the order that overlaps them best
        (:func:`~hscompile.runtime.minibatch.form_minibatches`). ``mask`` is the prefill's mask,
        None for a decode step (its costs come from what the cache holds)."""
        size = self.minibatch_size
        cache = self.cache.cache
        batch = len(self.cache.sequences) if mask is None else mask.shape[0]
        if size is None or size >= batch or (mask is None and cache is None):
            return None
        if mask is not None:  # a prefill: every row is computed at the padded length
            costs = [SequenceCost(0.0, float(n)) for n in mask.sum(dim=1).tolist()]
        else:
            assert cache is not None
            dims, block = self._model_dims(), cache.spec.block_size
            costs = []
            for seq in self.cache.sequences:
                table = cache.sequences[seq]
                act = sum(min(block, max(0, table.length - i * block)) for i, k in enumerate(table.kinds) if k == "act")
                load, compute = sequence_cost(dims, self._profile, kv_tokens=table.length - act, act_tokens=act, new=1)
                costs.append(SequenceCost(load, compute))
        groups = form_minibatches(costs, size)
        return groups if len(groups) > 1 else None

    def _check_compiled_budget(self, steps: Sequence[tuple[int, int, bool]]) -> None:
        """Refuse, before any work, a call that a graph compiled earlier could not run within the
        budget. ``steps`` are this call's step shapes ``(batch, tokens, decode)``; a graph is checked
        only against the steps dynamo would route to it (:func:`_step_activations`), with the
        activations of that shape and, for decode steps, this call's longest cache staging."""
        for compiled in self._backend.compiled:
            if compiled.executor is None or compiled.policy.device_budget is None:
                continue
            runtime = compiled.executor.runtime
            for batch, tokens, decode in steps:
                activations = _step_activations(compiled, batch, tokens)
                if activations is None:
                    continue
                staging = self._staging if decode else 0
                need = runtime.device_bytes_for(activations + staging)
                if need > compiled.policy.device_budget:
                    raise BudgetError(
                        f"this generation needs up to {format_bytes(need)} ({need} bytes) of device memory at its "
                        f"{'decode' if decode else 'prefill'} step of {batch} x {tokens} tokens (cache staging "
                        f"{format_bytes(staging)}), above device_memory={format_bytes(compiled.policy.device_budget)}; "
                        "generate fewer tokens or sequences at once, or use a new hscompile.Generator with a larger budget"
                    )

    # -- the engine --------------------------------------------------------------------------

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, request: StepRequest,
              prefill: torch.Tensor | None = None) -> torch.Tensor:
        """One step: the model on ``ids`` through the compiled graph; the last position's logits."""
        device = next(self.model.parameters()).device
        ids, mask, positions = (t.to(device) for t in (ids, mask, positions))
        for tensor in (ids, mask, positions):
            for dim in (0, 1):
                if tensor.shape[dim] > 1:  # one prefill graph for every prompt shape
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        request.groups = self._groups(prefill)
        self.cache.request = request
        try:
            # Floats such as attention's scale must stay constants: dynamo would otherwise lift one
            # that differs between two models of the same class as a run-time input.
            with _tracing_settings():
                out = self._compiled(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                     logits_to_keep=1)
        finally:
            self.cache.request = None
        return out.logits[:, -1, :].float().cpu()

    def _generate_wave(self, spec, ids, mask, totals, max_new_tokens, sampling: _Sampling, tick=lambda: None,
                       stopping: Callable[[int, list[int]], bool] | None = None):
        batch = ids.shape[0]
        eos = self.eos_token_ids()
        pad = self.pad_token_id()
        try:
            positions = mask.cumsum(dim=1) - 1
            positions.masked_fill_(mask == 0, 1)
            logits = self._call(ids, mask, positions, StepRequest(real=mask.bool(), admit=list(totals)), prefill=mask)
            unfinished = torch.ones(batch, dtype=torch.bool)
            generated: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                tokens = _select(logits, sampling)
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                generated.append(tokens)
                tick()
                if eos:
                    unfinished &= ~torch.isin(tokens, torch.tensor(eos))
                if stopping is not None:
                    so_far = torch.stack(generated, dim=1)
                    for row in unfinished.nonzero().flatten().tolist():
                        if stopping(row, so_far[row].tolist()):
                            unfinished[row] = False
                if step == max_new_tokens - 1 or not bool(unfinished.any()):
                    break
                assert self.cache.cache is not None
                lengths = torch.tensor([self.cache.cache.sequences[s].length for s in range(batch)])
                logits = self._call(tokens.view(batch, 1), torch.ones(batch, 1, dtype=torch.long),
                                    lengths.view(batch, 1), StepRequest(real=torch.ones(batch, 1, dtype=torch.bool)))
        finally:
            self.cache.end_batch()
        return torch.cat((ids, torch.stack(generated, dim=1)), dim=1)

    def eos_token_ids(self) -> list[int]:
        """The tokens that end a sequence (the generation config's, else the model config's)."""
        config = getattr(self.model, "generation_config", None) or self.model.config
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def pad_token_id(self) -> int:
        """The token rows are padded with (the pad token, else the first end-of-sequence token, else 0)."""
        config = getattr(self.model, "generation_config", None) or self.model.config
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = self.eos_token_ids()
            return eos[0] if eos else 0
        return int(pad)


@contextlib.contextmanager
def _progress(show: bool, total: int):
    """A ``tick()`` per generated token position: a rich progress bar when ``show``, else nothing."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("generating", total=total)
        yield lambda: bar.advance(task)


def _tracing_settings() -> contextlib.AbstractContextManager:
    """Dynamo settings for the generator's own calls.

    Floats such as attention's scale stay constants (dynamo would lift one that differs between
    two models of the same class as a run-time input), and each generator may add its graphs to
    the model class's code without hitting the recompile limit that several generators (or other
    compilations of that class) in one process would reach together.
    """
    config = torch._dynamo.config
    stack = contextlib.ExitStack()
    # Distinct symbols for distinct dimensions (no duck sizing), so a batch that happens to equal
    # the prompt length keeps its own symbol and the step can still run as mini-batches.
    from torch.fx.experimental import _config as shapes

    if hasattr(shapes, "use_duck_shape"):
        stack.enter_context(shapes.patch(use_duck_shape=False))
    settings: dict[str, object] = {}
    if hasattr(config, "specialize_float"):
        settings["specialize_float"] = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            settings[name] = max(getattr(config, name), 64)
            break
    if settings:
        stack.enter_context(config.patch(**settings))
    return stack


@dataclass(frozen=True, slots=True)
class _Sampling:
    """How a wave picks tokens: greedily, or sampling with one random stream per row."""

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    samplers: list[torch.Generator | None] | None


def _samplers(seed: int | Sequence[int] | None, batch: int) -> list[torch.Generator | None]:
    """One random stream per sequence (see :meth:`Generator.generate`); None rows use torch's global one."""
    from .text import sequence_seed

    if seed is None:
        return [None] * batch
    if isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [sequence_seed(seed, i) for i in range(batch)]
    elif isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != batch or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seed must be an int or a list of {batch} ints (one per sequence), got {seed!r}")
    else:
        raise ValueError(f"seed must be an int or a list of ints (one per sequence), got {seed!r}")
    return [torch.Generator().manual_seed(s & (2**63 - 1)) for s in seeds]


def _stopping_for(stopping: Callable[[int, list[int]], bool] | None, wave: list[int]):
    """``stopping`` with a wave's rows mapped back to the call's."""
    if stopping is None:
        return None
    return lambda row, ids: stopping(wave[row], ids)


def _step_activations(compiled: CompiledModel, batch: int, tokens: int) -> int | None:
    """Activation bytes of ``compiled`` for a step of ``batch`` x ``tokens``, or None when dynamo
    would not route such a step to it.

    The generator's inputs (ids, mask, positions) are all ``(batch, tokens)``: a static size of
    the graph must equal the step's, and a symbolic one serves any size but 0 and 1 (which dynamo
    specialises). Other guards are not modelled: a step this accepts may still get a new graph,
    whose placement then checks the budget itself.
    """
    sizes: dict[Any, int] = {}
    for node in compiled.schedule.graph.nodes:
        if node.op != "placeholder":
            continue
        value = fake_value(node)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
            continue
        for size, wanted in zip(value.shape, (batch, tokens), strict=True):
            if isinstance(size, int):
                if size != wanted:
                    return None
            elif wanted < 2 or sizes.setdefault(size.node.expr, wanted) != wanted:
                return None
    assert compiled.executor is not None
    return compiled.executor.runtime.activations.evaluate_sizes(sizes)


def _select(logits: torch.Tensor, sampling: _Sampling) -> torch.Tensor:
    """Greedy, or sampling after temperature, top-k and top-p, in transformers' order."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    top_k, top_p = sampling.top_k, sampling.top_p
    scores = logits / sampling.temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    probs = scores.softmax(dim=-1)
    samplers = sampling.samplers or [None] * probs.shape[0]
    # Row by row, each from its own stream: a row's draw must not depend on the rows beside it.
    return torch.cat([torch.multinomial(probs[row], 1, generator=samplers[row]) for row in range(probs.shape[0])])


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    options: Mapping[str, object] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate with weight streaming and the hybrid KV/ACT cache; returns prompt + new tokens.

    The first call for a model and options compiles it (the :class:`Generator` is kept for
    later calls). See :class:`Generator` and the README for the options.
    """
    generator = _REGISTRY.generator(model, options, lambda: Generator(model, options))
    return generator.generate(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, progress=progress,
    )


def measure_layer_overhead(device: torch.device, repeat: int) -> float:
    """Seconds of hscompile's host work per layer per decode step: the generator on models too
    small to compute anything, 4 layers against 2 (a :data:`~hscompile.runtime.tuner.OverheadProbe`)."""
    import transformers

    def step(layers: int) -> float:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        generator = Generator(model, {"device": str(device), "lowering": "eager", "act_ratio": 0.5, "block_size": 4})
        ids = torch.randint(3, 64, (2, 8))
        generator.generate(ids, max_new_tokens=3)
        times = []
        for new in (2, 10):
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                generator.generate(ids, max_new_tokens=new)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        return (times[1] - times[0]) / 8

    small, large = step(2), step(4)
    return max((large - small) / 2, 0.0)


def tune(
    device: str | torch.device | None = None,
    *,
    dtypes: Sequence[str] = ("float32",),
    width: int = 1024,
    force: bool = False,
    quick: bool = False,
    overhead: bool = True,
) -> HardwareProfile:
    """:func:`hscompile.runtime.tuner.tune`, measuring hscompile's per-layer overhead too unless
    ``overhead=False`` (the probe runs the generator, which the runtime layer may not import)."""
    return tuner.tune(device, dtypes=dtypes, width=width, force=force, quick=quick,
                      overhead=measure_layer_overhead if overhead else None)
