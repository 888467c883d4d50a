"""Text in, text out: prompts (or chat messages) through a tokenizer, completions back.

:func:`complete` is what :meth:`hscompile.Generator.generate_text` runs. It encodes each prompt on
its own (so a prompt's ids do not depend on its batch), pads the batch on the left itself, asks
the generator for token ids, and turns each row's new tokens into a :class:`Completion`: the ids
up to and including an end-of-sequence token or the token that completed a stop string, the
text they decode to (a stop string and what follows it cut off), and why it ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import CheckpointError
from .generation.params import SamplingParams, sampling_params, sequence_seed
from .generation.sampling import TokenLogprob

__all__ = ["Completion", "complete", "encode", "sequence_seed"]

Prompt = str | Sequence[Mapping[str, str]]
"""A text prompt, or chat messages (``[{"role": "user", "content": "..."}]``)."""


@dataclass(frozen=True, slots=True)
class Completion:
    """One prompt's generated text."""

    text: str
    """The generated tokens decoded (special tokens skipped); a stop string and what follows it are cut."""
    token_ids: list[int]
    """The generated tokens only (not the prompt), up to and including an end-of-sequence token."""
    finish_reason: Literal["stop", "length"]
    """``"stop"``: an end-of-sequence token or a stop string; ``"length"``: ``max_new_tokens`` reached."""
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """One per token of ``token_ids`` when the call asked for ``logprobs``: the token's
    log-probability under the processed scores and the most likely alternatives."""
    index: int | None = None
    """Which of the prompt's ``n`` samples this is (None when the call asked for one)."""

    def as_dict(self, tokenizer: Any | None = None) -> dict[str, Any]:
        """JSON-ready fields; with a ``tokenizer``, logprobs name each token's text too."""
        record: dict[str, Any] = {"text": self.text, "token_ids": list(self.token_ids),
                                  "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                                  "completion_tokens": self.completion_tokens}
        if self.index is not None:
            record["index"] = self.index
        if self.logprobs is not None:
            def entry(token: int, logprob: float) -> dict[str, Any]:
                named = {"token": tokenizer.decode([token])} if tokenizer is not None else {}
                return {"token_id": token, **named, "logprob": logprob}

            record["logprobs"] = [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                                  for t in self.logprobs]
        return record


def encode(tokenizer: Any, prompt: Prompt, *, chat: bool, where: str) -> list[int]:
    """The token ids of one prompt. Messages, or ``chat=True``, go through the tokenizer's chat
    template with the assistant's turn opened, as transformers' chat pipelines do."""
    if isinstance(prompt, str):
        if not prompt:
            raise CheckpointError(f"{where} is empty; give at least one character of prompt")
        if not chat:
            return list(tokenizer(prompt)["input_ids"])
        messages: Sequence[Mapping[str, str]] = [{"role": "user", "content": prompt}]
    else:
        messages = prompt
        if not isinstance(messages, Sequence) or not messages or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise CheckpointError(
                f"{where} must be a string or a non-empty list of messages "
                '[{"role": "user", "content": "..."}], got ' + repr(prompt)[:80]
            )
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{where} is a chat, but the checkpoint's tokenizer has no chat template; give plain text")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _stop_index(tokenizer: Any, ids: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """``(tokens, text)``: the fewest leading tokens of ``ids`` whose text contains a stop string,
    and that text cut before the earliest stop string; None when no stop string appears."""
    if not stops:
        return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not any(s in text for s in stops):
        return None
    low, high = 1, len(ids)
    while low < high:  # the text of a prefix grows with the prefix: bisect on "contains a stop"
        middle = (low + high) // 2
        if any(s in tokenizer.decode(ids[:middle], skip_special_tokens=True) for s in stops):
            high = middle
        else:
            low = middle + 1
    text = tokenizer.decode(ids[:low], skip_special_tokens=True)
    cut = min(text.find(s) for s in stops if s in text)
    return low, text[:cut]


def complete(
    generator: Any,
    prompts: Sequence[Prompt] | Prompt,
    params: SamplingParams | None = None,
    *,
    chat: bool = False,
    act_ratio: float | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
    **sampling: Any,
) -> list[Completion]:
    """See :meth:`hscompile.Generator.generate_text`. ``names`` label the prompts in errors
    (e.g. a batch job's input lines); by default ``prompt 0``, ``prompt 1``, ..."""
    tokenizer = generator.tokenizer
    if tokenizer is None:
        raise CheckpointError("this model has no tokenizer (the checkpoint holds none): generate token ids with "
                              "Generator.generate, or add the tokenizer's files to the checkpoint directory")
    request = sampling_params(params, **sampling)
    settings = request.resolve(getattr(generator.model, "generation_config", None))
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], Mapping)):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = list(prompts)  # type: ignore[arg-type]
    if not prompts:
        raise CheckpointError("no prompts given")
    labels = list(names) if names is not None else [f"prompt {i}" for i in range(len(prompts))]
    stops = settings.stop
    encoded = [encode(tokenizer, p, chat=chat, where=labels[i]) for i, p in enumerate(prompts)]
    for label, ids in zip(labels, encoded, strict=True):
        if not ids:
            raise CheckpointError(f"{label} encodes to no tokens")
        generator.check_prompt_length(len(ids), settings.max_new_tokens, where=label)
    width = max(len(ids) for ids in encoded)
    pad = generator.pad_token_id()
    batch = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        batch[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    stopping: Callable[[int, list[int]], bool] | None = None
    if stops:
        stopping = lambda row, ids: _stop_index(tokenizer, ids, stops) is not None  # noqa: E731
    out = generator.run(batch, mask, request, act_ratio=act_ratio, progress=progress, stopping=stopping)
    eos = set() if settings.ignore_eos else set(generator.eos_token_ids())
    completions = []
    for row in range(out.sequences.shape[0]):
        ids = encoded[row // settings.n]
        new = out.sequences[row, width:].tolist()
        finish: Literal["stop", "length"] = "length"
        for position, token in enumerate(new):
            if token in eos:
                new, finish = new[: position + 1], "stop"
                break
        cut = _stop_index(tokenizer, new, stops)
        if cut is not None:
            new, text, finish = new[: cut[0]], cut[1], "stop"
        else:
            new = new[:settings.max_new_tokens]
            text = tokenizer.decode(new, skip_special_tokens=True)
        logprobs = out.logprobs[row][: len(new)] if out.logprobs is not None else None
        completions.append(Completion(text=text, token_ids=new, finish_reason=finish, prompt_tokens=len(ids),
                                      completion_tokens=len(new), logprobs=logprobs,
                                      index=row % settings.n if settings.n > 1 else None))
    return completions
