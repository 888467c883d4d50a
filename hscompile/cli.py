"""The ``hscompile`` command line.

    hscompile inspect PATH [--device cuda] [--device-memory 8GiB] [--prefetch-depth 1]
                           [--act-ratio auto] [--batch 1] [--seq 512] [--dtype float16]
    hscompile tune [--device cuda] [--dtype float16] [--width 4096] [--force]
    hscompile predict PATH --profile h100-pcie5|FILE [--batch 32] [--prompt 512] [--new-tokens 32]
                           [--device-memory 8GiB] [--dtype float16]
    hscompile bench [PATH] [--device cuda] [--device-memory 8GiB] [--batch 8] [--prompt 512]
                    [--new-tokens 32] [--policy auto --policy all-kv ...] [--json out.json] [--trace t.json]
                    [--timeline t.png] [--profile p.json]
    hscompile generate [PATH] [--device cuda] [--device-memory 8GiB] [--batch 4] [--prompt 32]
                       [--new-tokens 64]

``inspect`` builds the model of a ``config.json`` or a local checkpoint directory on the meta
device (nothing is downloaded or loaded), runs the passes and prints the plan and the
schedule: per layer resident or streamed, its slot and prefetch distance, bytes. ``tune``
measures this machine's device and caches its profile. ``predict`` tells what a model would do
on a profiled machine, measured here or not (bundled: a100-40gb-pcie4, h100-pcie5). ``bench``
measures generation throughput of hscompile's policies beside transformers' (and Accelerate's)
on a model built from a config with random weights (PATH, or an embedded small Llama-style one),
and can record an auto-policy run: its timeline (per layer and mini-batch, compute against
copies) as a Chrome/Perfetto trace and a PNG, or torch.profiler's op-level trace. ``generate`` runs a generation with a
progress bar and prints its stats.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
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


def _tune(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from .runtime.tuner import profile_path, tune

    dtypes = tuple(args.dtype or ("float32",))
    with console.status(f"measuring {args.device or 'the default device'} (a few seconds)..."):
        profile = tune(args.device, dtypes=dtypes, width=args.width, force=args.force)
    table = Table(title=f"{profile.device_name} (torch {profile.torch_version})", show_header=False)
    table.add_row("host -> device", f"{profile.h2d_bytes_per_s / 1e9:.1f} GB/s")
    table.add_row("device -> host", f"{profile.d2h_bytes_per_s / 1e9:.1f} GB/s")
    table.add_row("device memory", f"{profile.memory_bytes_per_s / 1e9:.1f} GB/s (read + write)")
    table.add_row("host memory", f"{profile.host_bytes_per_s / 1e9:.1f} GB/s (read + write)")
    for dtype, rate in profile.matmul_flops_per_s.items():
        table.add_row(f"matmul {dtype}", f"{rate / 1e12:.2f} TFLOP/s peak, half at {profile.matmul_half_rows:.0f} rows")
    for dtype, rate in profile.attention_flops_per_s.items():
        table.add_row(f"attention {dtype}", f"{rate / 1e12:.2f} TFLOP/s")
    table.add_row("per call", f"{profile.call_seconds * 1e6:.1f} us")
    table.add_row("hscompile per layer", f"{profile.layer_overhead_seconds * 1e3:.3f} ms per decode step")
    table.add_row("source", profile.source)
    console.print(table)
    console.print(f"cached at {profile_path(torch.device(profile.device))}")
    return 0


def _predict(args: argparse.Namespace, console: Console) -> int:
    import transformers
    from rich.table import Table

    from .config import parse_bytes
    from .planning import load_config
    from .runtime.cost_model import ModelDims, choose
    from .runtime.tuner import load_profile

    config = load_config(args.path)
    profile = load_profile(args.profile)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    dims = ModelDims.from_model(model)
    budget = parse_bytes(args.device_memory, key="device_memory") if args.device_memory else profile.device_memory_bytes
    decision = choose(dims, profile, batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                      device_budget=budget)
    table = Table(title=f"{args.path} on {profile.device_name}: batch {args.batch}, prompt {args.prompt}, "
                        f"{args.new_tokens} new tokens, device budget {budget / 2**30:.1f} GiB")
    for column in ("act_ratio", "resident layers", "prefetch", "tokens/s", "decode step ms", "bound"):
        table.add_column(column)
    for p in sorted(decision.considered, key=lambda p: p.seconds):
        mark = " *" if p is decision.best else ""
        table.add_row(f"{p.choice.act_ratio:.2f}{mark}", f"{p.choice.resident_layers}/{dims.layers}",
                      str(p.choice.prefetch_depth), f"{p.tokens_per_s:.1f}", f"{p.decode.seconds * 1e3:.1f}", p.decode.bound)
    console.print(table)
    console.print(f"choice (*): {decision.reason}. Profile: {profile.source}")
    return 0


DEFAULT_BENCH_CONFIG = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1376,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=4096)
"""The model ``bench`` and ``generate`` build when no PATH is given: a small MHA Llama-style
decoder (about 30M parameters) that runs anywhere."""


def _random_model(path: str | None, dtype: str | None) -> torch.nn.Module:
    """A model with random weights, built on the host from ``path``'s config (or the default)."""
    import transformers

    if path is None:
        config = transformers.AutoConfig.for_model(**DEFAULT_BENCH_CONFIG)
    else:
        from .planning import load_config

        config = load_config(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if dtype else torch.float32)
    return model.eval()


def _bench_options(args: argparse.Namespace) -> dict[str, object]:
    from .config import parse_bytes

    options: dict[str, object] = {"device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    if args.device_memory:
        options["device_memory"] = parse_bytes(args.device_memory, key="device_memory")
    if getattr(args, "lowering", None):
        options["lowering"] = args.lowering
    return options


def _bench(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import Progress

    from . import bench
    from .runtime.tuner import tune

    policies = args.policy or list(bench.POLICIES)
    workload = bench.Workload(args.batch, args.prompt, args.new_tokens)
    model = _random_model(args.path, args.dtype)
    options = _bench_options(args)
    if "device_memory" not in options:
        options["device_memory"] = bench.weight_bytes(model) // 2  # well below the weights, as the benchmark is about
    with console.status("profiling the device (cached after the first time)..."):
        profile = tune(str(options["device"]), dtypes=(str(next(model.parameters()).dtype).removeprefix("torch."),),
                       width=model.config.hidden_size, quick=True, overhead=False)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("policies", total=len(policies))

        def advance(policy: str) -> None:
            progress.update(task, description=f"measuring {policy}", completed=policies.index(policy))

        results = bench.run(model, workload, options=options, profile=profile, policies=policies, progress=advance)
    title = (f"{args.path or 'default model'}: batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
             f"device {options['device']} ({profile.device_name}), budget {int(options['device_memory']) / 2**20:.0f} MiB")
    console.print(bench.results_table(results, title))
    if args.json:
        bench.write_json(args.json, results, {"title": title, "command": " ".join(sys.argv), "device": profile.device_name,
                                              "torch": torch.__version__})
        console.print(f"wrote {args.json}")
    if args.trace or args.profile or args.timeline:
        _record(args, model, options, console)
    return 0


def _record(args: argparse.Namespace, model: torch.nn.Module, options: dict[str, object], console: Console) -> None:
    """Record an auto-policy generation: hscompile's timeline (and a PNG of its last step), or
    torch.profiler's op-level trace."""
    from . import bench
    from .generation import Generator
    from .runtime.timeline import record_timeline

    torch._dynamo.reset()
    generator = Generator(model, {**options, "act_ratio": "auto"})
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    generator.generate(ids, max_new_tokens=3)  # compile outside the recording
    if args.trace or args.timeline:
        with record_timeline() as timeline:
            generator.generate(ids, max_new_tokens=3)
        stats = generator.stats()
        if args.trace:
            timeline.write(args.trace)
            console.print(f"wrote {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
        if args.timeline:
            title = (f"{args.path or 'default model'} on {options['device']}: batch {args.batch}, prompt {args.prompt}, "
                     f"act_ratio {stats['act_ratio']:.2f}, {stats['minibatch_size'] or args.batch} rows per mini-batch")
            bench.plot_timeline(timeline.spans(), args.timeline, title=title)
            console.print(f"wrote {args.timeline}")
    if args.profile:
        with bench.trace(args.profile):
            generator.generate(ids, max_new_tokens=3)
        console.print(f"wrote {args.profile} (torch.profiler; open in https://ui.perfetto.dev)")


def _generate(args: argparse.Namespace, console: Console) -> int:
    from .generation import Generator

    model = _random_model(args.path, args.dtype)
    options = _bench_options(args)
    generator = Generator(model, options)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    out = generator.generate(ids, max_new_tokens=args.new_tokens, progress=True)
    seconds = time.perf_counter() - start
    stats = generator.stats()
    new = out.shape[1] - args.prompt
    console.print(f"generated {args.batch} x {new} tokens in {seconds:.2f} s ({args.batch * new / seconds:.1f} tokens/s, "
                  "including compilation)")
    for key in ("act_ratio", "minibatch_size", "resident_layers", "streamed_layers", "peak_device_bytes",
                "weight_h2d_bytes", "cache_h2d_bytes", "recomputed_tokens"):
        if key in stats:
            console.print(f"  {key}: {stats[key]}")
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

    tune = commands.add_parser("tune", help="measure this machine's device and cache its profile")
    tune.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
    tune.add_argument("--dtype", action="append", help="dtype to measure matmuls in (repeatable; default float32)")
    tune.add_argument("--width", type=int, default=1024, help="GEMM width, e.g. the model's hidden size")
    tune.add_argument("--force", action="store_true", help="measure again even if a valid profile is cached")
    tune.set_defaults(run=_tune)

    predict = commands.add_parser("predict", help="predict a model's generation throughput on a profiled machine")
    predict.add_argument("path", help="a config.json file or a local checkpoint directory")
    predict.add_argument("--profile", required=True, help="a profile file, or a bundled one (a100-40gb-pcie4, h100-pcie5)")
    predict.add_argument("--batch", type=int, default=32)
    predict.add_argument("--prompt", type=int, default=512)
    predict.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    predict.add_argument("--device-memory", dest="device_memory", help="device budget (default: the profile's memory)")
    predict.add_argument("--dtype", help="weights dtype (default float16)")
    predict.set_defaults(run=_predict)

    from .bench import POLICIES

    for name, help_text, run in (("bench", "measure generation throughput of policies side by side", _bench),
                                 ("generate", "generate with a random-weight model and print the stats", _generate)):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("path", nargs="?", help="a config.json or checkpoint directory (default: a small Llama-style model)")
        command.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
        command.add_argument("--device-memory", dest="device_memory",
                             help="device budget, e.g. 8GiB (bench default: half the weights)")
        command.add_argument("--batch", type=int, default=8 if name == "bench" else 4)
        command.add_argument("--prompt", type=int, default=128 if name == "bench" else 32)
        command.add_argument("--new-tokens", dest="new_tokens", type=int, default=16 if name == "bench" else 32)
        command.add_argument("--dtype", help="weights dtype (default float32)")
        command.add_argument("--lowering", choices=("inductor", "eager"))
        if name == "bench":
            command.add_argument("--policy", action="append", choices=POLICIES,
                                 help="a policy to measure (repeatable; default: all)")
            command.add_argument("--json", help="write the results and ratios as JSON here")
            command.add_argument("--trace", help="write the timeline of an auto-policy generation here (Chrome/Perfetto "
                                                 "JSON: compute, copy and host lanes per layer and mini-batch)")
            command.add_argument("--timeline", help="draw that timeline's last decode step as a PNG here (matplotlib)")
            command.add_argument("--profile", help="write a torch.profiler trace (every op and kernel) of it here")
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        return args.run(args, console)
    except (HybridServeError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
