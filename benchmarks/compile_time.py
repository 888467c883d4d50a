"""Compile time against depth: hybridserve (identical layers share one artifact) vs stock Inductor.

Each measurement runs in a fresh process with an empty Inductor cache (cold), builds a
Llama-style model of the given depth from a config (random weights), and times the first
call of the compiled model (capture + compile + one forward). It also records the
backend's own pass timings. Run:

    .venv/bin/python benchmarks/compile_time.py --layers 2 16 [--json out.json]

and the ratio 16-layer/2-layer per backend is printed beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODEL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)


def _child(layers: int, backend: str, device: str) -> dict:
    import torch
    import transformers

    import hscompile

    config = transformers.LlamaConfig(num_hidden_layers=layers, use_cache=False, **MODEL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(device)
    ids = torch.randint(0, MODEL["vocab_size"], (4, 64), device=device)
    if backend == "hybridserve":
        compiled = torch.compile(model, backend="hybridserve", options={"device": device})
    else:
        compiled = torch.compile(model, backend="inductor")
    start = time.perf_counter()
    with torch.no_grad():
        compiled(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    out: dict = {"layers": layers, "backend": backend, "first_call_s": first_call}
    if backend == "hybridserve":
        stats = hscompile.inspect(compiled).stats
        out["inductor_compile_s"] = stats["compile_seconds"]
        out["pass_seconds"] = stats["pass_seconds"]
        out["compiled_artifacts"] = stats["compiled_artifacts"]
        out["partition_calls"] = stats["partition_calls"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--backends", nargs="+", default=["hybridserve", "inductor"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=2, metavar=("LAYERS", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1], args.device)))
        return

    results = []
    for layers in args.layers:
        for backend in args.backends:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(layers), backend, "--device", args.device],
                    capture_output=True, text=True, env=env, check=True,
                )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Cold compile + first call, Llama-style {MODEL['hidden_size']}-wide, device {args.device}")
    for column in ("backend", "layers", "first call s", "Inductor compile s", "artifacts", f"x vs {args.layers[0]} layers"):
        table.add_column(column)
    base = {r["backend"]: r["first_call_s"] for r in results if r["layers"] == args.layers[0]}
    for r in results:
        table.add_row(
            r["backend"], str(r["layers"]), f"{r['first_call_s']:.1f}",
            f"{r['inductor_compile_s']:.1f}" if "inductor_compile_s" in r else "-",
            str(r.get("compiled_artifacts", "-")), f"{r['first_call_s'] / base[r['backend']]:.2f}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": MODEL, "device": args.device, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
