"""Time to first token against depth, cold and warm (the time-to-first-token issue's table).

For each depth, a fresh process builds a Llama-style model from a config (random weights) and
times its first ``hscompile.generate(model, ids(2x24), max_new_tokens=3, options={"device": "cpu",
"act_ratio": 0, ...})`` (the quickstart's call; ``--entry Generator`` times
``hscompile.Generator(model, options).generate(ids, max_new_tokens=3)`` instead): capture, passes,
lowering and the generation itself. "cold" runs with empty caches (Inductor's, AOTAutograd's and
hscompile's saved captures, all under one temporary directory); "warm" is a second fresh process
given the caches the cold one left. Run:

    .venv/bin/python benchmarks/first_call.py --layers 2 32 [--lowering eager] [--entry Generator] [--json out.json]

The ratios printed beside the times are the issue's targets: 32 layers against 2 layers (cold),
and warm against cold at each depth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from report import report

MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4,
         "vocab_size": 1024}


def _child(layers: int, lowering: str, entry: str) -> dict:
    start = time.perf_counter()
    import torch
    import transformers

    import hscompile
    from hscompile.generation.kept import KEPT_ATTRIBUTE

    imported = time.perf_counter() - start
    config = transformers.LlamaConfig(num_hidden_layers=layers, **MODEL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 24))
    options = {"device": "cpu", "act_ratio": 0, "lowering": lowering}
    start = time.perf_counter()
    if entry == "generate":
        out = hscompile.generate(model, ids, max_new_tokens=3, options=options)
        (generator,) = vars(model)[KEPT_ATTRIBUTE].values()  # the generator hscompile.generate kept
    else:
        generator = hscompile.Generator(model, options)
        out = generator.generate(ids, max_new_tokens=3)
    first = time.perf_counter() - start
    stats = generator.stats()
    return {"layers": layers, "lowering": lowering, "entry": entry, "import_s": imported, "first_call_s": first,
            "traced_layers": [r.traced_layers for r in generator.graphs.records],
            "tokens": out[:, ids.shape[1]:].tolist(),
            **{k: stats[k] for k in ("compile_seconds_by_phase", "inductor_cache_hits", "saved_graphs_used")
               if k in stats}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--lowering", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--entry", default="generate", choices=("generate", "Generator"),
                        help="hscompile.generate (the quickstart) or hscompile.Generator")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.lowering, args.entry)))
        return

    results = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache,
                   "HSCOMPILE_CACHE_DIR": cache, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            for start in ("cold", "warm"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(layers), "--lowering", args.lowering,
                     "--entry", args.entry],
                    capture_output=True, text=True, env=env, check=False,
                )
                if proc.returncode:
                    sys.exit(f"{layers} layers, {start}: the child failed:\n{proc.stderr[-4000:]}")
                results.append({"start": start, **json.loads(proc.stdout.strip().splitlines()[-1])})

    from rich.table import Table

    first = {(r["layers"], r["start"]): r["first_call_s"] for r in results}
    base = args.layers[0]
    entry = "hscompile.generate" if args.entry == "generate" else "hscompile.Generator"
    table = Table(title=f"First {entry} call, Llama-style {MODEL['hidden_size']}-wide, {args.lowering} lowering, cpu")
    for column in ("layers", "start", "first call s", f"x {base} layers (same start)", "x cold", "import s",
                   "saved graphs used", "layers traced"):
        table.add_column(column)
    for r in results:
        table.add_row(str(r["layers"]), r["start"], f"{r['first_call_s']:.1f}",
                      f"{r['first_call_s'] / first[(base, r['start'])]:.2f}",
                      f"{r['first_call_s'] / first[(r['layers'], 'cold')]:.2f}", f"{r['import_s']:.1f}",
                      str(r.get("saved_graphs_used", "")), str(r["traced_layers"]))
    report(table, {"model": MODEL, "lowering": args.lowering, "entry": args.entry, "results": results}, args.json)


if __name__ == "__main__":
    main()
