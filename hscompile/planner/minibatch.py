"""Mini-batch formation: which sequences of a step run together, and in what order.

:func:`form_minibatches` groups sequences into mini-batches with balanced loads and compute and
orders them by Johnson's rule, which minimises the makespan of the two-stage pipeline
"cache load on the link, then compute on the device" a layer is. Numbers only: the runtime's
:class:`~hscompile.runtime.minibatch.MiniBatchRunner` executes the groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..ir.schedule import MIN_ROWS

__all__ = ["SequenceCost", "form_minibatches", "makespan", "minibatch_count", "step_groups"]


@dataclass(frozen=True, slots=True)
class SequenceCost:
    """One sequence's share of a layer's step: seconds on the link and on the device."""

    load: float
    compute: float


def makespan(groups: Sequence[Sequence[SequenceCost]], *, overlap: bool) -> float:
    """Time of one layer over mini-batches run in order: with ``overlap``, mini-batch ``i + 1``'s
    load runs beside mini-batch ``i``'s compute (a two-stage flow shop); without, all is serial."""
    if not overlap:
        return sum(c.load + c.compute for g in groups for c in g)
    link = device = 0.0
    for group in groups:
        link += sum(c.load for c in group)
        device = max(device, link) + sum(c.compute for c in group)
    return device


def minibatch_count(n: int, size: int, *, min_rows: int = MIN_ROWS) -> int:
    """Mini-batches :func:`form_minibatches` makes of ``n`` sequences for ``size`` rows each:
    ``ceil(n / size)``, fewer where one would have fewer than ``min_rows`` rows. The largest has
    ``ceil(n / count)`` rows: at most ``size``, or ``2 * min_rows - 1`` when ``size < min_rows``
    or rounding forces the count down."""
    if size < 1:
        raise ValueError(f"mini-batch size must be >= 1, got {size}")
    count = max(1, math.ceil(n / max(size, min(min_rows, n))))
    while count > 1 and n // count < min_rows:
        count -= 1
    return count


def form_minibatches(costs: Sequence[SequenceCost], size: int, *, min_rows: int = MIN_ROWS) -> list[list[int]]:
    """Group sequences (indices of ``costs``) into mini-batches of at most ``size`` rows.

    Invariants: every index appears exactly once; there are :func:`minibatch_count` groups of
    ``floor(n / count)`` or ``ceil(n / count)`` rows, never fewer than ``min_rows`` unless the
    whole batch is (then it is one group); one group comes in batch order.

    Sequences are placed, heaviest first, into the group where the larger of its load and
    compute sums grows least, which pairs load-heavy sequences with compute-heavy ones; the
    groups are then ordered by Johnson's rule (load-light groups first by increasing load, then
    the rest by decreasing compute), optimal for a two-stage pipeline.
    """
    n = len(costs)
    count = minibatch_count(n, size, min_rows=min_rows)
    if count == 1:
        return [list(range(n))]
    capacity = math.ceil(n / count)
    floor = n // count
    groups: list[list[int]] = [[] for _ in range(count)]
    load = [0.0] * count
    work = [0.0] * count
    order = sorted(range(n), key=lambda i: (-(costs[i].load + costs[i].compute), i))
    for placed, i in enumerate(order):
        remaining = n - placed
        # Groups still below the floor must be reachable by the sequences left.
        short = sum(max(floor - len(g), 0) for g in groups)
        open_ = [g for g in range(count) if len(groups[g]) < capacity
                 and (remaining > short or len(groups[g]) < floor)]
        best = min(open_, key=lambda g: (max(load[g] + costs[i].load, work[g] + costs[i].compute), len(groups[g]), g))
        groups[best].append(i)
        load[best] += costs[i].load
        work[best] += costs[i].compute
    for group in groups:
        group.sort()
    first = sorted((g for g in range(count) if load[g] <= work[g]), key=lambda g: (load[g], g))
    last = sorted((g for g in range(count) if load[g] > work[g]), key=lambda g: (-work[g], g))
    return [groups[g] for g in first + last]


def step_groups(size: int | None, costs: Sequence[SequenceCost]) -> list[list[int]] | None:
    """The mini-batches of a step of ``len(costs)`` sequences at ``size`` rows each (None: run it
    whole, because no size is set, the batch is not larger, or only one group forms)."""
    if size is None or size >= len(costs):
        return None
    groups = form_minibatches(costs, size)
    return groups if len(groups) > 1 else None
