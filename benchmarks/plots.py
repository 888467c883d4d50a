"""Throughput against batch size and against act_ratio, measured beside the cost model's prediction.

    pip install -e '.[plot]'   # matplotlib, an optional extra
    .venv/bin/python benchmarks/plots.py [--device cpu|cuda] [--out benchmarks/results]

Builds one model from a config (random weights; MHA so that checkpoints can pay off), streams it
under a device budget of half its weights, and for each point times a generation with
``hscompile.Generator`` (warm: the second of two runs) and predicts it with
:func:`hscompile.planner.cost_model.generation_seconds` for the policy the run used. Writes
``throughput_vs_batch.png``, ``throughput_vs_act_ratio.png``, ``timeline.png`` (one decode step
of the middle batch at act_ratio 0.5 in two mini-batches, recorded with
:func:`hscompile.record_timeline`; ``timeline.json`` is the whole generation as a Perfetto trace)
and the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from hscompile import Generator, bench, record_timeline
from hscompile.planner.cost_model import Choice, ModelDims, generation_seconds
from hscompile.planner.hardware import tune


def _model(device: str) -> torch.nn.Module:
    sizes = (dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16)
             if device == "cuda" else dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                           num_attention_heads=8))
    config = transformers.LlamaConfig(vocab_size=4096, max_position_embeddings=4096,
                                      num_key_value_heads=sizes["num_attention_heads"], **sizes)
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _point(generator: Generator, model, profile, batch: int, prompt: int, new: int, ratio: float) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    generator.generate(ids, max_new_tokens=new, act_ratio=ratio)
    start = time.perf_counter()
    generator.generate(ids, max_new_tokens=new, act_ratio=ratio)
    seconds = time.perf_counter() - start
    policy = generator.compiled_graphs[-1].policy
    choice = Choice(len(policy.resident_layers), policy.prefetch_depth, ratio, policy.minibatches)
    predicted, _, _ = generation_seconds(ModelDims.from_model(model), choice, profile, batch=batch, prompt=prompt,
                                         new_tokens=new, block_size=policy.block_size)
    return {"batch": batch, "act_ratio": ratio, "measured_tokens_per_s": batch * new / seconds,
            "predicted_tokens_per_s": batch * new / predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=8)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = _model(args.device)
    weights = bench.weight_bytes(model)
    profile = tune(args.device, dtypes=(str(next(model.parameters()).dtype).removeprefix("torch."),),
                   width=model.config.hidden_size, quick=True)
    batches = (1, 2, 4, 8) if args.device == "cpu" else (4, 8, 16, 32, 64)
    # Below the weights, plus room for the largest batch's staging (and CUDA's workspace); every
    # point runs under it.
    budget = int(weights * 0.5) + 512 * 2**20 if args.device == "cuda" else int(weights * 0.85)
    generator = Generator(model, {"device": args.device, "device_memory": budget, "mini_batch_size": "auto"})
    by_batch = [_point(generator, model, profile, b, args.prompt, args.new, 0.5) for b in reversed(batches)][::-1]
    batch = batches[len(batches) // 2]
    by_ratio = [_point(generator, model, profile, batch, args.prompt, args.new, r) for r in (1.0, 0.75, 0.5, 0.25, 0.0)][::-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, key, label in (("throughput_vs_batch", by_batch, "batch", "batch size (act_ratio 0.5)"),
                                   ("throughput_vs_act_ratio", by_ratio, "act_ratio", f"act_ratio (batch {batch})")):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        xs = [r[key] for r in rows]
        axes.plot(xs, [r["measured_tokens_per_s"] for r in rows], "o-", label="measured")
        axes.plot(xs, [r["predicted_tokens_per_s"] for r in rows], "s--", label="cost model")
        axes.set_xlabel(label)
        axes.set_ylabel("tokens/s")
        axes.set_title(f"{profile.device_name}, prompt {args.prompt}, {args.new} new, budget {budget / weights:.2f}x weights",
                       fontsize=8)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=120)
    # The timeline: one generation recorded; its last decode step drawn.
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
    size = max(2, batch // 2)
    torch._dynamo.reset()
    generator = Generator(model, {"device": args.device, "device_memory": budget, "mini_batch_size": size,
                                  "act_ratio": 0.5})
    generator.generate(ids, max_new_tokens=3)
    with record_timeline() as timeline:
        generator.generate(ids, max_new_tokens=3)
    timeline.write(out / "timeline.json")
    bench.plot_timeline(timeline.spans(), out / "timeline.png",
                        title=f"{profile.device_name}: one decode step, batch {batch} in mini-batches of {size}, "
                              f"prompt {args.prompt}, act_ratio 0.5, budget {budget / weights:.2f}x the weights")
    (out / "plots.json").write_text(json.dumps({"device": profile.device_name, "budget": budget, "weights": weights,
                                                "torch": torch.__version__, "by_batch": by_batch,
                                                "by_ratio": by_ratio}, indent=2))


if __name__ == "__main__":
    main()
