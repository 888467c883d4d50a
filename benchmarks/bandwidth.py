"""Host-to-device and device-to-host copy bandwidth, pinned and pageable.

    .venv/bin/python benchmarks/bandwidth.py [--device cuda] [--mib 256] [--repeat 10]
    .venv/bin/python benchmarks/bandwidth.py --disk FILE [--repeat 3]

On CUDA the copies are timed with events on a side stream (as the weight ring does); on the
CPU the "device" is the CPU and this measures memcpy.

``--disk FILE``: the rate hscompile's disk reader (``runtime/disk.py``: direct reads of 16 MiB) reads
FILE at, beside ``dd if=FILE of=/dev/null bs=4M iflag=direct`` (the bound), alternating, each the
median of ``--repeat`` whole-file reads. Direct reads bypass the page cache, so FILE need not be
larger than memory.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time

import torch


def measure(device: torch.device, nbytes: int, repeat: int, pinned: bool, to_device: bool) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src, dst = (host, dev) if to_device else (dev, host)
    samples = []
    for i in range(repeat + 2):
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                dst.copy_(src, non_blocking=pinned)
                end.record(stream)
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - begin
        if i >= 2:  # two warm-ups
            samples.append(nbytes / seconds / 1e9)
    return statistics.median(samples)


def measure_disk(path: str, repeat: int) -> dict[str, object]:
    """hscompile's direct reads of ``path`` against dd's, alternating (GB/s, medians)."""
    from hscompile.runtime.disk import read_bandwidth

    ours, dd, direct = [], [], False
    for _ in range(repeat):
        rate, direct = read_bandwidth(path)
        ours.append(rate / 1e9)
        run = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True,
                             text=True, check=True)
        match = re.search(r"copied, ([0-9.]+) s", run.stderr)
        total = int(run.stderr.split(" bytes", 1)[0].rsplit("\n", 1)[-1])
        dd.append(total / float(match.group(1)) / 1e9 if match else float("nan"))
    return {"file": path, "direct": direct, "reader_GBps": statistics.median(ours), "dd_direct_GBps": statistics.median(dd),
            "reader_over_dd": statistics.median(ours) / statistics.median(dd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--disk", metavar="FILE", help="measure direct reads of FILE against dd instead")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.disk:
        report = measure_disk(args.disk, args.repeat)
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
        return
    device = torch.device(args.device)
    nbytes = args.mib * 2**20
    results = {
        f"{'h2d' if to_device else 'd2h'}_{'pinned' if pinned else 'pageable'}_GBps":
            measure(device, nbytes, args.repeat, pinned, to_device)
        for to_device in (True, False)
        for pinned in (True, False)
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "bytes": nbytes, **results}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
