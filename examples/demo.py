"""The demo `make demo` runs: a small Llama-style model built from a config (random weights,
nothing downloaded), compiled with the hybridserve backend, checked against eager, inspected.

    .venv/bin/python examples/demo.py [--layers 8] [--lowering inductor|eager] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import hscompile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(args.device)
    ids = torch.randint(0, config.vocab_size, (4, 48), device=args.device)

    compiled = torch.compile(model, backend="hybridserve", options={"device": args.device, "lowering": args.lowering})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
    first = time.perf_counter() - start
    with torch.no_grad():
        reference = model(ids).logits
    difference = (logits - reference).abs().max().item()

    print(hscompile.inspect(compiled))
    print(f"first call (capture + compile + run): {first:.1f} s")
    print(f"max |logits - eager logits| = {difference:.2e} over {tuple(logits.shape)}")
    if difference > 1e-4:
        raise SystemExit("parity check failed")


if __name__ == "__main__":
    main()
