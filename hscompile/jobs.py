"""The batch job: a JSONL file of prompts in, a JSONL file of completions out, nothing lost.

An input line is one request::

    {"id": "a", "prompt": "The capital of France is", "max_new_tokens": 16}
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "seed": 3}
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [...], "max_tokens": 16}}          # OpenAI Batch API lines

Optional per-line settings: the fields of :class:`~hscompile.SamplingParams` (``max_new_tokens``,
``min_new_tokens``, ``temperature`` (0: greedy; above 0: sampled at it), ``top_k``, ``top_p``,
``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``n``, ``seed``,
``stop``, ``logprobs``, ``ignore_eos``) and their OpenAI names: ``max_tokens`` /
``max_completion_tokens``, ``min_tokens``, and ``logprobs: true`` with ``top_logprobs: K`` (chat
completions) or ``logprobs: K`` (completions). ``model`` and ``user`` are accepted and change
nothing. Any other field is refused. Every line is checked before any work; an error names its
line number and id.

An output line carries the request's ``id`` and the fields of ``hscompile generate --json``
(with ``n > 1``, one line per sample, each with its ``index``).
Results are appended wave by wave, each wave's lines written with one ``write`` and flushed to
disk (``fsync``) before the next wave starts. A job started again with the same input skips the
ids already in the output; a torn last line (a job killed while writing) is cut off first and
its request done again. :func:`pending` and :func:`append` are that contract.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .generation.params import SamplingParams

__all__ = ["Request", "append", "group", "pending", "read_requests"]

_SAMPLING = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
"""OpenAI's (and vLLM's) names of SamplingParams' fields."""
_IGNORED = frozenset({"model", "user"})
"""OpenAI request fields that change nothing here (one model serves the job)."""
_SETTINGS = _SAMPLING | set(_ALIASES) | _IGNORED | {"prompt", "messages", "top_logprobs"}
"""What a request's settings (the line itself, or an OpenAI line's ``body``) may hold."""
_ENVELOPE = frozenset({"id", "custom_id", "method", "url", "body"})
"""The fields of an OpenAI Batch API line around its ``body``."""


@dataclass(frozen=True, slots=True)
class Request:
    """One input line, checked."""

    line: int
    """1-based line number in the input file."""
    id: str | int
    prompt: str | list[dict[str, str]]
    """Text, or chat messages."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """The line's own settings (SamplingParams' fields, checked), over the command line's."""

    @property
    def where(self) -> str:
        return f"line {self.line} (id {self.id!r})"


def _fail(line: int, message: str, ident: object = None) -> CheckpointError:
    where = f"input line {line}" + (f" (id {ident!r})" if ident is not None else "")
    return CheckpointError(f"{where}: {message}")


def _sampling(line: int, ident: object, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields of a request's ``settings``, OpenAI's names translated; an
    unknown field or a bad value is an error naming the line and id."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise _fail(line, f"unknown field(s) {', '.join(map(repr, unknown))}; a request may hold "
                          f"{', '.join(sorted(_SETTINGS))}", ident)
    sampling = {k: v for k, v in settings.items() if k in _SAMPLING}
    for alias, name in _ALIASES.items():
        if alias in settings:
            if name in sampling:
                raise _fail(line, f"{alias!r} and {name!r} name one setting; give one of them", ident)
            sampling[name] = settings[alias]
    top = settings.get("top_logprobs")
    logprobs = sampling.get("logprobs")
    if isinstance(logprobs, bool):  # chat completions: logprobs on/off, top_logprobs alternatives
        sampling["logprobs"] = (0 if top is None else top) if logprobs else None
        if top is not None and not logprobs:
            raise _fail(line, "'top_logprobs' needs 'logprobs': true", ident)
    elif top is not None:
        if logprobs is not None:
            raise _fail(line, "give 'logprobs': true with 'top_logprobs', or 'logprobs' alone", ident)
        sampling["logprobs"] = top
    if isinstance(sampling.get("stop"), list):
        sampling["stop"] = tuple(sampling["stop"])
    if "seed" in sampling and isinstance(sampling["seed"], list):
        raise _fail(line, f"'seed' must be an int (one request, one seed), got {sampling['seed']!r}", ident)
    try:
        SamplingParams(**sampling)
    except ValueError as error:
        raise _fail(line, str(error), ident) from None
    return sampling


def _parse(line: int, text: str) -> Request:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _fail(line, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise _fail(line, f"a request is a JSON object, got a JSON {type(data).__name__}")
    ident = data.get("id", data.get("custom_id"))
    if ident is None or isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise _fail(line, "needs an 'id' (or 'custom_id'): a non-empty string or an integer")
    body = data.get("body")
    if body is not None:  # the OpenAI Batch API's shape: settings inside "body"
        if not isinstance(body, dict):
            raise _fail(line, "'body' must be a JSON object", ident)
        unknown = sorted(set(data) - _ENVELOPE)
        if unknown:
            raise _fail(line, f"unknown field(s) {', '.join(map(repr, unknown))} beside 'body'; an OpenAI batch "
                              f"line holds {', '.join(sorted(_ENVELOPE))}", ident)
        settings = dict(body)
    else:
        settings = {k: v for k, v in data.items() if k not in ("id", "custom_id")}
    if ("prompt" in settings) == ("messages" in settings):
        raise _fail(line, "needs exactly one of 'prompt' (text) and 'messages' (a chat)")
    prompt = settings.get("prompt", settings.get("messages"))
    if "prompt" in settings and (not isinstance(prompt, str) or not prompt):
        raise _fail(line, f"'prompt' must be a non-empty string, got {prompt!r}"[:200])
    if "messages" in settings and not (
        isinstance(prompt, list) and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    ):
        raise _fail(line, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    return Request(line=line, id=ident, prompt=prompt, sampling=_sampling(line, ident, settings))


def read_requests(path: str | Path) -> list[Request]:
    """Every request of an input file, checked; the first bad line is an error naming it."""
    source = Path(path)
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read the input {source}: {error}") from None
    requests: list[Request] = []
    seen: dict[str | int, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        request = _parse(number, text)
        if request.id in seen:
            raise _fail(number, f"id {request.id!r} is used again (first on line {seen[request.id]}); ids must be unique")
        seen[request.id] = number
        requests.append(request)
    if not requests:
        raise CheckpointError(f"the input {source} holds no requests")
    return requests


def _done_ids(output: Path) -> set[str | int]:
    """Ids already in ``output``, after cutting off a torn last line (see the module docstring)."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    done: set[str | int] = set()
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if not raw.strip():
            offset += len(raw) + 1
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        whole = not last  # a line without its newline was cut short, even if it parses
        if whole and isinstance(record, dict) and "id" in record:
            done.add(record["id"])
            offset += len(raw) + 1
            continue
        if last or (number == len(lines) - 1 and not lines[-1]):
            with output.open("r+b") as handle:  # the torn final line goes; its request runs again
                handle.truncate(offset)
            break
        raise CheckpointError(f"{output} line {number} is not a result line; give a new --output or repair that file")
    return done


def pending(requests: Sequence[Request], output: str | Path) -> list[Request]:
    """The requests whose ids are not yet in ``output`` (whose parent directory must exist)."""
    target = Path(output)
    if not target.parent.is_dir():
        raise CheckpointError(f"the output's directory {target.parent} does not exist; create it or give another --output")
    if target.is_dir():
        raise CheckpointError(f"the output {target} is a directory; give a file path")
    done = _done_ids(target)
    return [r for r in requests if r.id not in done]


def append(output: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append result lines in one write, then flush them to disk."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
    if not text:
        return
    with open(output, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def group(requests: Sequence[Request], size: int, key: Any) -> list[list[Request]]:
    """Waves of at most ``size`` requests that share ``key(request)`` (settings one call must share),
    in input order within each wave."""
    by_key: dict[Any, list[Request]] = {}
    for request in requests:
        by_key.setdefault(key(request), []).append(request)
    waves: list[list[Request]] = []
    for members in by_key.values():
        waves += [members[i:i + size] for i in range(0, len(members), size)]
    return waves
