"""The ``torch.ops.hybridserve.*`` operators: every runtime step a schedule calls.

All hybridserve ops live in one namespace, each with a fake (meta) kernel so graphs holding
them can be traced and lowered; importing this package registers them, once. By concern:

- :mod:`.sdpa`: ``attention`` (one layer's SDPA) and the output layout attention ops declare;
- :mod:`.weights`: ``prefetch_weights``, ``wait_weights``, ``release_weights`` (weight streaming);
- :mod:`.transfer`: ``to_device``, ``to_host`` (graph inputs and outputs);
- :mod:`.cache`: ``load_kv``, ``load_act``, ``recompute_kv``, ``cache_attention``, ``store_cache``,
  ``cache_step``, ``cache_commit``, ``cache_stub`` (the hybrid KV/ACT cache);
- :mod:`.effects`: ordered effects, which keep ops that return nothing alive through compilation;
- :mod:`.kernels`: each op's body bound to a runtime (:func:`bound_kernels`), without the dispatcher;
- :mod:`.context`: the runtime the executor binds for a call (:func:`~.context.active_runtime`);
- :mod:`.quant`: group-wise weight quantization (plain torch ops, no custom kernel).
"""

from __future__ import annotations

from ..ir.layout import GLOBAL_GROUP
from .cache import (
    cache_attention,
    cache_commit,
    cache_step,
    cache_stub,
    load_act,
    load_kv,
    recompute_kv,
    store_cache,
)
from .kernels import bound_kernels
from .sdpa import attention, in_attention_layout
from .transfer import to_device, to_host
from .weights import prefetch_weights, release_weights, wait_weights

__all__ = [
    "GLOBAL_GROUP",
    "attention",
    "bound_kernels",
    "cache_attention",
    "cache_commit",
    "cache_step",
    "cache_stub",
    "in_attention_layout",
    "load_act",
    "load_kv",
    "prefetch_weights",
    "recompute_kv",
    "release_weights",
    "store_cache",
    "to_device",
    "to_host",
    "wait_weights",
]
