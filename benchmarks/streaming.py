"""Cost of streaming weights, side by side in one run: all resident vs budgets below the weights.

    .venv/bin/python benchmarks/streaming.py [--device cpu|cuda] [--layers 16] [--hidden 1024]
                                             [--batch 4] [--seq 128] [--repeat 5] [--lowering inductor]

A Llama-style model built from a config (random weights) lives on the CPU; for each budget
the same model is compiled for ``--device`` and timed (median of ``--repeat`` calls after one
warm-up call). Reported: time per call, ratio to all-resident, weight bytes moved per call and
the effective copy rate (bytes moved / extra time over all-resident).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

import hscompile
from hscompile.bench import weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lowering", default="inductor")
    parser.add_argument("--fractions", type=float, nargs="+", default=[2.0, 0.5, 0.25])
    parser.add_argument("--json")
    args = parser.parse_args()

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256, vocab_size=8192, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    weights = weight_bytes(model)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    rows = []
    for fraction in args.fractions:
        torch._dynamo.reset()
        budget = int(weights * fraction) + (96 * 2**20 if args.device == "cuda" else 0)
        compiled = torch.compile(model, backend="hybridserve",
                                 options={"device": args.device, "lowering": args.lowering, "device_memory": budget})
        with torch.no_grad():
            compiled(ids)
            times = []
            for _ in range(args.repeat):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                compiled(ids)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        stats = hscompile.inspect(compiled).stats
        rows.append({"fraction": fraction, "budget": budget, "seconds": statistics.median(times),
                     "streamed_layers": stats["streamed_layers"], "bytes_per_call": stats["schedule_weight_bytes_per_call"],
                     "peak_device_bytes": stats["peak_device_bytes"]})
    base = rows[0]["seconds"]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.layers}-layer Llama-style, hidden {args.hidden}, weights {weights / 2**20:.0f} MiB, "
                        f"batch {args.batch} x {args.seq}, device {args.device}, lowering {args.lowering}")
    for column in ("budget / weights", "streamed layers", "ms per call", "x all-resident", "MiB moved per call",
                   "GB/s effective"):
        table.add_column(column)
    for row in rows:
        extra = row["seconds"] - base
        rate = row["bytes_per_call"] / extra / 1e9 if extra > 0 and row["bytes_per_call"] else None
        row["ratio"] = row["seconds"] / base
        table.add_row(f"{row['fraction']:.2f}", str(row["streamed_layers"]), f"{row['seconds'] * 1e3:.1f}",
                      f"{row['ratio']:.2f}", f"{row['bytes_per_call'] / 2**20:.0f}",
                      "-" if rate is None else f"{rate:.1f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "weights": weights, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
