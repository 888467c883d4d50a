"""A killed batch job loses nothing (issue 17): `hscompile generate MODEL_DIR --input --output`
killed with SIGKILL at seeded points (mid-compilation, mid-wave, just after a wave's lines), then
run again: every id is in the output exactly once, every line whole, and the answers are an
uninterrupted run's. A torn last line (a kill inside the write) is cut and its requests redone."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import save_checkpoint

from hscompile.cli import main

ROOT = Path(__file__).resolve().parents[2]
# Waves of 2 sequences and 24 new tokens: about 50 ms a wave here (2-core CPU, eager lowering),
# long enough for a kill to land inside one.
RUN = ["--max-new-tokens", "24", "--batch-size", "2", "--device", "cpu", "--lowering", "eager"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds",
         "sing", "loudly", "at", "dawn"]
# A process that neither finishes nor reaches its kill point in this long is stuck.
ROUND_LIMIT_S = 180


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny checkpoint and 12 requests: 10 greedy of different lengths, 2 sampled with seeds (a
    wave of their own). Returns (checkpoint, input file)."""
    root = tmp_path_factory.mktemp("killed-job")
    save_checkpoint(root / "ckpt", "llama")
    lines = [{"id": f"g{i}", "prompt": " ".join(WORDS[i:i + 2 + i % 4])} for i in range(10)]
    lines += [{"id": i, "prompt": " ".join(WORDS[i:i + 3]), "temperature": 0.8, "seed": i} for i in (1, 2)]
    source = root / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "ckpt", source


def _command(job, output: Path) -> list[str]:
    checkpoint, source = job
    return ["generate", str(checkpoint), "--input", str(source), "--output", str(output), *RUN]


def _whole_lines(output: Path) -> list[dict]:
    """The output's records, checking each line is whole: valid JSON ending in a newline."""
    data = output.read_bytes() if output.exists() else b""
    assert not data or data.endswith(b"\n"), f"a partial last line survived: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def _by_id(records: list[dict]) -> dict:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicated ids: {sorted(map(str, ids))}"
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    """An uninterrupted run's records, by id."""
    output = tmp_path_factory.mktemp("reference") / "out.jsonl"
    assert main(_command(job, output)) == 0
    records = _by_id(_whole_lines(output))
    assert len(records) == 12
    return records


def _run_and_kill(job, output: Path, log: Path, *, after_lines: int | None, delay: float) -> bool:
    """Start the job in a process of its own; SIGKILL it ``delay`` seconds after its output has
    gained ``after_lines`` lines (None: after it logged its prefill compilation, i.e. inside the
    first wave, before any line). True if it was killed, False if it finished first."""
    start_lines = output.read_bytes().count(b"\n") if output.exists() else 0
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "hscompile.cli", *_command(job, output)],
                                   cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ROUND_LIMIT_S
        while process.poll() is None:
            assert time.monotonic() < deadline, f"the job neither finished nor reached its kill point: {log.read_text()}"
            if after_lines is None:
                reached = "compiled the prefill graph" in log.read_text(errors="replace")
            else:
                reached = output.exists() and output.read_bytes().count(b"\n") >= start_lines + after_lines
            if reached:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        code = process.wait(timeout=ROUND_LIMIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code in (0, -signal.SIGKILL), f"exit {code}: {log.read_text()}"
    return code == -signal.SIGKILL


def test_a_job_killed_at_random_points_then_rerun_writes_every_id_once_with_the_uninterrupted_answers(
        job, reference, tmp_path):
    output, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    rng = random.Random(17)
    # Round 1 dies inside the first wave (decode graph compiling, no line yet); the others a
    # seeded moment after the output gained 1-3 lines (inside the next wave, or between two).
    plan = [(None, rng.uniform(0.0, 0.5))] + [(rng.randint(1, 3), rng.uniform(0.0, 0.08)) for _ in range(2)]
    killed = 0
    for after_lines, delay in plan:
        killed += _run_and_kill(job, output, log, after_lines=after_lines, delay=delay)
        # Whatever survived a kill is whole lines, each id once, each an uninterrupted run's answer.
        for key, record in _by_id(_whole_lines(output)).items():
            assert record == reference[key], key
    assert killed >= 1, f"no round was killed before it finished: {log.read_text()}"
    assert main(_command(job, output)) == 0  # the rerun that finishes the job
    assert _by_id(_whole_lines(output)) == reference


@pytest.mark.parametrize(
    "torn",
    [
        pytest.param(lambda line: line[: len(line) // 2], id="cut-mid-json"),
        pytest.param(lambda line: line[:-1], id="whole-json-without-its-newline"),
    ],
)
def test_a_torn_last_line_is_cut_and_its_request_redone(job, reference, tmp_path, torn):
    # A job killed inside the write of a wave: three whole lines, then part of the fourth.
    whole = [json.dumps(record, ensure_ascii=False) + "\n" for record in reference.values()]
    output = tmp_path / "out.jsonl"
    output.write_text("".join(whole[:3]) + torn(whole[3]))
    assert main(_command(job, output)) == 0
    records = _whole_lines(output)
    assert _by_id(records) == reference
    assert [json.dumps(r, ensure_ascii=False) + "\n" for r in records[:3]] == whole[:3]  # kept as they were
