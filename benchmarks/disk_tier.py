"""The disk tier measured: a Llama-shaped bf16 checkpoint several times ``host_memory``, decoded at a few
batch sizes, beside the rate its file reads at with direct reads (the bound).

    .venv/bin/python benchmarks/disk_tier.py [--dir DIR] [--gb 8] [--host-memory 2.5GiB] \
        [--batches 1,8,32,64] [--steps 2] [--prompt 8] [--shard-gb 5] [--accelerate] \
        [--out benchmarks/results/disk_tier.json]

The checkpoint (random weights, written once under ``--dir``, reused when its size matches) is read
by hscompile's disk tier at every step: the script reports, per batch, the decode step, the disk
bytes per step, the achieved read rate as a fraction of the bound (``runtime/disk.read_bandwidth`` on
the same file, direct reads), tokens/s and the peak RSS of the process above its RSS before loading
(each batch in a fresh process, so one batch's memory does not carry into the next). A decode step
is measured as the difference of two calls (``max_new_tokens`` 1 and ``1 + steps``), which removes
the prefill, compilation and the reads ahead at a call's end.

``--accelerate`` adds transformers + Accelerate's disk offload (``device_map`` with every layer on
"disk", ``offload_folder``) on the same checkpoint and batches. Its offload folder is read through
the page cache (numpy memory maps): when the folder fits this machine's memory the second step on
reads memory, not the disk, which the table says.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def llama_config(gb: float, *, hidden: int = 2048, inter: int = 5632, heads: int = 16, kv: int = 4,
                 vocab: int = 32000, dtype: str = "bfloat16") -> dict:
    """A Llama (default: TinyLlama's width) with as many layers as make ``gb`` GB of weights."""
    item = 4 if dtype == "float32" else 2
    layer = item * (2 * hidden * hidden + 2 * hidden * hidden * kv // heads + 3 * hidden * inter + 2 * hidden)
    outside = item * (2 * vocab * hidden + hidden)
    layers = max(2, round((gb * 1e9 - outside) / layer))
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}


def write_checkpoint(directory: Path, config: dict, shard_bytes: float | None = None) -> list[Path]:
    """``config.json`` and the safetensors file(s) of random weights in the config's ``dtype`` (bf16
    or float32), written tensor by tensor
    (the whole model never sits in memory), laid out as safetensors writers lay them (by name); with
    ``shard_bytes``, in shards of about that size with a ``model.safetensors.index.json``, as large
    checkpoints come. An existing checkpoint of the same sizes is reused."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(directory))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    dtype = getattr(torch, config.get("dtype", "bfloat16"))
    item, tag = dtype.itemsize, {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = item * math.prod(shapes[name])
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ([directory / "model.safetensors"] if len(shards) == 1 else
             [directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if len(shards) > 1:
        weight_map = {name: file.name for file, names in zip(files, shards) for name in names}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    block = (torch.randn(2**24, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    raw = block.view(torch.uint8).numpy().tobytes()
    for file, names in zip(files, shards):
        header, offset = {}, 0
        for name in names:
            nbytes = item * math.prod(shapes[name])
            header[name] = {"dtype": tag, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        if file.is_file() and file.stat().st_size == 8 + len(text) + offset:
            continue
        with file.open("wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for name in names:
                left = item * math.prod(shapes[name])
                while left:
                    chunk = raw[: min(left, len(raw))]
                    out.write(chunk)
                    left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
    return files


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


class PeakRss:
    """The process's peak RSS above what it was when started, sampled every 5 ms."""

    def __init__(self) -> None:
        self.base = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak - self.base


def run_one(args: argparse.Namespace) -> dict:
    """One batch in this process: hscompile, or Accelerate with ``--engine accelerate``."""
    batch, steps = args.batch, args.steps
    reader: dict[int, tuple[float, float]] = {}
    """max_new_tokens -> (seconds the reader read, seconds the steps waited for it) in that call."""
    ids = torch.randint(3, 32000, (batch, args.prompt), generator=torch.Generator().manual_seed(1))
    rss = PeakRss()
    if args.engine == "hscompile":
        import hscompile
        from hscompile.config import parse_bytes

        model = hscompile.from_pretrained(args.dir, options={"device": "cpu", "lowering": "eager",
                                                             "host_memory": parse_bytes(args.host_memory, key="host_memory")})

        def counters() -> tuple[int, float, float]:
            stats = model.stats() if model.compiled_graphs else {}
            return (stats.get("disk_read_bytes", 0), stats.get("disk_read_seconds", 0.0),
                    stats.get("disk_wait_seconds", 0.0))

        def generate(new: int) -> tuple[float, int]:
            before = counters()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new)
            seconds = time.perf_counter() - start
            after = counters()
            reader[new] = (after[1] - before[1], after[2] - before[2])
            return seconds, after[0] - before[0]
    else:
        import transformers

        config = transformers.AutoConfig.from_pretrained(args.dir)
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.dir, device_map=device_map, offload_folder=str(Path(args.dir) / "accelerate-offload"),
            dtype=torch.bfloat16)

        def generate(new: int) -> tuple[float, int]:
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            return time.perf_counter() - start, 0

    generate(2)  # compiles the prefill and decode graphs (hscompile), warms
    short, short_bytes = generate(1)
    long, long_bytes = generate(1 + steps)
    peak = rss.stop()
    step = (long - short) / steps
    stats = model.stats() if args.engine == "hscompile" else {}
    return {"engine": args.engine, "batch": batch, "step_s": step, "tokens_per_s": batch / step,
            "disk_bytes_per_step": (long_bytes - short_bytes) / steps, "peak_rss_above_start": peak,
            "disk_layers": stats.get("disk_layers"), "disk_host_bytes": stats.get("disk_host_bytes"),
            "reader_busy_s_per_step": (reader[1 + steps][0] - reader[1][0]) / steps if reader else None,
            "waited_for_disk_s_per_step": (reader[1 + steps][1] - reader[1][1]) / steps if reader else None,
            "predicted_step_s": getattr(model.compiled_graphs[-1].policy.predicted, "seconds", None)
            if args.engine == "hscompile" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(HERE / "results" / "disk-checkpoint"))
    parser.add_argument("--gb", type=float, default=8.0)
    parser.add_argument("--shard-gb", type=float, default=None, help="write the checkpoint in shards of this size")
    parser.add_argument("--host-memory", default="2.5GiB")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens per sequence")
    parser.add_argument("--accelerate", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "disk_tier.json"))
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine is not None:
        print(json.dumps(run_one(args)))
        return

    from hscompile.config import format_bytes, parse_bytes
    from hscompile.runtime.disk import read_bandwidth

    host = parse_bytes(args.host_memory, key="host_memory")
    files = write_checkpoint(Path(args.dir), llama_config(args.gb), args.shard_gb * 1e9 if args.shard_gb else None)
    size = sum(f.stat().st_size for f in files)
    bound, direct = read_bandwidth(files[0])
    print(f"checkpoint {format_bytes(size)} in {len(files)} file(s) ({size / host:.1f}x host_memory="
          f"{args.host_memory}); direct reads of {files[0].name}: {bound / 1e9:.2f} GB/s (direct: {direct})", flush=True)
    rows = []
    engines = ["hscompile"] + (["accelerate"] if args.accelerate else [])
    for engine in engines:
        for batch in (int(b) for b in args.batches.split(",")):
            command = [sys.executable, __file__, "--engine", engine, "--batch", str(batch), "--dir", args.dir,
                       "--host-memory", args.host_memory, "--steps", str(args.steps), "--prompt", str(args.prompt)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                rows.append({"engine": engine, "batch": batch, "error": tail[0][:300]})
                print(f"{engine} batch {batch}: failed: {tail[0][:300]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if row["disk_bytes_per_step"]:
                row["disk_fraction_of_bound"] = row["disk_bytes_per_step"] / row["step_s"] / bound
            rows.append(row)
            print(f"{engine} batch {batch}: step {row['step_s']:.2f} s, {row['tokens_per_s']:.2f} tokens/s, "
                  f"disk {row['disk_bytes_per_step'] / 1e9:.2f} GB/step "
                  f"({row.get('disk_fraction_of_bound', 0):.2f} of the bound), peak RSS +"
                  f"{format_bytes(row['peak_rss_above_start'])}", flush=True)
    result = {"checkpoint_bytes": size, "host_memory": host, "bound_bytes_per_s": bound,
              "direct": direct, "layers": llama_config(args.gb)["num_hidden_layers"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
