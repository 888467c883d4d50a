"""The batch job: a JSONL file of prompts in, a JSONL file of completions out, nothing lost.

An input line is one request::

    {"id": "a", "prompt": "The capital of France is", "max_new_tokens": 16}
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "seed": 3}
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [...], "max_tokens": 16}}          # OpenAI Batch API lines

Optional per-line settings: ``max_new_tokens`` (``max_tokens`` in a body), ``temperature`` (0:
greedy; above 0: sampled at it), ``top_k``, ``top_p``, ``seed``, ``stop``. Every line is checked
before any work; an error names its line number (and id).

An output line carries the request's ``id`` and the fields of ``hscompile generate --json``.
Results are appended wave by wave, each wave's lines written with one ``write`` and flushed to
disk (``fsync``) before the next wave starts. A job started again with the same input skips the
ids already in the output; a torn last line (a job killed while writing) is cut off first and
its request done again. :func:`pending` and :func:`append` are that contract.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["Request", "append", "group", "pending", "read_requests"]


@dataclass(frozen=True, slots=True)
class Request:
    """One input line, checked."""

    line: int
    """1-based line number in the input file."""
    id: str | int
    prompt: str | list[dict[str, str]]
    """Text, or chat messages."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    @property
    def where(self) -> str:
        return f"line {self.line} (id {self.id!r})"


def _fail(line: int, message: str) -> CheckpointError:
    return CheckpointError(f"input line {line}: {message}")


def _number(line: int, data: Mapping[str, Any], key: str, kind: type, low: float, *, above: bool = False) -> Any:
    value = data.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (value <= low if above else value < low):
        bound = f"> {low}" if above else f">= {low}"
        raise _fail(line, f"{key!r} must be {'a number' if kind is float else 'an integer'} {bound}, got {value!r}")
    return kind(value)


def _parse(line: int, text: str) -> Request:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _fail(line, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise _fail(line, f"a request is a JSON object, got a JSON {type(data).__name__}")
    body = data.get("body")
    if body is not None:  # the OpenAI Batch API's shape: settings inside "body"
        if not isinstance(body, dict):
            raise _fail(line, "'body' must be a JSON object")
        settings = dict(body)
        if "max_tokens" in settings and "max_new_tokens" not in settings:
            settings["max_new_tokens"] = settings.pop("max_tokens")
    else:
        settings = data
    ident = data.get("id", data.get("custom_id"))
    if ident is None or isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise _fail(line, "needs an 'id' (or 'custom_id'): a non-empty string or an integer")
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
    stop = settings.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise _fail(line, f"'stop' must be a string or a list of non-empty strings, got {stop!r}")
    return Request(
        line=line, id=ident, prompt=prompt,
        max_new_tokens=_number(line, settings, "max_new_tokens", int, 1),
        temperature=_number(line, settings, "temperature", float, 0),
        top_k=_number(line, settings, "top_k", int, 1),
        top_p=_number(line, settings, "top_p", float, 0, above=True),
        seed=_number(line, settings, "seed", int, 0),
        stop=stops,
    )


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
        if last or number == len(lines) - 1 and not lines[-1]:
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
