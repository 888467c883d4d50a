"""SamplingParams and the logits processing: validation, the checkpoint's defaults, and the
processed scores against transformers' own LogitsProcessors on the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hscompile import SamplingParams
from hscompile.generation.params import sample_seeds, sampling_params, sequence_seed
from hscompile.generation.sampling import TokenPicker, process

VOCAB = 40
EOS = [2, 7]


def _scores(rows: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def _history(rows: int = 4, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, length), generator=generator)


def _sampling(**fields):
    return SamplingParams(max_new_tokens=4, **fields).resolve(None)


def _seen(history: torch.Tensor) -> torch.Tensor:
    return torch.zeros(history.shape[0], VOCAB, dtype=torch.bool).scatter_(1, history, True)


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 0}, "n must be an int >= 1, got 0"),
        ({"logprobs": -1}, r"logprobs must be an int >= 0 \(alternatives per token\) or None, got -1"),
        ({"min_p": 2}, r"min_p must be in \[0, 1\] or None, got 2"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\] or None, got 0"),
        ({"top_k": -1}, r"top_k must be an int >= 0 \(0: no limit\) or None, got -1"),
        ({"temperature": -0.5}, r"temperature must be a number >= 0 \(0: greedy\) or None, got -0.5"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be a number > 0 \(1: none\) or None, got 0.0"),
        ({"presence_penalty": -2.5}, r"presence_penalty must be in \[-2, 2\] or None, got -2.5"),
        ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\] or None, got nan"),
        ({"stop": 3}, "stop must be a string or a list of non-empty strings, got 3"),
        ({"stop": ["ok", ""]}, r"stop must be a string or a list of non-empty strings, got \('ok', ''\)"),
        ({"seed": "abc"}, r"seed must be an int or a list of ints \(one per prompt\), got 'abc'"),
        ({"min_new_tokens": -1}, "min_new_tokens must be an int >= 0 or None, got -1"),
        ({"do_sample": False, "temperature": 0.7}, r"temperature must be 0 or None with do_sample=False \(greedy\)"),
        ({"do_sample": True, "temperature": 0}, r"temperature must be > 0 when sampling \(do_sample=True\), got 0"),
    ],
)
def test_a_bad_field_is_one_value_error_naming_it_and_its_range(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_unknown_keywords_are_a_type_error_listing_the_valid_names():
    with pytest.raises(TypeError, match=r"unknown sampling parameter\(s\) 'best_of', 'top_q'; valid: do_sample, "):
        sampling_params(top_q=0.5, best_of=2)
    params = sampling_params(SamplingParams(temperature=0.5), top_k=3, stop="x")
    assert params == SamplingParams(temperature=0.5, top_k=3, stop=("x",))


def test_do_sample_is_an_alias_folded_into_the_temperature():
    assert SamplingParams(do_sample=False) == SamplingParams(temperature=0.0)
    assert SamplingParams(do_sample=True, temperature=0.8) == SamplingParams(temperature=0.8)
    assert SamplingParams(do_sample=True).do_sample is True  # samples at the checkpoint's temperature


# -- the checkpoint's defaults ----------------------------------------------------------------


def test_the_generation_config_fills_unset_fields_as_transformers_does():
    greedy_config = GenerationConfig(do_sample=False, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.2,
                                     max_new_tokens=33)
    resolved = SamplingParams().resolve(greedy_config)
    # Greedy: transformers ignores temperature / top-k / top-p but applies the repetition penalty.
    assert resolved.greedy and (resolved.top_k, resolved.top_p, resolved.min_p) == (0, 1.0, 0.0)
    assert resolved.repetition_penalty == 1.2 and resolved.max_new_tokens == 33
    # A caller's temperature above 0 samples, with the config's filters.
    sampled = SamplingParams(temperature=0.8).resolve(greedy_config)
    assert not sampled.greedy and (sampled.temperature, sampled.top_k, sampled.top_p) == (0.8, 20, 0.9)
    # do_sample=True samples at the config's temperature.
    assert SamplingParams(do_sample=True).resolve(greedy_config).temperature == 0.6
    sampling_config = GenerationConfig(do_sample=True, temperature=0.7)
    chosen = SamplingParams(max_new_tokens=5).resolve(sampling_config)
    # transformers' defaults under the config: top_k 50, top_p 1.
    assert (chosen.temperature, chosen.top_k, chosen.top_p) == (0.7, 50, 1.0)
    assert SamplingParams(max_new_tokens=5, temperature=0).resolve(sampling_config).greedy
    with pytest.raises(ValueError, match="max_new_tokens must be given: the model's generation config sets none"):
        SamplingParams().resolve(sampling_config)
    with pytest.raises(ValueError, match=r"the model's generation config: top_p must be in \(0, 1\]"):
        SamplingParams(max_new_tokens=5).resolve(GenerationConfig(do_sample=True, top_p=1.5))


def test_sample_seeds_are_per_prompt_and_sample_zero_is_the_single_sample_seed():
    assert sample_seeds(None, 2, 3) is None
    seeds = sample_seeds(7, 2, 3)
    assert seeds is not None and len(set(seeds)) == 6
    assert seeds[0] == sequence_seed(7, 0) and seeds[3] == sequence_seed(7, 1)
    assert sample_seeds(7, 2, 1) == [seeds[0], seeds[3]]
    assert sample_seeds([11, 12], 2, 2) == [11, sequence_seed(11, 1), 12, sequence_seed(12, 1)]
    with pytest.raises(ValueError, match=r"seed must be an int or a list of 3 ints \(one per sequence\), got \[1, 2\]"):
        sample_seeds([1, 2], 3, 1)


# -- the processed scores equal transformers' -----------------------------------------------


def test_repetition_penalty_equals_transformers_exactly():
    scores, history = _scores(), _history()
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    got = process(scores, _sampling(temperature=0, repetition_penalty=1.3), seen=_seen(history))
    assert torch.equal(got, expected)


def test_min_new_tokens_suppresses_eos_as_transformers_does_exactly():
    scores, history = _scores(), _history()
    processor = MinNewTokensLengthLogitsProcessor(5, 4, torch.tensor(EOS))  # 5 prompt tokens, 4 generated so far
    sampling = _sampling(temperature=0, min_new_tokens=4)
    # transformers counts tokens past the prompt in input_ids; hscompile counts the steps taken.
    assert torch.equal(process(scores, sampling, generated=3, eos=EOS), processor(history[:, :8], scores))
    assert torch.equal(process(scores, sampling, generated=4, eos=EOS), processor(history[:, :9], scores))
    assert torch.isinf(process(scores, sampling, generated=3, eos=EOS)[:, EOS]).all()


@pytest.mark.parametrize(
    ("fields", "processors"),
    [
        ({"temperature": 0.7, "top_k": 0}, [TemperatureLogitsWarper(0.7)]),
        ({"temperature": 1.0, "top_k": 5}, [TopKLogitsWarper(5)]),
        ({"temperature": 1.0, "top_k": 0, "top_p": 0.8}, [TopPLogitsWarper(0.8)]),
        ({"temperature": 1.0, "top_k": 0, "min_p": 0.1}, [MinPLogitsWarper(0.1)]),
        # All of them, in transformers' order (_get_logits_processor, 5.24).
        ({"temperature": 0.6, "top_k": 12, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2},
         [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.6), TopKLogitsWarper(12),
          TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]),
    ],
)
def test_sampling_filters_equal_transformers_exactly(fields, processors):
    # The same ops in the same order as transformers' processors: the scores are equal bit for bit.
    scores, history = _scores(6, seed=3), _history(6)
    expected = LogitsProcessorList(processors)(history, scores.clone())
    got = process(scores, _sampling(**fields), seen=_seen(history))
    assert torch.equal(got, expected)
    assert torch.isfinite(got).any(dim=-1).all()  # every row keeps a token


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens_only():
    # logit[t] -= presence * (count[t] > 0) + frequency * count[t], count over generated tokens:
    # the prompt's tokens (here 9 and 4) are not penalized.
    vocab = 10
    base = torch.linspace(-1.0, 1.0, vocab)
    forced = [3, 3, 5]  # logits that make the greedy picker choose these tokens
    sampling = SamplingParams(max_new_tokens=4, temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                              logprobs=vocab).resolve(None)
    picker = TokenPicker(sampling, torch.tensor([[9, 4]]), torch.ones(1, 2, dtype=torch.long), [], None)
    for token in forced:
        step = torch.full((1, vocab), -50.0)
        step[0, token] = 50.0
        assert int(picker(step)[0]) == token
    picker(base[None].clone())
    hand = base.clone()
    hand[3] -= 0.5 + 0.25 * 2
    hand[5] -= 0.5 + 0.25 * 1
    records = picker.logprobs(0, [3, 3, 5, int(hand.argmax())])
    assert records is not None
    last = dict(records[-1].top)
    expected = torch.log_softmax(hand, dim=-1)
    assert all(math.isclose(last[t], float(expected[t]), abs_tol=1e-6) for t in range(vocab))


def test_the_picker_penalizes_prompt_tokens_but_not_padding_for_the_repetition_penalty():
    vocab = 8
    scores = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 0.0, 1.5, -2.0]])
    prompt, mask = torch.tensor([[0, 0, 4, 2]]), torch.tensor([[0, 0, 1, 1]])  # token 0 is padding
    sampling = SamplingParams(max_new_tokens=2, temperature=0, repetition_penalty=2.0, logprobs=vocab).resolve(None)
    picker = TokenPicker(sampling, prompt, mask, [], None)
    assert int(picker(scores.clone())[0]) == 1  # 4 was 3.0, now 1.5: 1 (2.0) wins
    hand = scores[0].clone()
    hand[4], hand[2] = 1.5, -2.0  # token 0 (padding) keeps its 1.0
    records = picker.logprobs(0, [1])
    assert records is not None
    expected = torch.log_softmax(hand, dim=-1)
    assert all(math.isclose(v, float(expected[t]), abs_tol=1e-6) for t, v in records[0].top)
    assert math.isclose(records[0].logprob, float(expected[1]), abs_tol=1e-6)
