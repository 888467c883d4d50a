"""Soak: one Generator, many calls of varying shapes and ratios; memory, compiled graphs, blocks.

    .venv/bin/python benchmarks/soak.py [--calls 1000] [--warmup 100] [--json out.json]

A tiny Llama (4 layers, hidden 64, random weights) behind one ``hscompile.Generator`` (CPU, eager
lowering, a device budget of 1.1x the weights, which streams layers once activations are counted,
blocks of 4; the first call is the largest, all-ACT, which the placement is planned for) runs
``--calls`` generations, each with a random batch (1-6 sequences), random left-padded prompt
lengths (1-24 tokens), 1-4 new tokens and a per-call ``act_ratio`` drawn from 0, 0.25, 0.5, 1 and
"auto" (seeded: the same run every time). A call the budget refuses (before any work) is counted
apart. Reported: resident memory (VmRSS) after the warm-up calls and at the end, the number of
compiled graphs after the warm-up and at the end, and whether every cache block is free at the
end. Every 50th call is checked against transformers' greedy tokens.
"""

from __future__ import annotations

import argparse
import random
import time

from report import report


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args()

    import gc

    import torch
    import transformers

    import hscompile

    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = hscompile.Generator(model, {"device": "cpu", "lowering": "eager", "block_size": 4,
                                            "device_memory": int(weights * 1.1)})
    draw = random.Random(0)
    checked = mismatches = refused = 0
    rss_warm = graphs_warm = 0
    start = time.perf_counter()
    for call in range(args.calls):
        batch, new = draw.randint(1, 6), draw.randint(1, 4)
        lengths = [draw.randint(1, 24) for _ in range(batch)]
        if call == 0:  # the largest call first: the placement is planned for what the first call needs
            batch, new, lengths = 6, 4, [24] * 6
        width = max(lengths)
        ids = torch.randint(3, 128, (batch, width), generator=torch.Generator().manual_seed(call))
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, width - n:] = 1
        ids = ids.masked_fill(mask == 0, 0)
        ratio = 1.0 if call == 0 else draw.choice([0.0, 0.25, 0.5, 1.0, "auto"])
        try:
            out = generator.generate(ids, mask, max_new_tokens=new, act_ratio=ratio)
        except hscompile.BudgetError:  # refused before any work: counted apart, as the budget's answer
            refused += 1
            continue
        if call % 50 == 0:
            with torch.no_grad():
                expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                          pad_token_id=0)
            width_out = min(out.shape[1], expected.shape[1])
            checked += 1
            mismatches += int(not torch.equal(out[:, :width_out], expected[:, :width_out]))
        if call + 1 == args.warmup:
            gc.collect()
            rss_warm, graphs_warm = _rss_bytes(), len(generator.compiled_graphs)
    gc.collect()
    rss_end, graphs_end = _rss_bytes(), len(generator.compiled_graphs)
    pools = generator.cache.cache
    free = pools is not None and not pools.sequences and pools.kv_pool.num_free() == pools.kv_pool.num_blocks \
        and pools.act_pool.num_free() == pools.act_pool.num_blocks
    result = {
        "calls": args.calls, "warmup": args.warmup, "seconds": time.perf_counter() - start,
        "rss_after_warmup": rss_warm, "rss_end": rss_end, "rss_growth": rss_end / rss_warm - 1,
        "graphs_after_warmup": graphs_warm, "graphs_end": graphs_end,
        "checked_against_transformers": checked, "mismatches": mismatches, "refused_by_budget": refused,
        "blocks_all_free": free, "streamed_layers_per_graph": [len(c.policy.streamed_layers) for c in generator.compiled_graphs],
    }

    from rich.table import Table

    table = Table(title=f"Soak: one Generator, {args.calls} calls (tiny Llama, CPU, streamed)")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("resident memory after warm-up / at the end", f"{rss_warm / 2**20:.1f} / {rss_end / 2**20:.1f} MiB "
                  f"({result['rss_growth']:+.1%})")
    table.add_row("compiled graphs after warm-up / at the end", f"{graphs_warm} / {graphs_end}")
    table.add_row("calls checked against transformers / mismatches", f"{checked} / {mismatches}")
    table.add_row("calls refused by the device budget", str(refused))
    table.add_row("streamed layers (of 4), per compiled graph", str(result["streamed_layers_per_graph"]))
    table.add_row("every cache block free at the end", str(free))
    table.add_row("wall time", f"{result['seconds']:.0f} s")
    report(table, result, args.json)


if __name__ == "__main__":
    main()
