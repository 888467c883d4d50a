"""Predicted against measured decode-step time, side by side in one run.

    .venv/bin/python benchmarks/cost_model.py [--device cpu] [--lowering inductor] [--json out.json]

For each model (Llama-style, built from configs, random weights) and budget: tune the device
(cached profile), predict the average decode step with the cost model, then measure it with
``hscompile.Generator``: time ``generate`` for ``n`` and for 2 new tokens (warm, best of 2);
the difference over ``n - 2`` steps is the average decode step (prefill and compilation cancel).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from report import report

import hscompile
from hscompile.bench import weight_bytes
from hscompile.planner.cost_model import Choice, ModelDims, simulate_step
from hscompile.planner.hardware import tune

MODELS = {
    "llama-h256-l8": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4),
    "llama-h512-l8": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8),
    "llama-h1024-l6": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=6, num_attention_heads=16,
                           num_key_value_heads=4),
}


def _timed_generate(generator, ids, new, ratio) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        generator.generate(ids, max_new_tokens=new, act_ratio=ratio)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lowering", default="inductor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=18)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    # One profile for the run, fitted at the largest model's width (profiles are cached per device).
    profile = tune(args.device, width=max(m["hidden_size"] for m in MODELS.values()), force=True)
    for name, sizes in MODELS.items():
        config = transformers.LlamaConfig(vocab_size=2048, max_position_embeddings=1024, **sizes)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        weights = weight_bytes(model)
        for fraction, ratio in ((2.0, 0.0), (0.7, 1.0)):
            torch._dynamo.reset()
            budget = int(weights * fraction) + (96 * 2**20 if args.device == "cuda" else 0)
            generator = hscompile.Generator(model, {"device": args.device, "device_memory": budget, "lowering": args.lowering})
            ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt))
            generator.generate(ids, max_new_tokens=3, act_ratio=ratio)  # compile both graphs
            long, short = _timed_generate(generator, ids, args.new, ratio), _timed_generate(generator, ids, 2, ratio)
            measured = (long - short) / (args.new - 2)
            decode = generator.compiled_graphs[-1]
            policy = decode.policy
            dims = ModelDims.from_model(model)
            choice = Choice(len(policy.resident_layers), policy.prefetch_depth, ratio)
            middle = args.prompt + (args.new + 1) // 2
            predicted = simulate_step(dims, choice, profile, batch=args.batch, new=1, past=middle,
                                      block_size=generator.config.cache.block_size)
            rows.append({"model": name, "budget_fraction": fraction, "act_ratio": ratio,
                         "streamed": len(policy.streamed_layers), "measured_ms": measured * 1e3,
                         "predicted_ms": predicted.seconds * 1e3, "error": predicted.seconds / measured - 1,
                         "bound": predicted.bound})
            print(json.dumps(rows[-1]))
    from rich.table import Table

    context = args.prompt + args.new // 2
    table = Table(title=f"decode step, batch {args.batch}, context ~{context}, {args.device}, {args.lowering}")
    for column in ("model", "budget", "act_ratio", "streamed", "measured ms", "predicted ms", "error", "bound"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["model"], f"{r['budget_fraction']:.1f}x", f"{r['act_ratio']:.1f}", str(r["streamed"]),
                      f"{r['measured_ms']:.2f}", f"{r['predicted_ms']:.2f}", f"{r['error']:+.0%}", r["bound"])
    report(table, rows, args.json)


if __name__ == "__main__":
    main()
