"""Cache bytes moved per decode step: all-KV (act_ratio=0) against all-checkpoint (act_ratio=1).

    .venv/bin/python benchmarks/cache_bytes.py [--hidden 1024] [--layers 2] [--batch 4] [--prompt 128]

Two models of the same hidden size built from configs (random weights): an MHA one (16 heads)
and a 4:1 GQA one (16 query heads, 4 KV heads, as Llama-3-8B's 32:8). For each, one prompt is
prefilled, then exactly one decode step runs over it; the bytes that step copied from the host
cache (stats ``cache_h2d_bytes``) are reported for act_ratio 0 and 1, side by side.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from report import report

import hscompile


def measure(config: transformers.PretrainedConfig, ratio: float, batch: int, prompt: int) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 16})
    ids = torch.randint(3, config.vocab_size, (batch, prompt))
    generator.generate(ids, max_new_tokens=2, act_ratio=ratio)  # prefill, then one decode step
    stats = generator.stats()
    return {"act_ratio": ratio, "cache_h2d_bytes": stats["cache_h2d_bytes"], "recomputed_tokens": stats["recomputed_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    heads = args.hidden // 64
    common = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=heads, vocab_size=512, max_position_embeddings=4 * args.prompt)
    models = {
        f"MHA ({heads} heads)": transformers.LlamaConfig(num_key_value_heads=heads, **common),
        f"GQA 4:1 ({heads} q / {heads // 4} kv heads)": transformers.LlamaConfig(num_key_value_heads=heads // 4, **common),
    }
    rows = []
    for name, config in models.items():
        kv, act = (measure(config, r, args.batch, args.prompt) for r in (0.0, 1.0))
        per_token_kv = 2 * config.num_key_value_heads * (args.hidden // heads)
        rows.append({"model": name, "kv_bytes": kv["cache_h2d_bytes"], "act_bytes": act["cache_h2d_bytes"],
                     "ratio": act["cache_h2d_bytes"] / kv["cache_h2d_bytes"], "kv_values_per_token": per_token_kv,
                     "act_values_per_token": args.hidden, "recomputed_tokens": act["recomputed_tokens"]})
    from rich.table import Table

    table = Table(title=f"Cache bytes of one decode step: batch {args.batch}, {args.prompt}-token past, "
                        f"{args.layers} layers, hidden {args.hidden}, fp32")
    for column in ("model", "KV values/token/layer", "ACT values/token/layer", "act_ratio=0 bytes", "act_ratio=1 bytes",
                   "ratio 1:0"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], str(row["kv_values_per_token"]), str(row["act_values_per_token"]),
                      str(row["kv_bytes"]), str(row["act_bytes"]), f"{row['ratio']:.2f}")
    report(table, rows, args.json)


if __name__ == "__main__":
    main()
