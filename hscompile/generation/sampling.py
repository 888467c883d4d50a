"""Picking tokens: greedy or sampled (temperature, top-k, top-p), one seeded stream per sequence,
and the tokens that end and pad a sequence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..text import sequence_seed

__all__ = ["Sampling", "check_sampling", "eos_token_ids", "pad_token_id", "samplers", "select"]


def check_sampling(do_sample: bool, temperature: object, top_k: object, top_p: object) -> None:
    """Refuse sampling settings ``transformers`` would refuse (checked only when sampling)."""
    if not do_sample:
        return
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a wave picks tokens: greedily, or sampling with one random stream per row."""

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    samplers: list[torch.Generator | None] | None


def samplers(seed: int | Sequence[int] | None, batch: int) -> list[torch.Generator | None]:
    """One random stream per sequence (see :meth:`~hscompile.Generator.generate`); None rows use torch's global one."""
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


def select(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
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
