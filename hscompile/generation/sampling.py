"""Picking tokens: the logits processed in transformers' order, then greedy or one seeded draw
per sequence; the log-probabilities a call returns; the tokens that end and pad a sequence.

The order is transformers' ``_get_logits_processor`` (5.24): repetition penalty, then OpenAI's
presence and frequency penalties (no transformers processor; vLLM applies them with the
repetition penalty, before temperature), then end-of-sequence suppression until
``min_new_tokens``; when sampling, temperature, top-k, top-p, min-p. Each step is written as
transformers' processor computes it, so the processed scores are the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .params import Sampling

__all__ = ["TokenLogprob", "TokenPicker", "eos_token_ids", "pad_token_id", "process", "samplers"]


def samplers(seeds: Sequence[int] | None, batch: int) -> list[torch.Generator | None]:
    """One random stream per sequence (:func:`~hscompile.generation.params.sample_seeds`); without
    seeds every row uses torch's global one."""
    if seeds is None:
        return [None] * batch
    return [torch.Generator().manual_seed(s & (2**63 - 1)) for s in seeds]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the processed scores (what transformers'
    ``generate(output_scores=True)`` returns, through ``log_softmax``) and the most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """``(token_id, logprob)`` of the ``logprobs`` most likely tokens, most likely first (tokens a
    filter removed, whose log-probability is -inf, are left out)."""


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: a seen token's logit divided by
    ``penalty`` where positive, multiplied where negative."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def presence_frequency_penalty(scores: torch.Tensor, counts: torch.Tensor, presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI's: ``logit - presence * (count > 0) - frequency * count``, ``count`` the times the
    token was generated (the prompt does not count)."""
    return scores - presence * (counts > 0).to(scores.dtype) - frequency * counts.to(scores.dtype)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """transformers' ``TopKLogitsWarper``."""
    kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper`` (keeps at least one token)."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """transformers' ``MinPLogitsWarper`` (keeps at least the most likely token)."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return scores.masked_fill(remove, -math.inf)


def process(scores: torch.Tensor, sampling: Sampling, *, seen: torch.Tensor | None = None,
            counts: torch.Tensor | None = None, generated: int = 0, eos: Sequence[int] = ()) -> torch.Tensor:
    """The scores transformers' processors would give for ``scores`` (``(rows, vocab)`` float):
    ``seen`` marks each row's prompt and generated tokens, ``counts`` how often each was
    generated, ``generated`` how many tokens each row has generated so far. A processor at its
    neutral value is skipped, as transformers skips it."""
    if sampling.repetition_penalty != 1.0 and seen is not None:
        scores = repetition_penalty(scores, seen, sampling.repetition_penalty)
    if (sampling.presence_penalty or sampling.frequency_penalty) and counts is not None:
        scores = presence_frequency_penalty(scores, counts, sampling.presence_penalty, sampling.frequency_penalty)
    if generated < sampling.min_new_tokens and eos:
        suppressed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        suppressed[[e for e in eos if e < scores.shape[-1]]] = True
        scores = torch.where(suppressed.to(scores.device), -math.inf, scores)
    if sampling.greedy:
        return scores
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        scores = top_k_filter(scores, sampling.top_k)
    if sampling.top_p < 1.0:
        scores = top_p_filter(scores, sampling.top_p)
    if sampling.min_p:
        scores = min_p_filter(scores, sampling.min_p)
    return scores


class TokenPicker:
    """Picks one wave's tokens step by step, keeping what the penalties and logprobs need: which
    tokens each row has seen (prompt and generated) and how often it generated each."""

    def __init__(self, sampling: Sampling, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos: Sequence[int],
                 streams: list[torch.Generator | None] | None) -> None:
        self.sampling = sampling
        self.eos = list(eos)
        self.streams = streams or [None] * prompt_ids.shape[0]
        self._prompt = prompt_ids.masked_fill(prompt_mask == 0, -1)  # padding is not a seen token
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self.generated = 0
        self._chosen: list[torch.Tensor] = []
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _state(self, vocab: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        sampling = self.sampling
        if self._seen is None and sampling.repetition_penalty != 1.0:
            # One column past the vocabulary absorbs padding (-1) and ids the head does not produce.
            seen = torch.zeros(self._prompt.shape[0], vocab + 1, dtype=torch.bool)
            seen.scatter_(1, self._prompt.clamp(max=vocab).where(self._prompt >= 0, vocab), True)
            self._seen = seen
        if self._counts is None and (sampling.presence_penalty or sampling.frequency_penalty):
            self._counts = torch.zeros(self._prompt.shape[0], vocab, dtype=torch.long)
        return (None if self._seen is None else self._seen[:, :vocab]), self._counts

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, from its last position's ``(rows, vocab)`` float logits."""
        vocab = logits.shape[-1]
        seen, counts = self._state(vocab)
        scores = process(logits, self.sampling, seen=seen, counts=counts, generated=self.generated, eos=self.eos)
        if self.sampling.greedy:
            tokens = scores.argmax(dim=-1)
        else:
            probs = scores.softmax(dim=-1)
            # Row by row, each from its own stream: a row's draw must not depend on the rows beside it.
            tokens = torch.cat([torch.multinomial(probs[row], 1, generator=self.streams[row])
                                for row in range(probs.shape[0])])
        if self.sampling.logprobs is not None:
            logp = torch.log_softmax(scores, dim=-1)
            self._chosen.append(logp.gather(1, tokens[:, None])[:, 0])
            if self.sampling.logprobs:
                top = torch.topk(logp, min(self.sampling.logprobs, vocab), dim=-1)
                self._top.append((top.indices, top.values))
        if self._seen is not None:
            self._seen.scatter_(1, tokens[:, None].clamp(max=vocab), True)
        if self._counts is not None:
            self._counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None]))
        self.generated += 1
        return tokens

    def logprobs(self, row: int, tokens: Sequence[int]) -> list[TokenLogprob] | None:
        """Row ``row``'s logprobs for its first ``len(tokens)`` generated tokens (None when the call
        asked for none)."""
        if self.sampling.logprobs is None:
            return None
        out = []
        for step, token in enumerate(tokens):
            top: tuple[tuple[int, float], ...] = ()
            if self._top:
                ids, values = self._top[step]
                top = tuple((int(i), float(v)) for i, v in zip(ids[row].tolist(), values[row].tolist(), strict=True)
                            if math.isfinite(v))
            out.append(TokenLogprob(int(token), float(self._chosen[step][row]), top))
        return out


def eos_token_ids(model: Any) -> list[int]:
    """The tokens that end a sequence (the generation config's, else the model config's)."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_token_id(model: Any) -> int:
    """The token rows are padded with (the pad token, else the first end-of-sequence token, else 0)."""
    config = getattr(model, "generation_config", None) or model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = eos_token_ids(model)
        return eos[0] if eos else 0
    return int(pad)
