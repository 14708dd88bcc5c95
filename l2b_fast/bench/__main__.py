"""python -m l2b_fast.bench: time the branching op's backends against the naive implementation."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from l2b_fast import backends
from l2b_fast.bench import branch_benchmark as bench
from l2b_fast.bench import report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m l2b_fast.bench",
        description=(
            "Forward+backward time of every l2b_fast backend against naive per-child "
            "F.gumbel_softmax(hard=True) + weighted sum; writes CSV and JSON tagged with device and versions."
        ),
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if present)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=(
            f"comma-separated, from {', '.join(bench.SHAPES)} (default: taskonomy,celeba on cuda; "
            "cpu-target,taskonomy,celeba on cpu)"
        ),
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: every backend that runs on the device, Triton's CPU interpreter excluded)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default: 50 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for the CSV/JSON results (default: print only)"
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: not available here")
    default_shapes = "taskonomy,celeba" if args.device == "cuda" else "cpu-target,taskonomy,celeba"
    args.shapes = (args.shapes or default_shapes).split(",")
    for shape in args.shapes:
        if shape not in bench.SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(bench.SHAPES)}")
    if args.backends is None:
        interpreted = args.device == "cpu"
        args.backends = [
            name
            for name, why in backends.available(args.device).items()
            if why is None and not (name == "triton" and interpreted)
        ]
    else:
        args.backends = args.backends.split(",")
        for name in args.backends:
            why = backends.unavailable_reason(name, args.device)
            if why is not None:
                parser.error(f"backend {name!r} is unavailable: {why}")
    args.repeat = args.repeat or (50 if args.device == "cuda" else 5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = report.environment(device)
    meta["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | threads {meta['cpu_threads']}")
    copy_gbps = bench.copy_bandwidth(device, 256 * 2**20, args.warmup, args.repeat)
    meta["copy_GBps"] = round(copy_gbps, 2)
    meta["peak_memory"] = bench.MEMORY_METHOD[device.type]
    meta["timer"] = bench.TIMER[device.type]
    print(f"device copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    rows = bench.run(
        args.shapes,
        args.backends,
        device,
        getattr(torch, args.dtype),
        args.warmup,
        args.repeat,
        naive=not args.no_naive,
    )
    for row in rows:
        row["backward_pct_of_copy"] = round(100 * row["backward_GBps"] / copy_gbps, 1) if row["backward_GBps"] else None
    print(bench.format_table(rows))
    if args.out is not None:
        stem = f"branch_{args.device}_{re.sub(r'[^A-Za-z0-9]+', '-', meta['device']).strip('-').lower()}_{args.dtype}"
        csv_path, json_path = report.write_results(
            rows, meta, args.out, stem, tags=("device", "torch", "triton", "timer")
        )
        print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
