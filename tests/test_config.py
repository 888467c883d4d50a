from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

from hscompile.config import OPTIONS, HybridServeConfig, format_bytes, parse_bytes
from hscompile.errors import ConfigError

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1024, 1024),
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("64 kib", 64 * 1024),
        ("100", 100),
        ("2TiB", 2 * 2**40),
    ],
)
def test_sizes_parse_with_binary_and_decimal_units(text, expected):
    assert parse_bytes(text, key="device_memory") == expected


@pytest.mark.parametrize("bad", ["", "lots", "8 GiBs", "-1GiB", 0, -5, True, 1.5, "0MiB", [1]])
def test_bad_sizes_name_the_key_and_the_valid_forms(bad):
    with pytest.raises(ConfigError, match="device_memory") as info:
        parse_bytes(bad, key="device_memory")
    assert "GiB" in str(info.value)


def test_defaults_are_auto_and_cpu_without_cuda():
    config = HybridServeConfig.from_options(None)
    assert config.cache.act_ratio == "auto"
    assert config.schedule.mini_batch_size == "auto"
    assert config.schedule.prefetch_depth == 1
    assert config.lowering == "inductor"
    assert config.memory.device_memory is None
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.device.type == expected


def test_every_option_parses_into_the_tree():
    config = HybridServeConfig.from_options(
        {
            "device": torch.device("cpu"),
            "device_memory": "512MiB",
            "host_memory": 8 * 2**30,
            "act_ratio": 0.25,
            "block_size": 32,
            "mini_batch_size": 4,
            "prefetch_depth": 2,
            "lowering": "eager",
        }
    )
    assert config.device == torch.device("cpu")
    assert config.memory.device_memory == 512 * 2**20
    assert config.memory.host_memory == 8 * 2**30
    assert config.cache.act_ratio == 0.25 and config.cache.block_size == 32
    assert config.schedule.mini_batch_size == 4 and config.schedule.prefetch_depth == 2
    assert config.lowering == "eager"


def test_options_round_trip():
    config = HybridServeConfig.from_options({"device": "cpu", "act_ratio": 1, "block_size": 8, "lowering": "eager"})
    assert HybridServeConfig.from_options(config.to_options()) == config
    assert config.cache.act_ratio == 1.0 and isinstance(config.cache.act_ratio, float)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        HybridServeConfig.from_options({"devcie": "cpu"})
    message = str(info.value)
    assert "'devcie'" in message
    for spec in OPTIONS:
        assert spec.key in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("act_ratio", 1.5),
        ("act_ratio", -0.1),
        ("act_ratio", "half"),
        ("act_ratio", True),
        ("block_size", 0),
        ("block_size", 2.0),
        ("block_size", 10**6),
        ("mini_batch_size", 0),
        ("mini_batch_size", 1),
        ("mini_batch_size", "max"),
        ("prefetch_depth", 0),
        ("prefetch_depth", "1"),
        ("lowering", "tvm"),
        ("device", "mps"),
        ("device", "gpu"),
        ("device", 3),
        ("host_memory", "a lot"),
        ("disk_cache", "yes"),
        ("disk_cache", True),
    ],
)
def test_bad_values_raise_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        HybridServeConfig.from_options({key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        HybridServeConfig.from_options({"device": "cuda"})
    with pytest.raises(ConfigError, match="'cuda:3' was asked for but CUDA is not available"):
        HybridServeConfig.from_options({"device": "cuda:3"})


def test_a_mini_batch_of_one_is_refused_saying_why():
    with pytest.raises(ConfigError, match=r"expected an int >= 2 or 'auto' .*never has fewer than 2"):
        HybridServeConfig.from_options({"mini_batch_size": 1})


def test_config_is_frozen():
    config = HybridServeConfig.from_options({"device": "cpu"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lowering = "eager"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 4  # type: ignore[misc]


def test_non_mapping_options_are_refused():
    with pytest.raises(ConfigError, match="dict"):
        HybridServeConfig.from_options(["device", "cpu"])  # type: ignore[arg-type]


def test_readme_documents_exactly_the_options():
    text = README.read_text()
    section = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == {spec.key for spec in OPTIONS}


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 29) == "1.50 GiB"
