"""One branching block, forward + backward in search (or frozen) mode: per_child against grouped (gather, then one
launch per layer).

Variants run interleaved, round by round, so a shared machine's noise hits them alike; medians are
reported with the ratios, of wall time and of the process's CPU time (steadier on a shared machine:
time spent descheduled does not count). Writes ``grouped_block_<device>_<mode>.{csv,json}`` tagged with
device, versions, config and thread count.

    python benchmarks/grouped_block_benchmark.py --out benchmarks/results [--device cuda] [--mode frozen]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from l2b_fast.bench.report import environment, write_results
from l2b_fast.nn import BasicBlock, Branching
from l2b_fast.nn.grouped import GroupedBlock
from l2b_fast.nn.supernet import run_per_child


def vgg_node(channels_in: int, channels: int):
    return lambda: nn.Sequential(
        nn.Conv2d(channels_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
    )


# name: (parents I, children J, batch, channels in, spatial, node factory)
CASES = {
    "vgg-first (1->3, 3->32ch, 64x64)": (1, 3, 16, 3, 64, vgg_node(3, 32)),
    "vgg-mid (5->10, 32ch, 16x16)": (5, 10, 16, 32, 16, vgg_node(32, 32)),
    "vgg-late (30->40, 32ch, 8x8)": (30, 40, 16, 32, 8, vgg_node(32, 32)),
    "vgg-late (40->40, 32ch, 4x4)": (40, 40, 16, 32, 4, vgg_node(32, 32)),
    "resnet (5->5, BasicBlock 64ch, 32x32)": (5, 5, 8, 64, 32, lambda: BasicBlock(64, 64)),
    "resnet-down (5->5, BasicBlock 64->128 /2, 32x32)": (5, 5, 8, 64, 32, lambda: BasicBlock(64, 128, stride=2)),
}


def make_block(case, device):
    parents_count, children, batch, channels, size, node = case
    torch.manual_seed(0)
    nodes = nn.ModuleList(node() for _ in range(children)).to(device)
    branching = Branching(parents_count, children).to(device)
    with torch.no_grad():
        branching.logits.normal_()
    parents = torch.randn(parents_count, batch, channels, size, size, device=device, requires_grad=True)
    return nodes, branching, parents


def timed(run, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--mode", choices=("search", "frozen"), default="search", help="frozen: logits get no gradient (warmup)"
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated names (prefixes) of " + ", ".join(CASES)
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    wanted = [name for name in CASES if any(name.startswith(prefix.strip()) for prefix in args.cases.split(","))]
    rows = []
    for name in wanted:
        nodes, branching, parents = make_block(CASES[name], device)
        branching.mode = args.mode
        grouped = GroupedBlock(nodes, 0)
        variants = {
            "per_child": lambda gen: run_per_child(0, branching, nodes, parents, gen),
            "grouped": lambda gen: grouped(branching, parents, gen),
        }

        def step(forward, seed):
            out = forward(torch.Generator(device=device).manual_seed(seed))
            out.float().square().mean().backward()
            for tensor in (parents, branching.logits, *nodes.parameters()):
                tensor.grad = None

        walls, cpus = {variant: [] for variant in variants}, {variant: [] for variant in variants}
        for round_ in range(args.warmup + args.repeat):
            for variant, forward in variants.items():
                wall, cpu = timed(lambda: step(forward, round_), device)
                if round_ >= args.warmup:
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
        wall_median = {variant: statistics.median(values) for variant, values in walls.items()}
        cpu_median = {variant: statistics.median(values) for variant, values in cpus.items()}
        for variant in variants:
            rows.append(
                {
                    "case": name,
                    "variant": variant,
                    "median_ms": round(wall_median[variant] * 1e3, 3),
                    "min_ms": round(min(walls[variant]) * 1e3, 3),
                    "cpu_median_ms": round(cpu_median[variant] * 1e3, 3),
                    "speedup_vs_per_child": round(wall_median["per_child"] / wall_median[variant], 3),
                    "cpu_speedup_vs_per_child": round(cpu_median["per_child"] / cpu_median[variant], 3),
                }
            )
        print(
            f"{name}: "
            + ", ".join(
                f"{v} {wall_median[v] * 1e3:.1f} ms wall ({wall_median['per_child'] / wall_median[v]:.2f}x), "
                f"{cpu_median[v] * 1e3:.1f} ms cpu ({cpu_median['per_child'] / cpu_median[v]:.2f}x)"
                for v in variants
            ),
            flush=True,
        )
    meta = {
        **environment(device),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "mode": f"{args.mode}, forward + backward, fp32",
        "cases": {
            name: dict(zip(("parents", "children", "batch", "channels_in", "size"), CASES[name][:5])) for name in wanted
        },
    }
    if args.out is not None:
        stem = f"grouped_block_{device.type}_{args.mode}"
        for path in write_results(rows, meta, args.out, stem):
            print("wrote", path)


if __name__ == "__main__":
    main()
