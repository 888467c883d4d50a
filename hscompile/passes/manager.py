"""The pass manager: runs passes in order and does everything around them.

Passes are plain functions; their dependencies are data (:class:`PassSpec` names the
artifacts a pass reads and writes). The manager checks the whole pipeline's contracts
before running anything, then for each pass: calls it with the artifacts it requires,
times it, lints every GraphModule it produced, logs at DEBUG on ``hscompile.passes``, and,
when ``HSCOMPILE_DUMP_DIR`` is set, writes each produced graph to a file. Pass bodies
print, log and lint nothing themselves.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from .. import _env

__all__ = ["PassManager", "PassSpec", "PipelineResult"]

log = logging.getLogger("hscompile.passes")


@dataclass(frozen=True, slots=True)
class PassSpec:
    """One pass and its contract: the artifacts it reads (``requires``) and writes (``provides``).

    ``fn`` is called with the required artifacts as positional arguments, in ``requires``
    order, and returns one value per provided artifact (a tuple when several).
    """

    name: str
    fn: Callable[..., Any]
    requires: tuple[str, ...]
    provides: tuple[str, ...]


@dataclass(slots=True)
class PipelineResult:
    artifacts: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    """Pass name -> wall seconds it took."""


class PassManager:
    """Runs a sequence of :class:`PassSpec` (see the module docstring)."""

    def __init__(self, passes: Sequence[PassSpec]) -> None:
        self.passes = tuple(passes)

    def check(self, available: Sequence[str]) -> None:
        """Raise ``ValueError`` unless every pass's requirements are met by the inputs and earlier passes."""
        have = set(available)
        for spec in self.passes:
            missing = [name for name in spec.requires if name not in have]
            if missing:
                raise ValueError(
                    f"pass {spec.name!r} requires {', '.join(missing)}, which neither the inputs nor an earlier "
                    f"pass provide (available: {', '.join(sorted(have))})"
                )
            have.update(spec.provides)

    def run(self, inputs: Mapping[str, Any], *, tag: str = "") -> PipelineResult:
        """Run every pass whose artifacts are not already among ``inputs``; ``tag`` prefixes dumped
        file names (e.g. one tag per compiled graph)."""
        self.check(list(inputs))
        result = PipelineResult(dict(inputs))
        dump = _env.dump_dir()
        for step, spec in enumerate(self.passes):
            if all(name in result.artifacts for name in spec.provides):
                log.debug("pass %s skipped: its artifacts were given", spec.name)
                continue
            start = time.perf_counter()
            out = spec.fn(*(result.artifacts[name] for name in spec.requires))
            elapsed = time.perf_counter() - start
            values = out if len(spec.provides) != 1 else (out,)
            if len(values) != len(spec.provides):
                raise RuntimeError(f"pass {spec.name!r} returned {len(values)} values for {len(spec.provides)} artifacts")
            for name, value in zip(spec.provides, values):
                result.artifacts[name] = value
                if isinstance(value, fx.GraphModule):
                    value.graph.lint()
                    if dump is not None:
                        _dump(dump, f"{tag}_{step:02d}" if tag else f"{step:02d}", spec.name, name, value)
            result.seconds[spec.name] = elapsed
            log.debug("pass %s took %.3f s, provided %s", spec.name, elapsed, ", ".join(spec.provides))
        return result


def _dump(directory: Path, prefix: str, pass_name: str, artifact: str, gm: fx.GraphModule) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", f"{prefix}_{pass_name}_{artifact}")
    path = directory / f"{stem}.py"
    path.write_text(gm.print_readable(print_output=False))
    log.debug("wrote %s", path)
