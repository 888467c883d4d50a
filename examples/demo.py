"""The demo `make demo` runs.

A small Llama-style model built from a config (random weights, nothing downloaded) lives in
host memory. It is compiled with the hybridserve backend under a device budget of a third of
its weights, so most layers stream through the device slot ring, and it generates tokens for
a batch of prompts of different lengths with half the cached tokens kept as activation
checkpoints (their K/V recomputed on the device). The demo checks the tokens against
transformers' own generate and prints the decode schedule and its stats.

    .venv/bin/python examples/demo.py [--layers 12] [--fraction 0.33] [--act-ratio 0.5]
                                      [--new-tokens 16] [--lowering inductor|eager] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hscompile
from hscompile.bench import weight_bytes
from hscompile.config import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--fraction", type=float, default=0.33, help="device budget as a fraction of the weights")
    parser.add_argument("--act-ratio", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # in host memory
    weights = weight_bytes(model)
    # On CUDA the plan also reserves room for library workspaces (see docs/ARCHITECTURE.md).
    budget = int(weights * args.fraction) + (96 * 2**20 if args.device == "cuda" else 0)

    lengths = [24, 17, 9, 30]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # a left-padded batch of prompts of different lengths
        ids[row, -n:] = torch.randint(3, config.vocab_size, (n,))
        mask[row, -n:] = 1
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    generator = hscompile.Generator(
        model, {"device": args.device, "device_memory": budget, "act_ratio": args.act_ratio, "lowering": args.lowering}
    )
    start = time.perf_counter()
    tokens = generator.generate(ids, mask, max_new_tokens=args.new_tokens)
    elapsed = time.perf_counter() - start

    print(hscompile.inspect(generator.compiled_graphs[-1]))  # the decode step's schedule
    stats = generator.stats()
    print(
        f"weights {format_bytes(weights)}, device budget {format_bytes(budget)}: {stats['streamed_layers']} of "
        f"{args.layers} layers stream; peak device bytes {format_bytes(stats['peak_device_bytes'])}"
    )
    print(
        f"cache: {stats['kv_tokens']} tokens as KV, {stats['act_tokens']} as checkpoints; "
        f"{stats['recomputed_tokens']} token-layers recomputed; {format_bytes(stats['cache_h2d_bytes'])} loaded, "
        f"{format_bytes(stats['cache_d2h_bytes'])} stored"
    )
    print(f"generated {args.new_tokens} tokens x {len(lengths)} sequences in {elapsed:.1f} s (compilation included)")
    same = torch.equal(tokens, expected)
    print(f"tokens equal transformers' generate: {same}")
    if not same or stats["peak_device_bytes"] > budget:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
