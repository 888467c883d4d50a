"""The schedule's vocabulary: what a node of a schedule does, and where that is written.

Passes tag every step node they create with a :class:`StepInfo` under ``node.meta[STEP_META]``;
the runtime (mini-batch splitting, the timeline) and inspection read it with :func:`step_info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

__all__ = ["MIN_ROWS", "STEP_META", "StepInfo", "StepKind", "set_step", "step_info"]

STEP_META = "hybridserve"
"""The ``node.meta`` key holding a schedule node's :class:`StepInfo`."""

StepKind = Literal[
    "pre", "attn_in", "attention", "attn_out", "post",  # compute (this pass)
    "prefetch", "wait", "release", "to_device", "to_host",  # data movement (the offload pass)
    "load_kv", "load_act", "recompute", "store", "stub", "cache_step", "cache_commit",  # the hybrid cache
]


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a schedule node does; stored in ``node.meta[STEP_META]``."""

    kind: StepKind
    layer: int | None = None
    """The layer the step serves (for weight steps: the group, -1 for the global weights)."""


def step_info(node: fx.Node) -> StepInfo | None:
    """The :class:`StepInfo` of a schedule node, or None for placeholders, getitems and outputs."""
    return node.meta.get(STEP_META)


def set_step(node: fx.Node, kind: StepKind, layer: int | None = None) -> None:
    """Tag ``node`` as a schedule step of ``kind`` serving ``layer``."""
    node.meta[STEP_META] = StepInfo(kind, layer)


MIN_ROWS = 2
"""Rows of the smallest mini-batch of a graph with a symbolic batch. Dynamo compiles such a graph
for sizes >= 2 (it specialises 0 and 1), so its partitions are only ever run on 2 rows or more."""
