"""Tiny random-weight decoders built from configs (nothing is downloaded)."""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
"""The five families every correctness test covers."""

GQA_FAMILIES = ("llama", "mistral", "qwen2")

VOCAB = 128


def tiny_config(family: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **overrides):
    common = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                   "qwen2": transformers.Qwen2Config}
        cls = classes[family]
        config = cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
    elif family == "opt":
        config = transformers.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, word_embed_proj_dim=hidden, **common)
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=VOCAB, n_positions=256,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts(batch: int = 3, seq: int = 11, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


class Block(nn.Module):
    """A pre-norm decoder block written from scratch, in no model library: proof that the
    analysis finds structure, not class names."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.wk = nn.Linear(dim, dim)
        self.wq = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(h)), split(self.wk(h)), split(self.wv(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.ff(self.norm2(x))


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 48, heads: int = 3, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(64, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.head_norm(x))


class WrappedDecoder(TinyDecoder):
    """:class:`TinyDecoder` whose ``forward`` sits behind a ``def wrapper(*args, **kwargs)``
    decorator, as transformers >= 5.24 wraps its models' (``deprecate_kwarg``): dynamo's top frame is
    then the wrapper and the model is ``L['args'][0]``, not ``L['self']``."""

    @staticmethod
    def _decorate(forward):
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            return forward(*args, **kwargs)

        return wrapper

    forward = _decorate(TinyDecoder.forward)


def cache_keyword(model: nn.Module) -> str:
    """The keyword a transformers model takes its cache by: ``cache`` on transformers >= 5.24
    (where ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(inspect.unwrap(model.forward)).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The cache a transformers model returned, under either name (see :func:`cache_keyword`)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
"""A chat template for the test tokenizer (role-prefixed turns; the assistant's turn opened)."""

TEXT_VOCAB = 320
"""The test tokenizer's vocabulary: 3 special tokens, the 256 bytes, and merges."""

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that wrote text one token at a time.",
    "hello world, hello there; the quick brown fox jumps over the lazy dog 0123456789",
]


def text_tokenizer():
    """A byte-level BPE tokenizer trained here on a few sentences (nothing is downloaded):
    ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, as :func:`tiny_config` declares."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TEXT_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def save_checkpoint(path, family: str = "llama", *, tokenizer: bool = True, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **config_kwargs):
    """A real checkpoint directory (config.json, safetensors, tokenizer) of a tiny random model;
    returns the model as saved."""
    model = tiny_model(family, dtype=dtype, vocab_size=TEXT_VOCAB, **config_kwargs)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        text_tokenizer().save_pretrained(path)
    return model


def ragged_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Five left-padded prompts of different lengths (9, 5, 9, 7, 9 tokens) and their mask."""
    ids = prompts(5, 9, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask
