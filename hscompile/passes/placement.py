"""Placement pass: decide where each layer's weights live while the model runs.

Precondition: ``plan = analyze(graph)``; ``example_inputs`` are the real tensors dynamo
passes to the backend (weights among them); ``config`` is validated.

Postcondition: a :class:`~hscompile.policy.Policy`. Raises
:class:`~hscompile.errors.ConfigError` when the weights cannot run on ``config.device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import HybridServeConfig
from ..errors import ConfigError
from ..policy import Policy
from .plan import ModelPlan

__all__ = ["place"]


def place(plan: ModelPlan, example_inputs: Sequence[Any], config: HybridServeConfig) -> Policy:
    """Every layer resident on the device the weights already live on."""
    weights = (*plan.global_weights, *(w for layer in plan.layers for w in layer.weights))
    devices = {example_inputs[w.input_index].device for w in weights}
    if len(devices) > 1:
        raise ConfigError(
            f"the model's weights are spread over several devices ({', '.join(sorted(map(str, devices)))}); "
            "put them on one"
        )
    (device,) = devices
    if device != config.device:
        raise ConfigError(
            f"the model's weights are on {device} but option 'device' is {str(config.device)!r}; running on "
            f"another device than the weights' needs weight streaming. Pass options={{'device': '{device}'}} "
            "or move the model"
        )
    return Policy(
        device=str(config.device),
        resident_layers=tuple(range(plan.num_layers)),
        streamed_layers=(),
        prefetch_depth=config.schedule.prefetch_depth,
        act_ratio=None,
        block_size=config.cache.block_size,
        reason="every weight is resident on the device; a forward pass over whole sequences keeps no cache",
    )
