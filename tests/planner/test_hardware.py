from __future__ import annotations

import json

import pytest
import torch

from hscompile.errors import ConfigError
from hscompile.planner.hardware import HardwareProfile, bundled_profiles, load_profile, profile_path, tune


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HSCOMPILE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_cpu_profile_is_measured_cached_and_reused(cache):
    first = tune("cpu", width=128, quick=True)
    assert first.device == "cpu" and first.torch_version == torch.__version__
    assert first.h2d_bytes_per_s > 0 and first.matmul_flops_per_s["float32"] > 0 and not first.copies_overlap
    path = profile_path(torch.device("cpu"))
    assert path.is_file() and str(path).startswith(str(cache))
    assert tune("cpu", width=128, quick=True) == first  # read back, not measured again
    assert HardwareProfile.from_json(first.to_json()) == first


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: text.replace('"schema": 1', '"schema": 99'),
        lambda text: json.dumps({**json.loads(text), "h2d_bytes_per_s": -1}),
        lambda text: json.dumps({**json.loads(text), "device_name": "NVIDIA Imaginary GPU"}),
        lambda text: json.dumps({**json.loads(text), "torch_version": "0.1"}),
    ],
)
def test_a_corrupt_or_foreign_profile_is_measured_again(cache, damage):
    profile = tune("cpu", width=128, quick=True)
    path = profile_path(torch.device("cpu"))
    path.write_text(damage(path.read_text()))
    again = tune("cpu", width=128, quick=True)
    assert again.device_name == profile.device_name and again.torch_version == torch.__version__
    assert HardwareProfile.from_json(path.read_text()) == again  # the bad file was replaced


def test_bundled_profiles_load_and_bad_files_say_why(tmp_path):
    assert {"a100-40gb-pcie4", "h100-pcie5"} <= set(bundled_profiles())
    h100 = load_profile("h100-pcie5")
    assert h100.copies_overlap and h100.h2d_bytes_per_s > load_profile("a100-40gb-pcie4").h2d_bytes_per_s
    broken = tmp_path / "p.json"
    broken.write_text('{"schema": 1}')
    with pytest.raises(ConfigError, match="fields missing"):
        load_profile(broken)
    with pytest.raises(ConfigError, match="no hardware profile"):
        load_profile(tmp_path / "missing.json")


def test_gemm_time_follows_a_roofline():
    profile = load_profile("a100-40gb-pcie4")
    small = profile.gemm_seconds(1, 4096, 4096, "float16")
    big = profile.gemm_seconds(4096, 4096, 4096, "float16")
    # One row reads the whole weight (memory-bound); 4096 rows approach the compute peak.
    weight_read = 4096 * 4096 * 2 / profile.memory_bytes_per_s
    assert weight_read + profile.call_seconds <= small <= 2 * weight_read + profile.call_seconds
    assert 2 * 4096**3 / big > 0.9 * profile.matmul_flops_per_s["float16"] * 4096 / (4096 + profile.matmul_half_rows)


def test_the_disk_rate_is_measured_for_the_directory_asked_and_kept_in_the_profile(cache, tmp_path):
    first = tune("cpu", width=128, quick=True)
    assert first.disk_bytes_per_s == 0.0 and first.disk_path == ""
    asked = []

    def probe(directory):
        asked.append(directory)
        return 1.5e9

    profile = tune("cpu", width=128, quick=True, disk=(tmp_path, probe))
    assert asked == [tmp_path] and profile.disk_bytes_per_s == 1.5e9 and profile.disk_path == str(tmp_path)
    assert profile.matmul_flops_per_s == first.matmul_flops_per_s, "the cached measurements were kept"
    assert tune("cpu", width=128, quick=True) == profile  # cached with it
    old = json.loads(profile.to_json())
    del old["disk_bytes_per_s"], old["disk_path"]  # a profile written before the field existed
    assert HardwareProfile.from_json(json.dumps(old)).disk_bytes_per_s == 0.0
