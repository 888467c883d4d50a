"""The ``hscompile`` command line.

    hscompile inspect PATH [--device cuda] [--device-memory 8GiB] [--prefetch-depth 1]
                           [--act-ratio auto] [--batch 1] [--seq 512] [--dtype float16]

``inspect`` builds the model of a ``config.json`` or a local checkpoint directory on the meta
device (nothing is downloaded or loaded), runs the passes and prints the plan and the
schedule: per layer resident or streamed, its slot and prefetch distance, bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from .errors import HybridServeError

__all__ = ["main"]


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from .planning import plan_model

    options: dict[str, object] = {"lowering": "eager"}
    for key in ("device", "device_memory", "act_ratio", "prefetch_depth", "block_size"):
        value = getattr(args, key)
        if value is not None:
            options[key] = float(value) if key == "act_ratio" and value != "auto" else value
    start = time.perf_counter()
    inspection = plan_model(args.path, batch=args.batch, seq=args.seq, dtype=args.dtype, options=options)
    console.print(inspection)
    console.print(f"planned in {time.perf_counter() - start:.1f} s for batch {args.batch} x {args.seq} tokens; nothing was run")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hscompile", description="HybridServe compiler for LLM inference beyond device memory")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="plan a model (config.json or local checkpoint) and print its schedule")
    inspect.add_argument("path", help="a config.json file or a local checkpoint directory")
    inspect.add_argument("--device", help="compute device to plan for ('cuda', 'cpu'); need not exist here")
    inspect.add_argument("--device-memory", dest="device_memory", help="device budget, e.g. 8GiB")
    inspect.add_argument("--act-ratio", dest="act_ratio", help="fraction of cached tokens kept as activations, or 'auto'")
    inspect.add_argument("--prefetch-depth", dest="prefetch_depth", type=int)
    inspect.add_argument("--block-size", dest="block_size", type=int)
    inspect.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    inspect.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    inspect.add_argument("--dtype", help="weights dtype (default: the config's, else float32)")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        return args.run(args, console)
    except HybridServeError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
