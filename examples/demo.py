"""The demo `make demo` runs.

A small Llama-style model built from a config (random weights, nothing downloaded) lives in
host memory; it is compiled with the hybridserve backend under a device budget of a third of
its weights, so most layers stream through the device slot ring. The demo checks the logits
against the eager model and prints the schedule and its stats.

    .venv/bin/python examples/demo.py [--layers 12] [--fraction 0.33] [--lowering inductor|eager] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hscompile
from hscompile.config import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--fraction", type=float, default=0.33, help="device budget as a fraction of the weights")
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # in host memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # On CUDA the plan also reserves room for library workspaces (see docs/ARCHITECTURE.md).
    budget = int(weights * args.fraction) + (96 * 2**20 if args.device == "cuda" else 0)
    ids = torch.randint(0, config.vocab_size, (4, 48))
    with torch.no_grad():
        reference = model(ids).logits

    compiled = torch.compile(
        model, backend="hybridserve",
        options={"device": args.device, "device_memory": budget, "lowering": args.lowering},
    )
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
    first = time.perf_counter() - start
    difference = (logits - reference).abs().max().item()

    info = hscompile.inspect(compiled)
    print(info)
    print(f"weights {format_bytes(weights)}, device budget {format_bytes(budget)}: "
          f"{len(info.policy.streamed_layers)} of {args.layers} layers stream; peak device bytes "
          f"{format_bytes(info.stats['peak_device_bytes'])}")
    print(f"first call (capture + compile + run): {first:.1f} s")
    print(f"max |logits - eager logits| = {difference:.2e} over {tuple(logits.shape)}")
    if difference > 1e-4 or info.stats["peak_device_bytes"] > budget:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
