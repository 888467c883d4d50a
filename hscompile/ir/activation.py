"""The activation estimate: device bytes of live values one call holds at its peak.

Plain data that :mod:`hscompile.passes.estimate_activations` builds from a graph and that placement (at
compile time) and the runtime (before every call) evaluate for the call's sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

__all__ = ["ActivationEstimate"]


@dataclass(slots=True)
class ActivationEstimate:
    """Peak activation bytes of one call, possibly depending on symbolic sizes.

    Stored as the graph's allocation events rather than one closed form: ``events[i]`` lists
    ``(+1 | -1, expression index)`` at step ``i``. Evaluating replays them with the call's sizes
    (a few microseconds per node, memoised per set of sizes).
    """

    exprs: tuple[sympy.Expr, ...]
    events: tuple[tuple[tuple[int, int], ...], ...]
    symbols: tuple[tuple[int, sympy.Symbol], ...]
    """``(placeholder position, symbol)``: where each size symbol's value arrives at run time."""
    hint: int = 0
    """The value for the sizes the graph was captured with."""
    _values: Any = None
    _memo: dict[tuple[int, ...], int] = field(default_factory=dict)

    def _peak(self, sizes: tuple[int, ...]) -> int:
        cached = self._memo.get(sizes)
        if cached is not None:
            return cached
        if self._values is None:
            self._values = sympy.lambdify([s for _, s in self.symbols], list(self.exprs), modules="math")
        values = [int(v) for v in self._values(*sizes)] if self.exprs else []
        current = peak = 0
        for step in self.events:
            for sign, index in step:
                current += sign * values[index]
                peak = max(peak, current)
        self._memo[sizes] = peak
        return peak

    def evaluate_sizes(self, sizes: Mapping[sympy.Symbol, int]) -> int:
        """The estimate when each size symbol takes the value ``sizes`` gives it; :attr:`hint`
        (the captured sizes' estimate) when ``sizes`` lacks one of them."""
        if not self.symbols:
            return self.hint
        if any(symbol not in sizes for _, symbol in self.symbols):
            return self.hint
        return self._peak(tuple(int(sizes[symbol]) for _, symbol in self.symbols))

    def evaluate(self, args: Sequence[Any]) -> int:
        """The estimate for a call with these schedule arguments."""
        if not self.symbols:
            return self.hint
        return self._peak(tuple(int(args[position]) for position, _ in self.symbols))
