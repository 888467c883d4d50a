"""The naming rule of hscompile/passes/ (its package docstring): every pass of the pipelines lives in
the module of its name and is the function of that name (``build_<name>`` for a builder), and every
module there but the manager holds a pass of the pipelines."""

from __future__ import annotations

import importlib
from pathlib import Path

from hscompile.backend import GENERATION_PIPELINE, PIPELINE

PASSES = Path(__file__).resolve().parents[2] / "hscompile" / "passes"


def test_each_pass_is_the_function_of_its_name_in_the_module_of_its_name():
    for spec in (*PIPELINE.passes, *GENERATION_PIPELINE.passes):
        module = importlib.import_module(f"hscompile.passes.{spec.name}")
        assert callable(getattr(module, spec.name, None) or getattr(module, f"build_{spec.name}", None)), spec.name


def test_every_pass_module_holds_a_pass_of_the_pipelines():
    names = {spec.name for spec in (*PIPELINE.passes, *GENERATION_PIPELINE.passes)}
    modules = {p.stem for p in PASSES.glob("*.py")} - {"__init__", "manager"}
    assert modules == names
