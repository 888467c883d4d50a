"""The generators :func:`hscompile.generate` keeps, one per model and options.

``hscompile.generate(model, ids, ...)`` builds a :class:`~hscompile.Generator` on its first call
for a model and options and reuses it after. The generators are kept on the model itself, in the
attribute :data:`KEPT_ATTRIBUTE`, not in a table keyed weakly by the model: a generator holds its
model (``generator.model``), and a ``WeakKeyDictionary`` value that refers to its key keeps the key
alive for good (Python has no ephemerons), so every model ever passed would stay in memory. On the
model, model and generators form one cycle the garbage collector frees once the user drops the
model (``tests/e2e/test_many_models.py``).

That attribute is hscompile's own: the model's ``forward`` never reads it, so dynamo neither traces
nor guards it, and :func:`~hscompile.generation.captures.structure_key` leaves it out of the key (a
generator cannot be described, and without that rule a model would lose its saved graphs from the
moment ``hscompile.generate`` first kept one on it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["KEPT_ATTRIBUTE", "kept_generator"]

KEPT_ATTRIBUTE = "_hscompile_generators"
"""The model attribute holding the generators kept for it (see the module docstring)."""


class _Kept(dict):
    """The generators kept on a model. Copying or pickling the model drops them (a copy is a new
    model: it compiles anew), so they never travel with it."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Kept, ())


def kept_generator(model: torch.nn.Module, options: Mapping[str, object] | None, make: Callable[[], Any]) -> Any:
    """The generator kept for ``model`` and ``options`` (``make()`` builds it the first time)."""
    per_model = model.__dict__.get(KEPT_ATTRIBUTE)
    if per_model is None:
        per_model = model.__dict__[KEPT_ATTRIBUTE] = _Kept()
    key = repr(sorted((str(k), repr(v)) for k, v in (options or {}).items()))
    if key not in per_model:
        per_model[key] = make()
    return per_model[key]
