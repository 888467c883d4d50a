"""Fuzz: many drawn cases of greedy generation against transformers' ``generate``, and a report.

    make fuzz N=500                                                   # or:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py [--n 200] [--seed 0] [--shrink 3] \
        [--json benchmarks/results/fuzz.json] [--markdown benchmarks/results/fuzz.md]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py --replay '<a case as JSON>'

The cases are those of ``tests/e2e/test_fuzz.py`` (``tests/fuzzing.py``: a decoder family and
shape, a ragged left-padded batch, new tokens, and every option that changes execution), drawn by
hypothesis from ``--seed`` (the same seed draws the same cases). Every case runs to its end: the
report counts cases, passed, refused (a budget the library refuses with its ``BudgetError``, by
reason), mismatches, violations (device bytes above the budget, blocks held after the call) and
crashes, each failure with the line that replays it. ``--shrink K`` minimises the first K failures
greedily (a run per step, at most 60 each) and reports the smaller case too. The exit status is 1
when anything failed.
"""

from __future__ import annotations

import argparse
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
    lines = [f"# Fuzz: {result['cases']} cases (seed {result['seed']}, {result['seconds']:.0f} s)", "",
             "| outcome | cases |", "| --- | --- |"]
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
            lines += [f"- **{failure['status']}** ({failure['case']['family']}): {failure['detail']}{tag}",
                      f"  `{failure['replay']}`"]
            if "shrunk" in failure:
                lines += [f"  smallest found: {failure['shrunk']['detail']}", f"  `{failure['shrunk']['replay']}`"]
    return "\n".join(lines) + "\n"


def _replay(text: str) -> int:
    from fuzzing import Case, run_case

    case = Case.from_json(text)
    outcome = run_case(case)
    print(f"{outcome.status} in {outcome.seconds:.1f} s: {outcome.detail}")
    print(f"options: {outcome.options}")
    if outcome.traceback:
        print(outcome.traceback)
    return 1 if outcome.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="cases to draw")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis' seed: the same seed draws the same cases")
    parser.add_argument("--shrink", type=int, default=0, help="minimise the first K failures")
    parser.add_argument("--json", default=str(RESULTS / "fuzz.json"))
    parser.add_argument("--markdown", default=str(RESULTS / "fuzz.md"))
    parser.add_argument("--replay", metavar="JSON", help="run one case (a failure's reproducer) and print its outcome")
    args = parser.parse_args()

    # Hardware profiles measured for "auto" choices go to a directory of their own, as in the tests.
    os.environ.setdefault("HSCOMPILE_CACHE_DIR", str(RESULTS / "fuzz-cache"))
    import torch._dynamo

    # A compiled function past dynamo's recompile limit would silently run eagerly: make it an error.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.replay:
        return _replay(args.replay)

    from fuzzing import cases, known, run_case, shrink
    from hypothesis import HealthCheck, Phase, given, seed, settings

    records: list[dict] = []
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.n, database=None, deadline=None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case):  # never raises: every case runs, and is recorded
        outcome = run_case(case)
        records.append({"case": case, "outcome": outcome})
        print(f"[{len(records):4d}] {outcome.status:9s} {outcome.seconds:5.1f} s  {case.family:7s} "
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
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.markdown, _markdown(result))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(_markdown(result))
    print(f"wrote {args.json} and {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
