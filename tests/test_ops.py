"""hscompile.ops, split by concern, still registers every ``torch.ops.hybridserve.*`` op once and
re-exports it; the ops that return nothing useful are ordered effects; every runtime-acting op has
a body that :func:`~hscompile.ops.bound_kernels` binds."""

from __future__ import annotations

import importlib

import torch
from torch._higher_order_ops import effects

from hscompile import ops

RUNTIME_OPS = ("prefetch_weights", "wait_weights", "release_weights", "to_device", "to_host", "load_kv", "load_act",
               "recompute_kv", "cache_attention", "store_cache", "cache_step", "cache_commit")
"""The ops that act on the bound runtime (the others, attention and cache_stub, are pure)."""
ORDERED = ("prefetch_weights", "wait_weights", "release_weights", "load_kv", "load_act", "recompute_kv",
           "cache_attention", "store_cache", "cache_step", "cache_commit")


def test_every_exported_op_is_the_registered_one():
    namespace = torch.ops.hybridserve
    for name in (*RUNTIME_OPS, "attention", "cache_stub"):
        assert name in ops.__all__
        assert getattr(ops, name)._opoverload is getattr(namespace, name).default


def test_importing_again_registers_nothing_twice():
    # A second registration of a name would assert; reloading the package (not its op modules,
    # which Python keeps) must not reach one.
    importlib.reload(ops)
    assert ops.attention._opoverload is torch.ops.hybridserve.attention.default


def test_ops_that_return_nothing_to_read_are_ordered_effects_and_pure_ones_are_not():
    for name in ORDERED:
        assert effects._get_effect(getattr(torch.ops.hybridserve, name).default) == effects.EffectType.ORDERED, name
    for name in ("attention", "cache_stub", "to_device", "to_host"):
        assert effects._get_effect(getattr(torch.ops.hybridserve, name).default) is None, name


class _Recorder:
    """A runtime that records what each kernel asked of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.weights = self._part("weights")
        self.cache = self._part("cache")

    def _part(self, owner: str):
        recorder = self

        class Part:
            def __getattr__(self, method):
                return lambda *args: recorder.calls.append((f"{owner}.{method}", args))

        return Part()

    def copy_in(self, x, device):
        self.calls.append(("copy_in", (device,)))
        return x

    def copy_out(self, x, device):
        self.calls.append(("copy_out", (device,)))
        return x


def test_bound_kernels_cover_every_runtime_op_and_act_on_the_runtime_given():
    runtime = _Recorder()
    kernels = ops.bound_kernels(runtime)
    assert set(kernels) == {getattr(torch.ops.hybridserve, name).default for name in RUNTIME_OPS}
    kernels[torch.ops.hybridserve.prefetch_weights.default](3, 128)
    kernels[torch.ops.hybridserve.release_weights.default](3, [])
    kernels[torch.ops.hybridserve.load_kv.default](1, torch.device("cpu"))
    x = torch.ones(2)
    assert kernels[torch.ops.hybridserve.to_device.default](x, torch.device("cpu")) is x
    assert runtime.calls == [("weights.prefetch", (3,)), ("weights.release", (3,)), ("cache.load_kv", (1,)),
                             ("copy_in", (torch.device("cpu"),))]
    assert kernels[torch.ops.hybridserve.load_kv.default].__name__ == "load_kv"
