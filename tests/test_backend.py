from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from models import prompts, tiny_model

import hscompile
from hscompile.backend import register
from hscompile.errors import ConfigError, UnsupportedModelError


def test_registering_again_is_harmless():
    register()
    register()
    assert "hybridserve" in torch._dynamo.list_backends(exclude_tags=())


def _installed() -> bool:
    return any(ep.name == "hybridserve" for ep in importlib.metadata.entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _installed(), reason="hscompile is not installed (no entry point)")
def test_backend_name_works_without_importing_hscompile():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "hscompile" not in sys.modules
        fn = torch._dynamo.lookup_backend("hybridserve")
        print(fn.__module__)
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/", check=True)
    assert out.stdout.strip() == "hscompile.backend"


def test_unknown_option_surfaces_as_value_error_through_torch_compile():
    compiled = torch.compile(tiny_model("opt"), backend="hybridserve", options={"prefetch": 2})
    with pytest.raises(ValueError, match=r"unknown option key.*'prefetch'.*valid keys: device") as info:
        compiled(prompts())
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(("key", "value"), [("act_ratio", 2.0), ("device_memory", "lots"), ("lowering", "tvm")])
def test_bad_option_values_surface_as_value_error(key, value):
    compiled = torch.compile(tiny_model("opt"), backend="hybridserve", options={key: value})
    with pytest.raises(ValueError, match=key):
        compiled(prompts())


def test_mode_other_than_default_is_refused():
    compiled = torch.compile(tiny_model("opt"), backend="hybridserve", mode="max-autotune")
    with pytest.raises(ConfigError, match="mode='max-autotune'"):
        compiled(prompts())


def test_unsupported_model_error_surfaces_unwrapped():
    model = tiny_model("llama", attn_implementation="eager")
    model.config._attn_implementation = "eager"
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu"})
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        compiled(prompts())


def test_options_dict_is_not_modified():
    options = {"device": "cpu", "lowering": "eager"}
    compiled = torch.compile(tiny_model("gpt2"), backend="hybridserve", options=options)
    with torch.no_grad():
        compiled(prompts())
    assert options == {"device": "cpu", "lowering": "eager"}
    assert hscompile.inspect(compiled).config.lowering == "eager"


def test_dynamic_true_is_named_as_the_cause_of_a_lifted_attention_scale():
    model = tiny_model("llama", layers=2)
    compiled = torch.compile(model, backend="hybridserve", options={"device": "cpu", "lowering": "eager"}, dynamic=True)
    with pytest.raises(UnsupportedModelError, match=r"torch.compile\(\.\.\., dynamic=True\) makes dynamo lift float"), \
            torch.no_grad():
        compiled(prompts(2, 5))
