"""A call's sampling parameters: one frozen, validated :class:`SamplingParams` (the names vLLM
users know), and how the checkpoint's generation config fills what the caller left unset.

Every entry point (``Generator.generate`` / ``generate_text``, ``hscompile.generate``,
``text.complete``, batch lines, the CLI) takes a ``SamplingParams`` or its fields as keywords;
:func:`sampling_params` is the one place those keywords are checked. :meth:`SamplingParams.resolve`
then applies the model's ``generation_config`` as transformers does (its values where the caller
gave none, transformers' global defaults under those), with one deliberate difference: a
``temperature`` above 0 from the caller means sampling even where the checkpoint says greedy
(transformers would ignore it with a warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Sampling", "SamplingParams", "sampling_params", "sequence_seed"]

# transformers' defaults under a checkpoint's generation config
# (GenerationConfig._get_default_generation_params, transformers 5.24).
_DEFAULT_TEMPERATURE = 1.0
_DEFAULT_TOP_K = 50


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How a call picks its tokens. ``None`` means "the checkpoint's default" (its
    ``generation_config.json``, then transformers' defaults): see :meth:`resolve`.

    >>> SamplingParams(temperature=0.8, top_p=0.95, n=2, seed=7)  # doctest: +SKIP
    """

    max_new_tokens: int | None = None
    """Tokens to generate per sequence, >= 1 (None: the generation config's ``max_new_tokens``)."""
    min_new_tokens: int | None = None
    """End-of-sequence tokens are suppressed until this many tokens are generated, >= 0."""
    temperature: float | None = None
    """>= 0. 0 decodes greedily; above 0 samples at it, whatever the checkpoint's ``do_sample``."""
    do_sample: bool | None = None
    """transformers' switch, kept for its users: False is greedy (temperature 0); True samples at
    ``temperature``, or at the checkpoint's when none is given."""
    top_k: int | None = None
    """Sample among the ``top_k`` most likely tokens, >= 0 (0: no limit)."""
    top_p: float | None = None
    """Sample among the most likely tokens whose probabilities sum to ``top_p``, in (0, 1]."""
    min_p: float | None = None
    """Drop tokens less likely than ``min_p`` times the most likely one, in [0, 1]."""
    repetition_penalty: float | None = None
    """> 0: logits of tokens of the prompt or generated so far are divided by it (multiplied where
    negative), as transformers' ``RepetitionPenaltyLogitsProcessor``; 1 is none."""
    presence_penalty: float | None = None
    """In [-2, 2]: subtracted from the logit of every token generated at least once (OpenAI's)."""
    frequency_penalty: float | None = None
    """In [-2, 2]: subtracted from a token's logit once per time it was generated (OpenAI's)."""
    n: int = 1
    """Completions per prompt, >= 1; the prompt is prefilled once and its cache copied."""
    seed: int | tuple[int, ...] | None = None
    """Makes sampling reproducible: an int seeds the call (each sequence its own stream, see
    :func:`sequence_seed`), a list gives each prompt its own seed."""
    stop: tuple[str, ...] = ()
    """Stop strings (a string or a list of non-empty strings): text ends before the first."""
    logprobs: int | None = None
    """>= 0: return each generated token's log-probability and that many most likely alternatives."""
    ignore_eos: bool = False
    """Keep generating after an end-of-sequence token (to ``max_new_tokens``)."""

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def optional(name: str, test: Any, expected: str) -> None:
            value = getattr(self, name)
            check(name, value is None or test(value), expected + " or None")

        optional("max_new_tokens", lambda v: _is_int(v) and v >= 1, "an int >= 1")
        optional("min_new_tokens", lambda v: _is_int(v) and v >= 0, "an int >= 0")
        optional("temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: greedy)")
        optional("do_sample", lambda v: isinstance(v, bool), "True or False")
        optional("top_k", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no limit)")
        optional("top_p", lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]")
        optional("min_p", lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]")
        optional("repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0 (1: none)")
        optional("presence_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "in [-2, 2]")
        optional("frequency_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "in [-2, 2]")
        check("n", _is_int(self.n) and self.n >= 1, "an int >= 1")
        optional("logprobs", lambda v: _is_int(v) and v >= 0, "an int >= 0 (alternatives per token)")
        check("ignore_eos", isinstance(self.ignore_eos, bool), "True or False")
        seed = self.seed
        if isinstance(seed, Sequence) and not isinstance(seed, str):
            object.__setattr__(self, "seed", seed := tuple(seed))
        check("seed", seed is None or _is_int(seed) or (isinstance(seed, tuple) and all(_is_int(s) for s in seed)),
              "an int or a list of ints (one per prompt)")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        check("stop", isinstance(stop, tuple) and all(isinstance(s, str) and s for s in stop),
              "a string or a list of non-empty strings")
        # do_sample is an alias: fold it into the temperature where that says the same.
        if self.do_sample is not None and self.temperature is not None:
            if not self.do_sample and self.temperature > 0:
                raise ValueError(f"temperature must be 0 or None with do_sample=False (greedy), got {self.temperature!r}; "
                                 "give one of the two")
            if self.do_sample and self.temperature == 0:
                raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {self.temperature!r}")
            object.__setattr__(self, "do_sample", None)
        elif self.do_sample is False:
            object.__setattr__(self, "temperature", 0.0)
            object.__setattr__(self, "do_sample", None)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` (field names, checked like the constructor's)."""
        return dataclasses.replace(self, **_checked(changes))

    def resolve(self, generation_config: Any) -> Sampling:
        """The settings a call runs with: this object's fields, the generation config's where
        they are None, transformers' defaults under both.

        As transformers: greedy unless the config (or the caller's ``do_sample=True``) says to
        sample, in which case ``temperature``, ``top_k``, ``top_p`` and ``min_p`` apply; the
        repetition penalty and ``min_new_tokens`` apply either way. Unlike transformers, a
        caller's ``temperature`` above 0 samples whatever the config says, and 0 is greedy.
        The config's other processors (``min_length`` / ``max_length`` in total tokens,
        ``no_repeat_ngram_size``, ``bad_words_ids``, ``suppress_tokens``, ...) are not applied.
        """

        def config(name: str) -> Any:
            return getattr(generation_config, name, None) if generation_config is not None else None

        def pick(name: str, default: Any) -> Any:
            own = getattr(self, name)
            if own is not None:
                return own
            value = config(name)
            return default if value is None else value

        if self.temperature is not None:
            sample = self.temperature > 0
        elif self.do_sample:
            sample = True
        else:
            sample = bool(config("do_sample"))
        temperature = float(pick("temperature", _DEFAULT_TEMPERATURE)) if sample else 0.0
        if sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (from the generation config)")
        max_new = pick("max_new_tokens", None)
        if max_new is None:
            raise ValueError("max_new_tokens must be given: the model's generation config sets none")
        resolved = Sampling(
            max_new_tokens=int(max_new),
            min_new_tokens=int(pick("min_new_tokens", 0)),
            temperature=temperature,
            top_k=int(pick("top_k", _DEFAULT_TOP_K)) if sample else 0,
            top_p=float(pick("top_p", 1.0)) if sample else 1.0,
            min_p=float(pick("min_p", 0.0)) if sample else 0.0,
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            n=self.n,
            seed=self.seed,
            stop=self.stop,
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
        )
        # Values from the generation config pass the same checks as the caller's.
        names = ("max_new_tokens", "min_new_tokens", "repetition_penalty") + (
            ("temperature", "top_k", "top_p", "min_p") if sample else ())
        try:
            SamplingParams(**{name: getattr(resolved, name) for name in names})
        except ValueError as error:
            raise ValueError(f"the model's generation config: {error}") from None
        return resolved


_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class Sampling:
    """A call's settings with every default applied (:meth:`SamplingParams.resolve`): what the
    token picker reads. ``temperature`` 0 is greedy; filters that are off hold their neutral value
    (``top_k`` 0, ``top_p`` 1, ``min_p`` 0, penalties 1 / 0)."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    n: int
    seed: int | tuple[int, ...] | None
    stop: tuple[str, ...]
    logprobs: int | None
    ignore_eos: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _checked(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(_FIELDS))}")
    return dict(kwargs)


def sampling_params(params: SamplingParams | None = None, /, **kwargs: Any) -> SamplingParams:
    """``params`` with ``kwargs`` (SamplingParams' fields, checked: an unknown name is a
    ``TypeError`` listing the valid ones) applied over it; the one place entry points turn their
    keywords into a :class:`SamplingParams`."""
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    changes = _checked(kwargs)
    if params is None:
        return SamplingParams(**changes)
    return params.replace(**changes) if changes else params


def sequence_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` of a call seeded with ``seed``: a hash of both, so each
    sequence samples from a stream of its own, whatever batch, wave or mini-batch it runs in."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_seeds(seed: int | Sequence[int] | None, prompts: int, n: int) -> list[int] | None:
    """One seed per sequence of a call of ``prompts`` prompts with ``n`` samples each, prompt-major
    (None: unseeded). Prompt ``i``'s seed is ``seed[i]`` (a list) or ``sequence_seed(seed, i)``;
    its sample 0 uses that seed, so it equals the ``n=1`` result, and sample ``j > 0`` uses
    ``sequence_seed(that seed, j)``."""
    if seed is None:
        return None
    if _is_int(seed):
        per_prompt = [sequence_seed(int(seed), i) for i in range(prompts)]  # type: ignore[arg-type]
    else:
        per_prompt = list(seed)  # type: ignore[arg-type]
        if len(per_prompt) != prompts or not all(_is_int(s) for s in per_prompt):
            raise ValueError(f"seed must be an int or a list of {prompts} ints (one per sequence), got {list(seed)!r}")
    return [s if j == 0 else sequence_seed(s, j) for s in per_prompt for j in range(n)]
