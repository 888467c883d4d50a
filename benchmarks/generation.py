"""Generation throughput of hscompile's policies beside transformers' and Accelerate's, in one run.

    .venv/bin/python benchmarks/generation.py [--device cpu|cuda] [--models NAME ...] [--setting flexgen|long]
                                              [--budget-fraction 0.5] [--json results/generation.json]

Models are built from configs with random weights (nothing is downloaded). FlexGen's setting is
a prompt of 512 and 32 new tokens; ``long`` is a prompt of 2048 and 32 new tokens. The device
budget is ``--budget-fraction`` of the weights. See :mod:`hscompile.bench` for how each figure is
measured; ``hscompile bench`` runs the same harness on one model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from rich.console import Console

from hscompile import bench
from hscompile.planner.hardware import tune

# OPT sizes from the OPT paper; the Llama-style GQA model is Llama-3-8B's shape.
GPU_MODELS = {
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32)),
    "opt-13b": ("opt", dict(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40)),
    "llama-8b-gqa": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
}
CPU_MODELS = {
    "opt-125m-ish": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=6, num_attention_heads=12)),
    "llama-gqa-small": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2)),
}
SETTINGS = {"flexgen": (512, 32), "long": (2048, 32)}


def build(family: str, sizes: dict, dtype: torch.dtype) -> torch.nn.Module:
    common = dict(vocab_size=sizes.pop("vocab_size", 50272), max_position_embeddings=4096)
    if family == "opt":
        config = transformers.OPTConfig(word_embed_proj_dim=sizes["hidden_size"], **common, **sizes)
    else:
        config = transformers.LlamaConfig(**common, **sizes)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--setting", choices=SETTINGS, default="flexgen")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 4 on the CPU")
    parser.add_argument("--prompt", type=int, help="override the setting's prompt length")
    parser.add_argument("--new-tokens", dest="new_tokens", type=int, help="override the setting's new tokens")
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--policy", action="append", choices=bench.ALL_POLICIES)
    parser.add_argument("--lowering", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--json")
    args = parser.parse_args()
    console = Console()
    catalogue = GPU_MODELS if args.device == "cuda" else CPU_MODELS
    names = args.models or list(catalogue)
    prompt, new = SETTINGS[args.setting]
    workload = bench.Workload(args.batch or (32 if args.device == "cuda" else 4), args.prompt or prompt,
                              args.new_tokens or new)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    profile = tune(args.device, dtypes=(str(dtype).removeprefix("torch."),), quick=True)
    report = {"device": profile.device_name, "torch": torch.__version__, "command": " ".join(sys.argv), "runs": []}
    for name in names:
        family, sizes = catalogue[name]
        model = build(family, dict(sizes), dtype)
        weights = bench.weight_bytes(model)
        options = {"device": args.device, "device_memory": int(weights * args.budget_fraction), "lowering": args.lowering}
        results = bench.run(model, workload, options=options, profile=profile, policies=args.policy or bench.POLICIES,
                            progress=lambda p, name=name: console.log(f"{name}: {p}"))
        title = (f"{name} ({weights / 2**30:.2f} GiB) on {profile.device_name}: batch {workload.batch}, prompt "
                 f"{workload.prompt}, {workload.new_tokens} new, budget {args.budget_fraction:.2f} x weights")
        console.print(bench.results_table(results, title))
        report["runs"].append({"model": name, "title": title, "weights_bytes": weights,
                               "results": [asdict(r) for r in results],
                               "auto_vs": {p: bench.ratios(results, p).get("auto") for p in bench.POLICIES}})
        del model
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
