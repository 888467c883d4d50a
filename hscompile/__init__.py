"""hscompile: a ``torch.compile`` backend for high-throughput LLM inference beyond device memory.

>>> import torch, hscompile
>>> compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu"})  # doctest: +SKIP
>>> logits = compiled(input_ids).logits  # doctest: +SKIP
>>> print(hscompile.inspect(compiled))  # doctest: +SKIP

Importing the package registers the backend; an installed distribution also registers it
through the ``torch_dynamo_backends`` entry point, so ``backend="hybridserve"`` works
without importing anything.
"""

from __future__ import annotations

from . import (
    ops,  # noqa: F401  (registers torch.ops.hybridserve.*)
    quantize,  # noqa: F401  (hscompile.quantize.reference: the eager reference of quantized weights)
)
from .backend import BACKEND_NAME, CompiledModel, hybridserve_backend, register
from .config import OPTIONS, HybridServeConfig
from .errors import BudgetError, CheckpointError, ConfigError, HybridServeError, UnsupportedModelError
from .generation import Generator, generate, tune
from .generation.params import SamplingParams
from .inspection import Inspection, inspect
from .ir.plan import ModelPlan
from .ir.policy import DeviceMemoryPlan, Policy
from .loading import from_pretrained
from .planner.hardware import HardwareProfile, load_profile
from .planning import plan_model
from .runtime.timeline import Span, Timeline, record_timeline
from .text import Completion

__all__ = [
    "BACKEND_NAME",
    "OPTIONS",
    "BudgetError",
    "CheckpointError",
    "CompiledModel",
    "Completion",
    "ConfigError",
    "DeviceMemoryPlan",
    "Generator",
    "HardwareProfile",
    "HybridServeConfig",
    "HybridServeError",
    "Inspection",
    "ModelPlan",
    "Policy",
    "SamplingParams",
    "Span",
    "Timeline",
    "UnsupportedModelError",
    "hybridserve_backend",
    "from_pretrained",
    "generate",
    "inspect",
    "load_profile",
    "plan_model",
    "record_timeline",
    "tune",
]

__version__ = "0.1.0"

register()
