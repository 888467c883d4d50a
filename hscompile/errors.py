"""Exceptions raised by hscompile.

Every error a user can cause is a :class:`HybridServeError`. The ones caused by a bad
value (an option, a budget, a model the backend cannot understand) are also
``ValueError``, so ``except ValueError`` works as it would for any library.

``torch.compile`` calls the backend lazily, on the first call of the compiled model, and
dynamo wraps any exception a backend raises in ``BackendCompilerFailed`` (a
``RuntimeError``). :func:`surface_through_dynamo` is the single place where we undo that
wrapping for our own errors, so a user sees the ``ValueError`` we raised.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HybridServeError",
    "ConfigError",
    "UnsupportedModelError",
    "BudgetError",
    "CheckpointError",
    "surface_through_dynamo",
]


class HybridServeError(Exception):
    """Base class of every error raised on purpose by hscompile."""


class ConfigError(HybridServeError, ValueError):
    """An option key or value is not valid; the message names the key and what is valid."""


class UnsupportedModelError(HybridServeError, ValueError):
    """The captured graph lacks a structure the backend needs; the message says what."""


class BudgetError(HybridServeError, ValueError):
    """A memory budget cannot hold the minimum working set; the message gives the minimum."""


class CheckpointError(HybridServeError, ValueError):
    """A checkpoint directory, or a request to generate from it, is not usable; the message names
    the file (or input line) and what would be valid."""


def surface_through_dynamo(error: HybridServeError) -> Exception:
    """Return ``error`` re-typed so that dynamo re-raises it unwrapped.

    Dynamo re-raises subclasses of ``torch._dynamo.exc.ShortenTraceback`` as they are and
    wraps everything else in ``BackendCompilerFailed``. The returned exception is an
    instance of ``type(error)`` *and* of ``ShortenTraceback``, so ``except ConfigError``
    and ``except ValueError`` both catch it, and its message is unchanged.
    """
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - torch without dynamo
        return error
    cls = type(error)
    if issubclass(cls, ShortenTraceback):
        return error
    surfaced_cls: Any = type(cls.__name__, (cls, ShortenTraceback), {"__module__": cls.__module__})
    surfaced = surfaced_cls.__new__(surfaced_cls, *error.args)
    Exception.__init__(surfaced, *error.args)
    # No frame to trim to: ShortenTraceback asserts when the frame is missing from the
    # traceback, and a complete traceback is better than an internal assertion.
    surfaced.first_useful_frame = None
    return surfaced
