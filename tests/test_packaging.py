"""The install a fresh machine gets: a lock inside the ranges users get, and a clean wheel."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.lock"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_declared_requirement_inside_its_range():
    pins = _pins()
    for requirement in _declared():
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in {LOCK.name} is outside pyproject.toml's range {requirement.specifier}"
        )


def test_core_dependencies_have_an_upper_bound_at_the_newest_tested_release():
    for requirement in _declared():
        if requirement.name in ("torch", "transformers"):
            assert any(spec.operator in ("<", "<=") for spec in requirement.specifier), requirement


def test_the_wheel_builds_without_warnings_and_holds_only_hscompile(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, check=True,
    )
    # pip's own notes about the machine's index settings are not the build's.
    build_lines = [line for line in (result.stdout + result.stderr).splitlines() if "is ignored" not in line]
    assert not [line for line in build_lines if "warn" in line.lower()], "\n".join(build_lines)
    (wheel,) = tmp_path.glob("hscompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"hscompile", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "hscompile/profiles/h100-pcie5.json" in names
    assert "hscompile/passes/analyze.py" in names and "hscompile/runtime/cache.py" in names
