"""Fuzz: many drawn cases of greedy generation against transformers' ``generate``, and a report.

    make fuzz N=500                                                   # or:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py [--n 200] [--seed 0] [--shrink 3] \
        [--json benchmarks/results/fuzz.json] [--markdown benchmarks/results/fuzz.md]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --async-sim random [--n 200 ...]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --replay '<a case as JSON>'

The cases are those of ``tests/e2e/test_fuzz.py`` (``tests/fuzzing.py``: a decoder family and
shape, a ragged left-padded batch, new tokens, and every option that changes execution), drawn by
hypothesis from ``--seed`` (the same seed draws the same cases). Every case runs to its end: the
report counts cases, passed, refused (a budget the library refuses with its ``BudgetError``, by
reason), mismatches, violations (device bytes above the budget, blocks held after the call) and
crashes, each failure with the line that replays it. ``--shrink K`` minimises the first K failures
greedily (a run per step, at most 60 each) and reports the smaller case too. The exit status is 1
when anything failed.

``--async-sim SCHEDULE`` runs every case on the simulated asynchronous device (``HSCOMPILE_ASYNC_SIM``,
set for each case's run and restored after it): ``late``, ``early`` or ``random:SEED`` for every case,
or ``random`` for ``random:<case index + seed>``, a schedule per case. The report's header names it,
the JSON records each case's schedule, and every reproducer carries its case's, so that ``--replay``
runs it under the same one (``--async-sim`` given with ``--replay`` overrides it). Without the option,
a ``HSCOMPILE_ASYNC_SIM`` already in the environment is taken as its value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared case strategy lives beside the tests' models

RESULTS = ROOT / "benchmarks" / "results"

SCHEDULES = "late, early, random:SEED (SEED an integer) or random (random:<case index + seed> for each case)"


def _library_schedule(value: str | None = None) -> str | None:
    """The schedule ``HSCOMPILE_ASYNC_SIM`` names (``value`` if given, else the environment's), as the
    library reads it (:func:`hscompile._env.async_sim`: None when empty; a ValueError, its one line
    naming the valid forms, when invalid)."""
    from hscompile import _env

    if value is None:
        return _env.async_sim()
    previous = os.environ.get("HSCOMPILE_ASYNC_SIM")
    os.environ["HSCOMPILE_ASYNC_SIM"] = value
    try:
        return _env.async_sim()
    finally:
        if previous is None:
            del os.environ["HSCOMPILE_ASYNC_SIM"]
        else:
            os.environ["HSCOMPILE_ASYNC_SIM"] = previous


def _schedule(value: str) -> str:
    """``--async-sim``'s value: ``random`` (a schedule per case), else a schedule as
    ``HSCOMPILE_ASYNC_SIM`` takes it."""
    if value.strip() == "random":
        return "random"
    try:
        schedule = _library_schedule(value)
    except ValueError:
        schedule = None
    if schedule is None:
        raise argparse.ArgumentTypeError(f"expected {SCHEDULES}, got {value!r}")
    return schedule


def _case_schedule(option: str | None, index: int, seed: int) -> str | None:
    """The schedule case ``index`` (from 0) runs under."""
    return f"random:{index + seed}" if option == "random" else option


def _refusal_reason(outcome) -> str:
    """A refusal's message without its numbers, to count refusals by reason; a device budget refused
    at or above the minimum hscompile had reported for it is marked so."""
    text = re.sub(r"\d+(\.\d+)?( ?(B|KiB|MiB|GiB))?", "N", outcome.detail).split(";")[0][:160]
    minimum = outcome.facts.get("reported_minimum")
    if minimum is not None and "device memory" in outcome.detail and outcome.options["device_memory"] >= minimum:
        text = "AT OR ABOVE THE REPORTED MINIMUM: " + text
    return text


def _markdown(result: dict) -> str:
    counts = result["counts"]
    lines = [f"# Fuzz: {result['cases']} cases (seed {result['seed']}, {result['seconds']:.0f} s)", ""]
    option = result.get("async_sim")
    if option is not None:
        lines[0] += f" on the simulated asynchronous device, schedule {option}"
        each = "random:<case index + seed>, each case its own" if option == "random" else option
        lines += [f"Every case ran with `HSCOMPILE_ASYNC_SIM` set ({each}): device=\"cpu\" as a simulated "
                  "asynchronous device, copies completing as CUDA streams allow. Each reproducer below "
                  "carries its case's schedule.", ""]
    lines += ["| outcome | cases |", "| --- | --- |"]
    lines += [f"| {status} | {counts.get(status, 0)} |" for status in ("passed", "refused", "mismatch", "violation",
                                                                        "crash")]
    lines += ["", "Of the runs that finished: " + ", ".join(f"{n} {what.replace('_', ' ')}"
                                                         for what, n in result["finished_runs_that"].items()) + "."]
    if result["refused_by_reason"]:
        lines += ["", "## Refused budgets, by reason", "", "| reason | cases |", "| --- | --- |"]
        lines += [f"| {reason} | {n} |" for reason, n in result["refused_by_reason"].items()]
    above = [r for r in result["refused"] if r["reason"].startswith("AT OR ABOVE")]
    if above:
        lines += ["", "## Refused at or above the minimum hscompile reported for the case", ""]
        lines += [f"- {r['detail']}\n  `{r['replay']}`" for r in above]
    if result["failures"]:
        lines += ["", "## Failures", ""]
        for failure in result["failures"]:
            tag = f" (known: {failure['known']})" if failure["known"] else ""
            schedule = failure["case"].get("async_sim")
            where = failure["case"]["family"] + (f", async_sim {schedule}" if schedule else "")
            lines += [f"- **{failure['status']}** ({where}): {failure['detail']}{tag}",
                      f"  `{failure['replay']}`"]
            if "shrunk" in failure:
                lines += [f"  smallest found: {failure['shrunk']['detail']}", f"  `{failure['shrunk']['replay']}`"]
    return "\n".join(lines) + "\n"


def _replay(text: str, option: str | None, seed: int) -> int:
    from fuzzing import Case, run_case

    case = Case.from_json(text)
    if option is not None:
        case = dataclasses.replace(case, async_sim=_case_schedule(option, 0, seed))
    elif case.async_sim is not None:
        try:
            if _library_schedule(case.async_sim) is None:
                raise ValueError(f"HSCOMPILE_ASYNC_SIM must be late, early or random:SEED, got {case.async_sim!r}")
        except ValueError as error:
            print(f"the case's async_sim: {error}", file=sys.stderr)
            return 2
    outcome = run_case(case)
    print(f"{outcome.status} in {outcome.seconds:.1f} s: {outcome.detail}")
    print(f"options: {outcome.options}")
    if case.async_sim is not None:
        print(f"async_sim: {case.async_sim} (HSCOMPILE_ASYNC_SIM)")
    if outcome.traceback:
        print(outcome.traceback)
    return 1 if outcome.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="cases to draw")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis' seed: the same seed draws the same cases")
    parser.add_argument("--shrink", type=int, default=0, help="minimise the first K failures")
    parser.add_argument("--json", default=str(RESULTS / "fuzz.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "fuzz.md"))
    parser.add_argument("--replay", metavar="JSON", help="run one case (a failure's reproducer) and print its outcome")
    parser.add_argument("--async-sim", metavar="SCHEDULE", type=_schedule,
                        help=f"run the cases on the simulated asynchronous device: {SCHEDULES}")
    args = parser.parse_args(argv)
    if args.async_sim is None and os.environ.get("HSCOMPILE_ASYNC_SIM", "").strip():
        # Already set for the whole run: record it as if given, so that the report and replays say so.
        try:
            args.async_sim = _library_schedule()
        except ValueError as error:
            parser.error(str(error))

    # Hardware profiles measured for "auto" choices go to a directory of their own, as in the tests.
    os.environ.setdefault("HSCOMPILE_CACHE_DIR", str(RESULTS / "fuzz-cache"))
    import torch._dynamo

    # A compiled function past dynamo's recompile limit would silently run eagerly: make it an error.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.replay:
        return _replay(args.replay, args.async_sim, args.seed)

    from fuzzing import cases, known, run_case, shrink
    from hypothesis import HealthCheck, Phase, given, seed, settings

    records: list[dict] = []
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.n, database=None, deadline=None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case):  # never raises: every case runs, and is recorded
        if args.async_sim is not None:
            case = dataclasses.replace(case, async_sim=_case_schedule(args.async_sim, len(records), args.seed))
        outcome = run_case(case)
        records.append({"case": case, "outcome": outcome})
        schedule = f"{case.async_sim:14s} " if case.async_sim is not None else ""
        print(f"[{len(records):4d}] {outcome.status:9s} {outcome.seconds:5.1f} s  {case.family:7s} {schedule}"
              f"{outcome.detail[:110]}", flush=True)

    run()
    seconds = time.perf_counter() - start
    failures = []
    for record in records:
        case, outcome = record["case"], record["outcome"]
        if outcome.failed:
            failures.append({"status": outcome.status, "detail": outcome.detail, "options": outcome.options,
                             "case": json.loads(case.to_json()), "replay": case.command(),
                             "known": known(case), "traceback": outcome.traceback, "_case": case,
                             "_outcome": outcome})
    for failure in failures[:args.shrink]:
        print(f"shrinking: {failure['replay']}", flush=True)
        small, outcome = shrink(failure["_case"], failure["_outcome"], log=lambda line: print(line, flush=True))
        failure["shrunk"] = {"case": json.loads(small.to_json()), "detail": outcome.detail, "replay": small.command()}
    for failure in failures:
        del failure["_case"], failure["_outcome"]
    facts = [r["outcome"].facts for r in records if r["outcome"].status not in ("refused", "crash", "mismatch")]
    refused = Counter(_refusal_reason(r["outcome"]) for r in records if r["outcome"].status == "refused")
    result = {
        "cases": len(records), "seed": args.seed, "seconds": seconds,
        "counts": dict(Counter(r["outcome"].status for r in records)),
        "refused_by_reason": dict(refused.most_common()),
        "families": dict(Counter(r["case"].family for r in records)),
        "quantized": dict(Counter(f"{k}={v}" for r in records for k, v in r["case"].quant.items() if k != "quant_group_size")),
        "finished_runs_that": {  # what the cases that ran to the end exercised
            "streamed_layers": sum(1 for f in facts if f["streamed_layers"]),
            "split_minibatches": sum(1 for f in facts if f["minibatch_size"]),
            "ran_in_waves": sum(1 for f in facts if (f["waves"] or 0) > 1),
            "kept_act_blocks": sum(1 for f in facts if f["act_ratio"] > 0),
        },
        "failures": failures,
        "refused": [{"reason": _refusal_reason(r["outcome"]), "detail": r["outcome"].detail,
                     "options": r["outcome"].options, "replay": r["case"].command()}
                    for r in records if r["outcome"].status == "refused"],
    }
    if args.async_sim is not None:  # absent otherwise: a run without the simulator reports as it always did
        result["async_sim"] = args.async_sim
        result["async_sim_by_case"] = [r["case"].async_sim for r in records]
        finished = [r for r in records if r["outcome"].status not in ("refused", "crash", "mismatch")]
        # Finished runs whose generator reported the case's schedule (the simulator was in use), and
        # those whose simulated device completed copies after the call that issued them.
        result["finished_runs_that"]["ran_on_the_simulator"] = sum(
            1 for r in finished if r["outcome"].facts.get("async_sim") == r["case"].async_sim)
        result["finished_runs_that"]["had_deferred_copies"] = sum(
            1 for r in finished if r["outcome"].facts.get("deferred_copies"))
        for failure in failures:
            failure["async_sim"] = failure["case"].get("async_sim")
        for entry, record in zip(result["refused"], (r for r in records if r["outcome"].status == "refused"),
                                 strict=True):
            entry["async_sim"] = record["case"].async_sim
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.markdown, _markdown(result))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(_markdown(result))
    print(f"wrote {args.json} and {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
