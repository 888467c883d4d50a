"""Checks of a generation call's input, before any work: shapes, left padding, lengths.

Every refusal is a ``ValueError`` (or :class:`~hscompile.errors.UnsupportedModelError` for what
the model cannot do) naming what is wrong and what would be valid.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..ir.cache import max_positions

__all__ = ["check_batch", "check_experts", "check_not_prequantized", "check_prompt_length", "sliding_window"]


def check_batch(input_ids: object, attention_mask: object, max_new_tokens: object,
                vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` as long tensors on the CPU, after checking that ``input_ids`` is a non-empty
    2-D integer batch (any integer dtype) of ids in ``[0, vocab_size)``, left-padded as
    ``attention_mask`` (1 for tokens, 0 for padding; default: no padding) says, with at least one
    token per row, and ``max_new_tokens >= 1``."""
    integer = (isinstance(input_ids, torch.Tensor) and not input_ids.dtype.is_floating_point
               and not input_ids.dtype.is_complex and input_ids.dtype != torch.bool)
    if not integer or input_ids.dim() != 2:
        described = (f"a {input_ids.dim()}-D {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}"
                     if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
        raise ValueError(f"input_ids must be a 2-D integer tensor (batch, seq); got {described}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    ids = input_ids.long().cpu()
    if vocab_size is not None:
        outside = (ids < 0) | (ids >= vocab_size)
        if bool(outside.any()):
            row, position = (int(i) for i in outside.nonzero()[0])
            raise ValueError(
                f"input_ids[{row}, {position}] = {int(ids[row, position])} is not a token id of this model: its "
                f"vocabulary has {vocab_size} ids (0 to {vocab_size - 1}); {int(outside.sum())} id(s) are outside it"
            )
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(ids.shape)}; got "
                f"{tuple(getattr(attention_mask, 'shape', ()))}"
            )
        mask = attention_mask.long().cpu()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"sequence {int((lengths == 0).nonzero()[0])} of the batch has no tokens (its mask is all 0)")
    # Left padding: once a row's tokens start, they continue to the end.
    started = mask.cumsum(dim=1) > 0
    if bool((started & (mask == 0)).any()):
        raise ValueError(
            "the batch is not left-padded: padding must come before each prompt (e.g. tokenizer.padding_side='left')"
        )
    return ids, mask


def sliding_window(config: Any) -> int | None:
    """The sliding window some layer of a model of ``config`` attends within (None: none does).
    transformers 5 says per layer how it attends (``layer_types``): a window applies only where a
    layer is ``"sliding_attention"``, whatever ``sliding_window`` holds (Qwen2-MoE's config has
    ``sliding_window=0`` with every layer full attention); older configs say it with
    ``use_sliding_window``, or with ``sliding_window`` alone (None or 0: none)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if any("sliding" in str(kind) for kind in layer_types) else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def check_prompt_length(config: Any, tokens: int, max_new_tokens: int, *, where: str) -> None:
    """Refuse a prompt of ``tokens`` tokens that, with ``max_new_tokens``, would pass the maximum
    positions (or the sliding window) of a model of ``config``; ``where`` names the prompt."""
    found = max_positions(config)
    limit = found[0] if found is not None else None
    if limit is not None and tokens > limit:
        raise ValueError(f"{where} has {tokens} tokens, more than the model's maximum positions ({limit})")
    if limit is not None and tokens + max_new_tokens > limit:
        raise ValueError(
            f"{where} of {tokens} tokens + max_new_tokens={max_new_tokens} = {tokens + max_new_tokens} tokens "
            f"exceeds the model's maximum positions ({limit}); use max_new_tokens <= {limit - tokens}"
        )
    window = sliding_window(config)
    if window is not None and tokens + max_new_tokens > window:
        raise UnsupportedModelError(
            f"this model attends within a sliding window of {window} tokens; generating past it "
            f"({tokens + max_new_tokens} tokens for {where}) is not supported yet: use max_new_tokens <= "
            f"{window - tokens}"
        )


_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
"""Where mixture-of-experts configs give their number of routed experts (Mixtral and gpt-oss;
Qwen-MoE and OLMoE; DeepSeek)."""


def check_experts(config: Any, where: str) -> None:
    """Refuse a mixture-of-experts config whose router picks more experts per token
    (``num_experts_per_tok``) than it has: transformers accepts it and the model fails inside its
    first forward. ``config`` is a transformers config or its ``config.json`` dict."""
    def get(name: str) -> Any:
        return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

    top_k = get("num_experts_per_tok")
    found = next(((name, get(name)) for name in _EXPERT_COUNTS if isinstance(get(name), int)), None)
    if found is None or top_k is None:
        return
    name, experts = found
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= experts:
        raise ConfigError(f"{where}: num_experts_per_tok is {top_k!r}, but the router chooses among {experts} experts "
                          f"({name}); give a number of experts per token from 1 to {experts}")


def check_not_prequantized(quantization_config: object, where: str) -> None:
    """Refuse a checkpoint or model that is already quantized (GPTQ, AWQ, bitsandbytes, ...).

    Its layers hold packed integers in a format of its own, which hscompile does not read; it
    quantizes full-precision weights itself (``weight_quant``). ``quantization_config`` is the
    transformers config's entry (None or absent: nothing to refuse)."""
    if quantization_config is None:
        return
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else getattr(
        quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    raise CheckpointError(
        f"{where} is already quantized ({method or 'a quantization_config'}): hscompile does not read pre-quantized "
        "weights (GPTQ, AWQ, bitsandbytes, ...). Give it the full-precision checkpoint and let it quantize the "
        "layers itself with options={'weight_quant': 'int8'} or 'int4'"
    )
