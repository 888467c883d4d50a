"""Batched generation over the hybrid KV/ACT cache.

:class:`Generator` compiles a model for generation once and serves many ``generate`` calls;
:func:`generate` keeps one per model and options. A call:

1. validates everything before any work (shapes, left padding, lengths against the model's
   maximum positions, sampling settings, the host budget for one sequence: ``host_memory``,
   else the memory this machine has available);
2. admits the sequences into host block pools (two-step allocation: split each sequence's
   blocks between KV and ACT by the ratio, then place them), in waves if ``host_memory``
   cannot hold them all at once: a sequence waits for blocks, it is never dropped or cut short;
3. runs prefill over the prompts, then one decode step per new token. Each step calls the
   model through ``torch.compile`` with a backend that compiles its graph with the cache pass:
   every layer loads its past tokens' K/V and checkpoints, recomputes K/V from the
   checkpoints, attends, and stores the new tokens as K/V or checkpoints;
4. picks tokens greedily or by sampling with the call's :class:`~hscompile.SamplingParams` over
   the checkpoint's generation config (penalties, temperature, top-k, top-p, min-p; seeded),
   stops each sequence at its end-of-sequence token and pads it after, as ``transformers``
   does; ``n > 1`` samples of a prompt share its prefill.

The parts: :mod:`~hscompile.generation.validation` checks the input,
:func:`~hscompile.planner.choice.plan_call` makes the call's one plan (ratio, mini-batches, waves,
staging), which the cache, the graphs and this driver read and never decide again,
:class:`~hscompile.generation.graphs.GeneratorGraphs` compiles and budget-checks the graphs,
:class:`~hscompile.runtime.cache.CacheRuntime` serves the cache, and :mod:`~hscompile.generation.sampling`
picks tokens. This module drives them.

Positions follow transformers' convention for left-padded batches (``cumsum(mask) - 1``), so
the cache stores real tokens only and a token's position is its index among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo import exc as dynamo_errors

from ..backend import CompiledModel
from ..config import HybridServeConfig
from ..errors import BudgetError, UnsupportedModelError
from ..ir.cache import CacheSpec
from ..ir.call import CallPlan
from ..ir.layout import host_weight_bytes, mapped_at
from ..planner.budget import host_budget
from ..planner.choice import plan_call
from ..planner.cost_model import ModelDims, sequence_cost
from ..planner.hardware import HardwareProfile
from ..planner.minibatch import SequenceCost, step_groups
from ..runtime.cache import CacheRuntime, StepRequest
from .captures import INPUTS, CaptureStore, SavedGraph, sources_hash
from .graphs import GeneratorGraphs, entry_point, tracing_settings
from .kept import kept_generator
from .params import Sampling, SamplingParams, sample_seeds, sampling_params
from .regions import LayerRegions, repeated_layers
from .sampling import TokenLogprob, TokenPicker, eos_token_ids, pad_token_id, samplers
from .validation import check_batch, check_experts, check_not_prequantized, check_prompt_length

_LOG = logging.getLogger("hscompile.generation")
# What dynamo raises when it cannot trace a nested compile region (the first on torch 2.13).
_REGION_FAILURES: tuple[type[Exception], ...] = (dynamo_errors.UncapturedHigherOrderOpError, dynamo_errors.Unsupported)

if TYPE_CHECKING:
    from ..text import Completion, Prompt

__all__ = ["Generation", "Generator", "generate"]


@dataclass(frozen=True, slots=True)
class Generation:
    """What :meth:`Generator.run` returns: the tokens and, when asked, their logprobs."""

    sequences: torch.Tensor
    """Prompt + new tokens, ``(batch * n, prompt + new)``, prompt-major; padded after a row's end."""
    logprobs: list[list[TokenLogprob]] | None
    """Per row, per generated token up to the row's end (its end-of-sequence or stop token
    included, not the padding after): the token's logprob and its alternatives; None unless
    ``logprobs`` was given."""
    sampling: Sampling
    """The settings the call ran with, every default applied."""


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
        unloaded = next((name for name, p in model.named_parameters() if p.is_meta), None)
        if unloaded is not None:
            raise UnsupportedModelError(
                f"the model's weights are not loaded: parameter {unloaded!r} is on the meta device (a model built "
                "under torch.device('meta') or with empty weights); load its weights first, e.g. with "
                "hscompile.from_pretrained(path) or transformers' from_pretrained"
            )
        check_not_prequantized(getattr(model.config, "quantization_config", None), "the model")
        check_experts(model.config, "the model's config")
        # The model runs in eval mode inside each call and is left in the mode the caller had.
        self.model = model
        self.tokenizer = tokenizer
        """The model's tokenizer (a transformers tokenizer padding on the left), or None."""
        self.config = HybridServeConfig.from_options(options)
        self.spec = CacheSpec.from_config(model.config, next(model.parameters()).dtype, self.config.cache.block_size,
                                          self.config.quant.cache_quant)
        """The cache dimensions the model's config declares; each compiled graph checks them
        against what its analysis found (:meth:`CacheRuntime.configure`)."""
        self.cache = CacheRuntime(device=self.config.device, host_budget=None)
        self.cache.configure(self.spec)
        self.plan: CallPlan | None = None
        """The plan of the last call (:func:`~hscompile.planner.choice.plan_call`): its ACT ratio,
        mini-batches, waves, staging and, where something was ``"auto"``, the cost model's
        decision with its alternatives and why."""
        self._dims: ModelDims | None = None
        self._profile: HardwareProfile | None = None
        self.graphs = GeneratorGraphs(self.config, self.cache)
        self._regions = LayerRegions(model)
        self._state: dict[str, torch.Tensor] | None = None
        self._prefills_shared = 0
        """Prompt prefills saved by ``n > 1`` (copies that took their prompt's cache instead)."""
        # hscompile's code as this process runs it (a part of every key; read once).
        self._sources = sources_hash() if self.config.graph_cache else ""
        self._compiled = torch.compile(entry_point(f"hscompile_generator_{id(self):x}"), backend=self.graphs.backend(),
                                       fullgraph=True)

    # -- public --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        act_ratio: float | None = None,
        progress: bool = False,
        stopping: Callable[[int, list[int]], bool] | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Prompt + new tokens, ``(batch * n, prompt + new)``, like ``transformers``' ``generate``.

        ``input_ids`` is a left-padded batch; ``attention_mask`` marks real tokens with 1.
        ``params`` (a :class:`~hscompile.SamplingParams`) and ``sampling`` (its fields as
        keywords, applied over it: ``max_new_tokens=32, temperature=0.8, ...``) say how tokens
        are picked; what neither gives comes from the model's generation config, as transformers
        takes it (:meth:`SamplingParams.resolve`). With ``n > 1`` the rows are prompt-major (row
        ``i * n + j`` is sample ``j`` of prompt ``i``), as transformers' ``num_return_sequences``.
        ``act_ratio`` overrides the options' ratio for this call (the compiled graphs do not
        depend on it, so sweeping it costs no compilation). ``progress`` shows a progress bar
        over the steps on the terminal (off by default: a library stays quiet).

        ``seed`` makes sampling reproducible per sequence: one int seeds prompt ``i`` with
        :func:`~hscompile.generation.params.sequence_seed` ``(seed, i)``, a list gives each prompt
        its own seed (:func:`~hscompile.generation.params.sample_seeds` derives the ``n`` samples').
        A sequence's tokens then depend on its prompt, settings and seed only, not on the waves or
        mini-batches it runs in. ``stopping(row, new_token_ids) -> bool`` ends a sequence early (as
        its end-of-sequence token would): stop strings use it.
        """
        return self.run(input_ids, attention_mask, params, act_ratio=act_ratio, progress=progress, stopping=stopping,
                        **sampling).sequences

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        act_ratio: float | None = None,
        progress: bool = False,
        stopping: Callable[[int, list[int]], bool] | None = None,
        **sampling: Any,
    ) -> Generation:
        """:meth:`generate`, returning the tokens with their logprobs (when ``logprobs`` asks)."""
        settings = sampling_params(params, **sampling).resolve(getattr(self.model, "generation_config", None))
        max_new_tokens = settings.max_new_tokens
        ids, mask = check_batch(input_ids, attention_mask, max_new_tokens, _vocab_size(self.model))
        self._key_graphs()
        samples = settings.n
        seeds = sample_seeds(settings.seed, ids.shape[0], samples)  # checked even when greedy
        if samples > 1:  # prompt-major copies; each prompt is prefilled once (see _generate_wave)
            ids, mask = ids.repeat_interleave(samples, dim=0), mask.repeat_interleave(samples, dim=0)
        lengths = mask.sum(dim=1)
        self.check_prompt_length(int(lengths.max()), max_new_tokens, where="a prompt")
        totals = [int(n) + max_new_tokens for n in lengths]
        # The last call's pools: this call's replace them.
        host = host_budget(self.config, held=self.cache.pool_bytes(), pinned=self.cache.backend.pins_host,
                           weights=host_weight_bytes(self.model))

        def planned(spill: bool) -> CallPlan:
            return plan_call(self.config, self.spec, totals=totals, prompt=int(lengths.max()),
                             new_tokens=max_new_tokens, act_ratio=act_ratio, overlap=self.cache.overlap_loads,
                             host=host, dims=self._model_dims(), profile=self._profile, sampling=settings, spill=spill)

        plan = planned(True)
        try:
            return self._run_plan(plan, ids, mask, totals, settings, seeds, progress, stopping)
        except BudgetError:
            if plan.spill is None or plan.spill.waves_seconds is None:
                raise
            # disk_cache="auto" ran the batch whole because the cost model's device estimate (a floor
            # on activations) let it through; the placement of its graphs, exact, refused it: run the
            # waves the search weighed it against (its streams started over, so tokens are unchanged).
            return self._run_plan(planned(False), ids, mask, totals, settings, seeds, progress, stopping)

    def _run_plan(self, plan: CallPlan, ids: torch.Tensor, mask: torch.Tensor, totals: list[int], settings: Sampling,
                  seeds: list[int] | None, progress: bool, stopping: Callable[[int, list[int]], bool] | None) -> Generation:
        """The call's sequences generated as ``plan`` says, wave by wave."""
        max_new_tokens, samples = settings.max_new_tokens, settings.n
        streams = None if settings.greedy else samplers(seeds, ids.shape[0])
        self.plan, self._profile = plan, plan.profile or self._profile
        self.cache.use(plan)
        self.graphs.use(plan)
        waves = [list(w) for w in plan.waves]
        self.graphs.check_budget([(len(w), ids.shape[1], False) for w in waves] + [(len(w), 1, True) for w in waves],
                                 plan.staging_bytes)
        pieces: list[torch.Tensor] = [torch.empty(0)] * ids.shape[0]
        logprobs: list[list[TokenLogprob] | None] = [None] * ids.shape[0]
        eos = eos_token_ids(self.model)
        with _progress(progress, len(waves) * max_new_tokens) as tick, _eval_mode(self.model):
            # The largest wave first (the plan's order): its graphs need the most device memory, so a budget
            # too small for the call is refused by the first graph, before any work, with the minimum it needs.
            for wave in waves:
                picker = TokenPicker(settings, ids[wave], mask[wave], eos,
                                     [streams[i] for i in wave] if streams is not None else None)
                out, ends = self._generate_wave(ids[wave], mask[wave], [totals[i] for i in wave], max_new_tokens,
                                                picker, [] if settings.ignore_eos else eos, [i // samples for i in wave],
                                                tick, _stopping_for(stopping, wave))
                for row, index in enumerate(wave):
                    pieces[index] = out[row]
                    logprobs[index] = picker.logprobs(row, out[row, ids.shape[1]:ids.shape[1] + ends[row]].tolist())
        width = max(p.shape[0] for p in pieces)
        pad = pad_token_id(self.model)
        sequences = torch.stack([torch.cat((p, p.new_full((width - p.shape[0],), pad))) for p in pieces])
        return Generation(sequences, logprobs if settings.logprobs is not None else None, settings)

    @torch.no_grad()
    def generate_text(
        self,
        prompts: Sequence[Prompt] | Prompt,
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        act_ratio: float | None = None,
        progress: bool = False,
        **sampling: Any,
    ) -> list[Completion]:
        """One :class:`~hscompile.text.Completion` per prompt and sample (``n`` per prompt,
        prompt-major), in order.

        A prompt is a string, or chat messages (``[{"role": "user", "content": "..."}]``) rendered
        with the tokenizer's chat template; ``chat=True`` renders plain strings as one user turn.
        Prompts are encoded one by one and left-padded together, so greedy ``token_ids`` equal
        transformers' ``generate()`` whether prompts run together or alone. A stop string
        (``stop=``) ends its sequence (``finish_reason="stop"``; the text is cut before it).
        ``params``, ``sampling``, ``seed`` and ``act_ratio``: see :meth:`generate`.
        """
        from ..text import complete

        return complete(self, prompts, params, chat=chat, act_ratio=act_ratio, progress=progress, **sampling)

    def stats(self) -> dict[str, Any]:
        """Counters of the cache and of the newest compiled graph. ``host_syncs`` counts every wait
        of the host on the device in this generator's steps (setting up a graph's resident weights
        excluded); ``host_syncs_per_step`` is their mean per step (1: the step's tokens)."""
        latest = self.graphs.compiled[-1].stats() if self.graphs.compiled else {}
        plan = self.plan
        decision = {}
        if plan is not None and plan.decision is not None:
            best = plan.decision.best
            decision = {"predicted_seconds": best.seconds, "predicted_tokens_per_s": best.tokens_per_s,
                        "decision": plan.decision.reason}
        counters = self.cache.counters.as_stats()
        syncs = self.cache.backend.host_syncs + sum(
            c.executor.runtime.host_syncs() for c in self.graphs.compiled if c.executor is not None)
        records = self.graphs.records
        pools = self.cache.cache
        phases = {phase: sum(getattr(r, phase) for r in records) for phase in ("trace", "passes", "lowering")}
        return {
            **latest,
            **decision,
            "compile_seconds_by_phase": phases,
            "inductor_cache_hits": sum(r.cache_hits for r in records),
            # Graphs built from captures saved earlier (this process or another), without dynamo.
            "saved_graphs_used": sum(r.saved is not None for r in records),
            # Prompt prefills n > 1 saved: each copy of a prompt took its cache instead of a prefill.
            "prefills_shared": self._prefills_shared,
            # The simulated asynchronous device's schedule (None on a real device) and how many copies it
            # completed later than they were issued, over the cache's backend and every graph's weights'.
            "async_sim": self.cache.backend.async_sim,
            "deferred_copies": self.cache.backend.deferred_copies + sum(
                c.executor.runtime.backend.deferred_copies for c in self.graphs.compiled if c.executor is not None),
            "act_ratio": self.cache.plan.act_ratio,
            "minibatch_size": plan.minibatch_rows if plan is not None else None,
            "graphs": len(self.graphs.compiled),
            # Blocks held by sequences: 0 between calls, whether the last one finished or raised.
            "cache_blocks_in_use": 0 if pools is None else sum(
                pool.num_blocks - pool.num_free() for pool in (pools.kv_pool, pools.act_pool)),
            **counters,
            "host_syncs": syncs,
            "host_syncs_per_step": syncs / counters["cache_steps"] if counters["cache_steps"] else 0.0,
        }

    @property
    def compiled_graphs(self) -> list[CompiledModel]:
        return list(self.graphs.compiled)

    def check_prompt_length(self, tokens: int, max_new_tokens: int, *, where: str) -> None:
        """Refuse a prompt of ``tokens`` tokens that, with ``max_new_tokens``, would pass the model's
        positions (or its sliding window); ``where`` names the prompt in the message."""
        check_prompt_length(self.model.config, tokens, max_new_tokens, where=where)

    def eos_token_ids(self) -> list[int]:
        """The tokens that end a sequence (the generation config's, else the model config's)."""
        return eos_token_ids(self.model)

    def pad_token_id(self) -> int:
        """The token rows are padded with (the pad token, else the first end-of-sequence token, else 0)."""
        return pad_token_id(self.model)

    # -- planning a call -------------------------------------------------------------------

    def _model_dims(self) -> ModelDims:
        if self._dims is None:
            dims = ModelDims.from_model(self.model).stored_as(self.config.quant)
            # Layers a loader left on disk (every weight file-mapped): the cost model reads them at every step.
            on_disk = sum(all(mapped_at(p) is not None for p in layer.parameters())
                          for layers in repeated_layers(self.model) for layer in layers)
            self._dims = dataclasses.replace(dims, disk_layers=on_disk)
        return self._dims

    def _groups(self, mask: torch.Tensor | None) -> list[list[int]] | None:
        """The mini-batches of the next step (None: run it whole): sequences grouped so each
        group's cache loads and compute are balanced, in the order that overlaps them best
        (:func:`~hscompile.planner.minibatch.form_minibatches`). ``mask`` is the prefill's mask,
        None for a decode step (its costs come from what the cache holds)."""
        assert self.plan is not None
        size = self.plan.minibatch_rows
        if size is None:
            return None
        if mask is not None:  # a prefill: every row is computed at the padded length
            costs = [SequenceCost(0.0, float(n)) for n in mask.sum(dim=1).tolist()]
        else:
            dims = self._model_dims()
            costs = [SequenceCost(*sequence_cost(dims, self.plan.profile, kv_tokens=kv, act_tokens=act, new=1))
                     for kv, act in self.cache.held_tokens()]
        return step_groups(size, costs)

    # -- the engine --------------------------------------------------------------------------

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, request: StepRequest,
              prefill: torch.Tensor | None = None) -> torch.Tensor:
        """One step: the model on ``ids`` through the compiled graph; the last position's logits."""
        backend = self.cache.backend
        with backend.tracking(ids, mask, positions, request.real):
            logits = self._step(ids, mask, positions, request, prefill)
            # The step's one wait: the graph's outputs come back without one (Runtime.copy_out).
            return self.cache.fetch(logits)[:, -1, :].float()

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, request: StepRequest,
              prefill: torch.Tensor | None) -> torch.Tensor:
        """The step's logits, as the graph returned them (not yet fetched)."""
        backend = self.cache.backend
        if next(self.model.parameters()).device == backend.device:
            # The model lives where its graphs run, so they take their inputs there (otherwise each
            # graph copies its inputs in itself: Runtime.copy_in).
            ids, mask, positions = (backend.upload(t) for t in (ids, mask, positions))
        for tensor in (ids, mask, positions):
            for dim in (0, 1):
                if tensor.shape[dim] > 1:  # one prefill graph for every prompt shape
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        request.groups = self._groups(prefill)
        tensors = dict(zip(INPUTS, (ids, mask, positions), strict=True))
        saved = self._run_saved(tensors, request)
        if saved is not None:
            return saved
        compiled_before, start = len(self.graphs.records), time.perf_counter()
        while True:
            try:
                # Floats such as attention's scale must stay constants: dynamo would otherwise lift one
                # that differs between two models of the same class as a run-time input.
                with self.cache.serving(request), tracing_settings(), self._regions.applied(), \
                        self.cache.backend.untracked():  # dynamo traces here
                    out = self._compiled(self.model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                         use_cache=False, logits_to_keep=1)
                break
            except _REGION_FAILURES as error:
                if not self._regions:
                    raise
                # Dynamo could not trace the layers as one region (a torch whose regions refuse
                # something these layers do): trace them one by one, as it always could; slower to
                # compile, the same graph. A failure that is not the regions' recurs without them.
                _LOG.warning("tracing the layers as one nested compile region failed, tracing each layer "
                             "instead: %s", str(error).splitlines()[0])
                self._regions.disable()
        if len(self.graphs.records) > compiled_before:  # this call compiled: what was not ours was dynamo's
            ran = sum(c.executor.last_seconds for c in self.graphs.compiled[compiled_before:] if c.executor is not None)
            self.graphs.traced(compiled_before, time.perf_counter() - start - ran)
        return out.logits

    def _key_graphs(self) -> None:
        """Key this call's saved graphs by the model as it is now (an attribute changed since the
        last call is a new key, as it would fail dynamo's guards)."""
        if not self.config.graph_cache:
            return
        store = CaptureStore.for_model(self.model, self._sources)
        current = self.graphs.store
        if store is None or current is None or store.key != current.key:
            self.graphs.store = store
            self._state = None

    def _run_saved(self, tensors: dict[str, torch.Tensor], request: StepRequest) -> torch.Tensor | None:
        """The step's logits from a graph an earlier capture saved, or None when none serves it
        (dynamo then captures one). A saved graph is compiled on its first use."""
        store = self.graphs.store
        if store is None:
            return None
        for entry in store.saved():
            if not entry.admits(tensors):
                continue
            args = entry.arguments(tensors, self._state_tensor)
            with self.cache.serving(request):
                if entry.compiled is None:
                    with self.cache.backend.untracked():  # compiling: not a step's work
                        if not self._compile_saved(store, entry, args):
                            continue
                if not entry.guards_pass(args):
                    continue
                assert entry.compiled is not None
                out = entry.compiled(*args)
            return out[0]
        return None

    def _compile_saved(self, store: CaptureStore, entry: SavedGraph, args: list[Any]) -> bool:
        """Load and compile ``entry`` for a call with ``args``; False when it cannot serve it."""
        start = time.perf_counter()
        graph = store.load(entry)
        if graph is None:
            return False
        try:
            examples = entry.examples(graph, args)
            if not entry.guards_pass(args):  # the capture's own guards, before spending a compilation
                return False
        except Exception as error:  # noqa: BLE001 - a torch whose shape environment differs: capture anew
            _LOG.info("not reusing the saved graph %s (%s): capturing it again", entry.path, error)
            entry.refused = True
            return False
        entry.compiled = self.graphs.compile_saved(entry, graph, examples, time.perf_counter() - start)
        entry.watch(graph)  # with the guards the passes added
        return True

    def _state_tensor(self, name: str) -> torch.Tensor:
        if self._state is None:
            self._state = dict(self.model.named_parameters(remove_duplicate=False))
            self._state.update(self.model.named_buffers(remove_duplicate=False))
        return self._state[name]

    def _generate_wave(self, ids: torch.Tensor, mask: torch.Tensor, totals: list[int], max_new_tokens: int,
                       picker: TokenPicker, eos: list[int], sources: list[int],
                       tick: Callable[[], None] = lambda: None,
                       stopping: Callable[[int, list[int]], bool] | None = None) -> tuple[torch.Tensor, list[int]]:
        """One wave's tokens, and how many each row generated before it ended (its end-of-sequence
        or stop token included; the rest is padding). ``sources[row]`` names the prompt a row
        samples from: rows that share one (``n > 1``) are prefilled once and the cache copies its
        blocks for the others (:meth:`~hscompile.runtime.cache.CacheRuntime.fork`). ``eos`` ends a
        row (empty: never)."""
        batch = ids.shape[0]
        pad = pad_token_id(self.model)
        firsts: dict[int, int] = {}
        for row, source in enumerate(sources):
            firsts.setdefault(source, row)
        unique = list(firsts.values())
        try:
            positions = mask.cumsum(dim=1) - 1
            positions.masked_fill_(mask == 0, 1)
            prefill = mask[unique]
            logits = self._call(ids[unique], prefill, positions[unique],
                                StepRequest(real=prefill.bool(), admit=[totals[r] for r in unique]), prefill=prefill)
            if len(unique) < batch:
                index = [unique.index(firsts[source]) for source in sources]
                self.cache.fork(index, totals)
                logits = logits[index]
                self._prefills_shared += batch - len(unique)
            unfinished = torch.ones(batch, dtype=torch.bool)
            generated: list[torch.Tensor] = []
            ends = torch.full((batch,), max_new_tokens)
            for step in range(max_new_tokens):
                tokens = picker(logits)
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
                ends = torch.where(unfinished | (ends < max_new_tokens), ends, step + 1)
                if step == max_new_tokens - 1 or not bool(unfinished.any()):
                    break
                lengths = torch.tensor([kv + act for kv, act in self.cache.held_tokens()])
                logits = self._call(tokens.view(batch, 1), torch.ones(batch, 1, dtype=torch.long),
                                    lengths.view(batch, 1), StepRequest(real=torch.ones(batch, 1, dtype=torch.bool)))
        finally:
            self.cache.end_batch()
        return torch.cat((ids, torch.stack(generated, dim=1)), dim=1), ends.tolist()


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A ``tick()`` per generated token position: a rich progress bar when ``show``, else nothing."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("generating", total=total)
        yield lambda: bar.advance(task)


def _stopping_for(stopping: Callable[[int, list[int]], bool] | None,
                  wave: list[int]) -> Callable[[int, list[int]], bool] | None:
    """``stopping`` with a wave's rows mapped back to the call's."""
    if stopping is None:
        return None
    return lambda row, ids: stopping(wave[row], ids)


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    options: Mapping[str, object] | None = None,
    progress: bool = False,
    **sampling: Any,
) -> torch.Tensor:
    """Generate with weight streaming and the hybrid KV/ACT cache; returns prompt + new tokens.

    The first call for a model and options compiles it (the :class:`Generator` is kept for
    later calls). ``params`` and ``sampling`` (SamplingParams' fields as keywords): see
    :meth:`Generator.generate`; the README for the options.
    """
    generator = kept_generator(model, options, lambda: Generator(model, options))
    return generator.generate(input_ids, attention_mask, params, progress=progress, **sampling)


def _vocab_size(model: torch.nn.Module) -> int | None:
    """How many token ids the model embeds (its input embedding's rows), where it says."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else getattr(model.config, "vocab_size", None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block (dropout off: the analysis refuses it), then each of its
    modules back in the mode it had, so a call never changes the caller's model."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
