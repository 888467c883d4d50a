from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from hscompile.passes.manager import PassManager, PassSpec


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Linear(2, 2))


def test_missing_requirement_is_caught_before_any_pass_runs():
    ran = []
    manager = PassManager(
        (
            PassSpec("first", lambda g: ran.append("first") or g, requires=("graph",), provides=("graph2",)),
            PassSpec("second", lambda p: ran.append("second"), requires=("plan",), provides=("x",)),
        )
    )
    with pytest.raises(ValueError, match="'second' requires plan"):
        manager.run({"graph": _graph()})
    assert ran == []


def test_artifacts_flow_by_name_and_passes_are_timed():
    manager = PassManager(
        (
            PassSpec("double", lambda x: 2 * x, requires=("x",), provides=("y",)),
            PassSpec("pair", lambda x, y: (x + y, x * y), requires=("x", "y"), provides=("s", "p")),
        )
    )
    result = manager.run({"x": 3})
    assert (result.artifacts["y"], result.artifacts["s"], result.artifacts["p"]) == (6, 9, 18)
    assert set(result.seconds) == {"double", "pair"}


def test_graphs_are_dumped_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HSCOMPILE_DUMP_DIR", str(tmp_path))
    manager = PassManager((PassSpec("ident", lambda g: g, requires=("graph",), provides=("out",)),))
    manager.run({"graph": _graph()}, tag="g1")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["g1_00_ident_out.py"]
    assert "linear" in (tmp_path / files[0]).read_text()


def test_a_pass_returning_the_wrong_arity_is_an_error():
    manager = PassManager((PassSpec("bad", lambda x: (x, x, x), requires=("x",), provides=("a", "b")),))
    with pytest.raises(RuntimeError, match="returned 3 values for 2"):
        manager.run({"x": 1})


def test_a_pass_whose_artifacts_are_given_is_skipped():
    ran = []
    manager = PassManager(
        (
            PassSpec("make", lambda x: ran.append("make") or 2 * x, requires=("x",), provides=("y",)),
            PassSpec("use", lambda y: ran.append("use") or y + 1, requires=("y",), provides=("z",)),
        )
    )
    result = manager.run({"x": 1, "y": 10})
    assert ran == ["use"] and result.artifacts["z"] == 11 and "make" not in result.seconds
