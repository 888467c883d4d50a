"""Cache loads: a layer's past tokens copied from the host pools into the buffers attention reads.

:class:`StagingArena` holds the device buffers of one batch, allocated once (zeroed, so a
padding column is never garbage) and reused by every layer and step: per buffer, the
attention buffer ``[rows, columns, 2, kv_heads, head_dim]`` (loaded K/V, recomputed K/V and the
new tokens' K/V all land in it, each written once) and the checkpoint buffer
``[tokens, hidden]``. :class:`LoadPipeline` fills them: each run of a plan is one copy from the
pool straight into the buffer (asynchronous from pinned memory on CUDA, on the copy stream, after
the buffer's previous reader is done); nothing is gathered on the host. When loads overlap
compute, taking one load issues the next one in run order (this layer's next mini-batch, else the
next layer's first) into the other buffer. With int8 cache blocks the runs are copied, as they
are, into byte buffers of the same layout, and dequantized into the buffers attention reads when
the load is taken (on the device, after the copy). Runs of blocks on disk (a spilled call,
:mod:`~hscompile.runtime.spill`) are read into host staging first and copied from there alike.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..ir.cache import CacheSpec
from ..ops.quant import dequantize_rows
from .blocks import HybridCache
from .device import DeviceBackend
from .spill import SpillStaging, split_runs
from .step_plan import StepPlan

__all__ = ["LoadPipeline", "StagingArena"]


class _Counted(Protocol):
    cache_h2d_bytes: int
    cache_disk_read_bytes: int
    load_runs: int
    attention_assembly_bytes: int


class StagingArena:
    """The device buffers of one batch (see the module docstring)."""

    def __init__(self, spec: CacheSpec, device: torch.device, buffers: int) -> None:
        self.spec = spec
        self.device = device
        self.buffers = buffers
        self.rows = self.columns = self.act_tokens = 0
        self.kv: list[torch.Tensor] = []
        self.act: list[torch.Tensor] = []
        self.kv_rows: list[torch.Tensor] = []
        """Int8 cache blocks: per buffer, the loaded rows of bytes ``[rows * columns, kv_row_bytes]``."""
        self.act_rows: list[torch.Tensor] = []
        self.free: list[Any] = [None] * buffers
        """Per buffer: the event after which its last reader is done (None: free now)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv, *self.act, *self.kv_rows, *self.act_rows))

    def fit(self, rows: int, columns: int, act_tokens: int) -> tuple[bool, int]:
        """Make the buffers hold ``rows x columns`` tokens and ``act_tokens`` checkpoints; returns
        whether any buffer was allocated, and the bytes newly zeroed (False, 0 when they already
        fit: the usual case after the first step)."""
        spec, zeroed, grown = self.spec, 0, False
        if rows > self.rows or columns > self.columns:
            self.rows, self.columns, grown = max(rows, self.rows), max(columns, self.columns), True
            shape = (self.rows, self.columns, 2, spec.kv_heads, spec.head_dim)
            self.kv = [torch.zeros(shape, dtype=spec.dtype, device=self.device) for _ in range(self.buffers)]
            zeroed += sum(t.numel() * t.element_size() for t in self.kv)
            if spec.quantized:  # zeros: a row never loaded dequantizes to zeros, never garbage
                self.kv_rows = [torch.zeros((self.rows * self.columns, spec.kv_row_bytes), dtype=torch.uint8,
                                            device=self.device) for _ in range(self.buffers)]
                zeroed += sum(t.numel() for t in self.kv_rows)
        if act_tokens > self.act_tokens:
            self.act_tokens, grown = act_tokens, True
            self.act = [torch.empty((act_tokens, spec.hidden), dtype=spec.dtype, device=self.device)
                        for _ in range(self.buffers)]
            if spec.quantized:
                self.act_rows = [torch.empty((act_tokens, spec.act_row_bytes), dtype=torch.uint8, device=self.device)
                                 for _ in range(self.buffers)]
        return grown, zeroed


class LoadPipeline:
    """Issues and hands out the cache loads of one step (see the module docstring)."""

    def __init__(self, backend: DeviceBackend, counters: _Counted, overlap: bool | None = None) -> None:
        self.backend = backend
        self.counters = counters
        self.overlap = overlap
        """Issue the next load before this one computes. Default (None): where copies are
        asynchronous (CUDA), so they run on the copy stream beside the compute; on the CPU they
        would only hold memory longer."""
        self.arena: StagingArena | None = None
        self.width = 0
        """Columns of the step being run (the arena may be wider, from an earlier step)."""
        self._pending: dict[tuple[str, int, int], tuple[tuple[torch.Tensor, torch.Tensor | None], Any]] = {}
        self.spill = SpillStaging(backend)
        """Host staging of runs on disk, and of stores into them."""

    @property
    def overlapping(self) -> bool:
        return self.backend.asynchronous if self.overlap is None else self.overlap

    def prepare(self, spec: CacheSpec, plans: list[StepPlan], columns: int) -> None:
        """Size the arena for a step's plans (allocating only when it grows)."""
        buffers = 2 if self.overlapping else 1
        if self.arena is None or self.arena.buffers != buffers or self.arena.spec != spec:
            self.arena = StagingArena(spec, self.backend.device, buffers)
        grown, zeroed = self.arena.fit(max(p.batch for p in plans), columns, max(p.act_tokens for p in plans))
        self.width = columns
        self.counters.attention_assembly_bytes += zeroed
        if grown:
            # New memory from the compute stream's allocator (zeroed there, or handed back by an
            # earlier user): no load may write it before an event recorded since.
            self.arena.free = [self.backend.record()] * self.arena.buffers

    def clear(self) -> None:
        """Forget loads in flight (the step ended or was abandoned), once compute has waited for them:
        their buffers may be rewritten or given back next, never while a copy still writes them (a
        step that ends normally has none left; one that raised may have issued the next one)."""
        for _, done in self._pending.values():
            self.backend.wait(done)
        self._pending.clear()

    def release(self) -> None:
        """Drop the arena (the batch is done)."""
        self.clear()
        self.spill.reset()
        self.arena = None

    def buffer(self, layer: int, index: int, count: int) -> int:
        """Which buffer the load of ``layer``'s mini-batch ``index`` (of ``count``) uses."""
        assert self.arena is not None
        return (layer * count + index) % self.arena.buffers

    def done_with(self, layer: int, index: int, count: int) -> None:
        """The compute of ``layer``'s mini-batch ``index`` no longer reads its buffers."""
        assert self.arena is not None
        self.arena.free[self.buffer(layer, index, count)] = self.backend.record()

    def _issue(self, cache: HybridCache, plans: list[StepPlan], kind: str, layer: int,
               index: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None], Any]:
        """Start copying mini-batch ``index``'s past ``kind`` tokens of ``layer`` into its buffer:
        ``((its part of the buffer, the rows of bytes to dequantize into it or None), copy done)``."""
        arena = self.arena
        assert arena is not None
        plan = plans[index]
        slot = self.buffer(layer, index, len(plans))
        spec = cache.spec
        if kind == "kv":
            target = arena.kv[slot]
            flat = arena.kv_rows[slot] if spec.quantized else target.view(-1, 2, spec.kv_heads, spec.head_dim)
            pool, runs = cache.kv[layer], plan.kv_runs
        else:
            target = flat = arena.act[slot] if arena.act else torch.empty(
                (0, spec.hidden), dtype=spec.dtype, device=self.backend.device)
            if spec.quantized and arena.act:
                flat = arena.act_rows[slot]
            pool, runs = cache.act[layer], plan.act_runs
        done = None
        after = arena.free[slot]
        file = cache.file(kind)  # type: ignore[arg-type]
        host_runs, disk_runs = split_runs(runs, cache.host_slots(kind)) if file is not None else (runs, [])  # type: ignore[arg-type]
        row = flat.stride(0) * flat.element_size() if runs else 0
        sources = [(pool[first:first + count], dest, count) for first, dest, count in host_runs]
        if disk_runs:
            assert file is not None
            # Read on the host into staging (this load's own buffer), then copied like a host run.
            staged = self.spill.buffer(2 * slot + (kind == "act"), sum(c for _, _, c in disk_runs) * row)
            offset = 0
            for first, dest, count in disk_runs:
                part = staged[offset:offset + count * row]
                file.read(layer, first, count, part)
                sources.append((part.view(flat.dtype).view(count, *flat.shape[1:]), dest, count))
                offset += count * row
            self.counters.cache_disk_read_bytes += offset
        for source, dest, count in sources:
            done = self.backend.copy_to_device(flat[dest:dest + count], source, after=after,
                                               label=f"L{layer} {kind} mb{index}", lane="copy: cache")
            after = None  # the stream keeps the runs in order after the first waited
            moved = count * row
            self.counters.cache_h2d_bytes += moved
            if kind == "kv":
                self.counters.attention_assembly_bytes += moved
        if disk_runs:
            self.spill.read_by(2 * slot + (kind == "act"), done)
        self.counters.load_runs += len(sources)
        # A view of this mini-batch's part: the buffer itself stays the arena's.
        part = target[: plan.batch] if kind == "kv" else target[: plan.act_tokens]
        return (part, flat if spec.quantized else None), done

    def load(self, cache: HybridCache, plans: list[StepPlan], kind: str, layer: int, index: int) -> torch.Tensor:
        """Mini-batch ``index``'s buffer of ``kind`` for ``layer``, its past tokens loaded."""
        pending = self._pending.pop((kind, layer, index), None)
        (out, rows), done = pending if pending is not None else self._issue(cache, plans, kind, layer, index)
        self.backend.wait(done)
        if rows is not None and out.numel():
            spec = cache.spec
            if kind == "kv":
                # Only the step's columns: the arena may be wider (an earlier, longer step), and
                # the rows past them are neither loaded nor read.
                batch, columns = out.shape[0], out.shape[1]
                picked = rows[: batch * columns].view(batch, columns, -1)[:, : self.width]
                window = out[:, : self.width]
                window.copy_(dequantize_rows(picked.reshape(-1, rows.shape[1]), (2, spec.kv_heads, spec.head_dim),
                                             spec.head_dim, spec.dtype).view(window.shape))
            else:
                out.copy_(dequantize_rows(rows[: out.shape[0]], (spec.hidden,), spec.hidden, spec.dtype))
        if self.overlapping:
            following = (layer, index + 1) if index + 1 < len(plans) else (layer + 1, 0)
            if following[0] < cache.spec.num_layers and (kind, *following) not in self._pending:
                self._pending[(kind, *following)] = self._issue(cache, plans, kind, *following)
        return out
