"""Cache blocks on disk against waves, measured side by side: a batch whose cache ``host_memory``
cannot hold, on a checkpoint whose layers are read from disk at every step.

    .venv/bin/python benchmarks/disk_cache.py [--dir DIR] [--gb 1] [--host-memory 400MiB] [--batch 32] \
        [--prompt 64] [--new 32] [--act-ratio 0.0] [--out benchmarks/results/disk_cache.json]

The checkpoint (random float32 weights of an MHA Llama shape with a small vocabulary, written once
under ``--dir``) is larger than ``host_memory``, so its layers stay on disk and every decode step
reads them (the disk tier). The batch's cache blocks do not fit what the budget leaves: with
``disk_cache="off"`` the call runs in waves (each wave reads every layer at every step), with
``"on"`` it runs whole with the blocks past the budget in a file of ``offload_dir``, and ``"auto"``
is what the cost model chose. Each mode runs in a fresh process (after a short warm-up call that
captures the graphs): the call's wall time, tokens/s, the waves, the cache's disk bytes, the
prediction, and the peak RSS above the process's RSS before loading.

float32 because this CPU multiplies bf16 slowly (about 8 GFLOP/s here against several times that
in float32): in bf16 the compute of a batch, not the disk, binds each step, and neither mode wins.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from disk_tier import PeakRss, _rss, llama_config, write_checkpoint

HERE = Path(__file__).resolve().parent


def mha_config(gb: float) -> dict:
    """An MHA Llama (16 heads of 64) with a 4096-token vocabulary and as many layers as make ``gb``
    GB of float32 weights: per token and layer its K/V are 8 KiB, so a cache outgrows a small
    budget at short contexts."""
    return llama_config(gb, hidden=1024, inter=2816, heads=16, kv=16, vocab=4096, dtype="float32")


def run_one(args: argparse.Namespace) -> dict:
    import hscompile
    from hscompile.config import parse_bytes

    rss = PeakRss()
    options = {"device": "cpu", "lowering": "eager", "host_memory": parse_bytes(args.host_memory, key="host_memory"),
               "disk_cache": args.mode, "act_ratio": float(args.act_ratio), "offload_dir": args.offload_dir}
    model = hscompile.from_pretrained(args.dir, options=options)
    ids = torch.randint(3, 4096, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    model.generate(ids, max_new_tokens=2)  # captures the prefill and decode graphs at this batch
    warm = _rss() - rss.base
    before = model.stats()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.new, ignore_eos=True)
    seconds = time.perf_counter() - start
    stats = model.stats()
    plan = model.plan
    spill = plan.spill
    return {"mode": args.mode, "seconds": seconds, "tokens_per_s": args.batch * args.new / seconds,
            "waves": [len(w) for w in plan.waves], "generated": int(out.shape[1] - args.prompt),
            "cache_disk_blocks": stats["cache_disk_blocks"],
            "cache_disk_read_bytes": stats["cache_disk_read_bytes"] - before["cache_disk_read_bytes"],
            "cache_disk_write_bytes": stats["cache_disk_write_bytes"] - before["cache_disk_write_bytes"],
            "weight_disk_read_bytes": stats["disk_read_bytes"] - before["disk_read_bytes"],
            "disk_layers": stats["disk_layers"], "pool_bytes": model.cache.pool_bytes(),
            "predicted_s": spill.seconds if spill is not None else None,
            "predicted_waves_s": spill.waves_seconds if spill is not None else None,
            "peak_rss_above_start": (peak := rss.stop()), "rss_after_warmup": warm,
            "peak_rss_above_warmup": peak - warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(HERE / "results" / "disk-cache-checkpoint"))
    parser.add_argument("--offload-dir", default=str(HERE / "results" / "disk-cache-offload"))
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--host-memory", default="400MiB")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--act-ratio", default="0.0")
    parser.add_argument("--modes", default="off,on,auto")
    parser.add_argument("--out", default=str(HERE / "results" / "disk_cache.json"))
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(run_one(args)))
        return

    from hscompile.config import format_bytes

    config = mha_config(args.gb)
    files = write_checkpoint(Path(args.dir), config)
    Path(args.offload_dir).mkdir(parents=True, exist_ok=True)
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint {format_bytes(size)}, {config['num_hidden_layers']} layers; host_memory={args.host_memory}; "
          f"batch {args.batch} x ({args.prompt} + {args.new}) tokens", flush=True)
    rows = []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode, "--dir", args.dir, "--offload-dir", args.offload_dir,
                   "--host-memory", args.host_memory, "--batch", str(args.batch), "--prompt", str(args.prompt),
                   "--new", str(args.new), "--act-ratio", args.act_ratio]
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["?"]
            rows.append({"mode": mode, "error": tail[0][:300]})
            print(f"disk_cache={mode}: failed: {tail[0][:300]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        predicted = (f"; predicted {row['predicted_s']:.1f} s" if row["predicted_s"] is not None else "") + (
            f" against {row['predicted_waves_s']:.1f} s in waves" if row["predicted_waves_s"] is not None else "")
        print(f"disk_cache={mode}: {row['seconds']:.1f} s, {row['tokens_per_s']:.2f} tokens/s, waves {row['waves']}, "
              f"cache on disk {row['cache_disk_blocks']} blocks, read {format_bytes(row['cache_disk_read_bytes'])}, "
              f"written {format_bytes(row['cache_disk_write_bytes'])}; weights read "
              f"{format_bytes(row['weight_disk_read_bytes'])}; pools {format_bytes(row['pool_bytes'])}; peak RSS +"
              f"{format_bytes(row['peak_rss_above_start'])} (+{format_bytes(row['peak_rss_above_warmup'])} above the RSS after "
              f"the warm-up call){predicted}", flush=True)
    result = {"checkpoint_bytes": size, "layers": config["num_hidden_layers"], "host_memory": args.host_memory,
              "batch": args.batch, "prompt": args.prompt, "new": args.new, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
