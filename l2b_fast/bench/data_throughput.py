"""python -m l2b_fast.bench.data_throughput: how fast the Taskonomy training loader runs, and where time goes.

Two measurements on the same shards, in one run:

- **stage profile** (one process, one core): per sample, the time to read it from the tars (bytes only),
  decode its six PNGs, resize to the working size, augment (random scale, flip, crop), normalise (targets and
  masks) and collate it into a batch;
- **loader throughput**: :func:`l2b_fast.datasets.taskonomy.loaders.taskonomy_train_loader` end to end (the real
  pipeline: resampled shards, shuffle buffer, workers, batches) with 0 workers (all in this process), 1 worker, and
  one worker per core; with targets normalised in the workers, and with raw batches (``normalize=False``)
  whose normalisation ``protocol.to_targets_batch`` does on the GPU (not timed: a CPU-only run has no GPU).

At 128 (the search resolution) and 256 (retraining), from shards stored at 256 (what ``l2b data taskonomy``
writes by default). Without ``--shards`` it first writes synthetic Taskonomy shards (the library's own
generator, real encodings) into a temporary directory. Results go to CSV + JSON tagged with the CPU, core
count, versions and PNG decoder. ``--gpu-samples-per-s`` turns the per-core rate into the number of cores
that feed one GPU running the search step at that rate.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from l2b_fast.bench import report

STAGES = ("read", "decode", "resize", "augment", "normalise", "collate")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def package_versions() -> dict:
    versions = {"numpy": np.__version__}
    for module in ("PIL", "webdataset", "pyspng"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            versions[module] = None
    return versions


def read_samples(urls: list[str]) -> tuple[list[dict], float]:
    """Every sample of ``urls`` as raw bytes, and the seconds it took (the "read" stage)."""
    import webdataset as wds

    start = time.perf_counter()
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    return samples, time.perf_counter() - start


def profile_stages(
    samples: list[dict], read_seconds: float, size: int, batch_size: int, seed: int = 0
) -> dict[str, float]:
    """Milliseconds per sample of each stage of the training transform, run the way the loader runs it."""
    from l2b_fast.data import loader as data_loader
    from l2b_fast.datasets.taskonomy import protocol as transforms

    protocol = transforms.TaskonomyProtocol()
    rng = np.random.default_rng(seed)
    seconds = dict.fromkeys(STAGES, 0.0)
    seconds["read"] = read_seconds
    batch: list[tuple] = []
    clock = time.perf_counter
    for sample in samples:
        t0 = clock()
        raw = {member: transforms.decode_png(sample[f"{member}.png"], name=member) for member in protocol.members}
        t1 = clock()
        raw = transforms.resize_raw(raw, size, protocol.rgb_resize)
        t2 = clock()
        raw = transforms.augment(raw, rng, scale=protocol.train_scale, crop=size, flip=protocol.train_flip)
        t3 = clock()
        batch.append(protocol.to_targets(raw))
        t4 = clock()
        seconds["decode"] += t1 - t0
        seconds["resize"] += t2 - t1
        seconds["augment"] += t3 - t2
        seconds["normalise"] += t4 - t3
        if len(batch) == batch_size:
            t5 = clock()
            data_loader._collate(batch)
            seconds["collate"] += clock() - t5
            batch = []
    collated = len(samples) - len(batch)
    per_sample = {stage: 1e3 * value / len(samples) for stage, value in seconds.items()}
    per_sample["collate"] = 1e3 * seconds["collate"] / max(1, collated)
    return per_sample


def loader_throughput(
    urls: list[str], size: int, batch_size: int, workers: int, batches: int, normalize: bool, seed: int = 0
) -> dict:
    """Samples per second of the training loader over ``batches`` batches after a warm-up (workers started).

    ``normalize=False``: the loader delivers raw batches, normalised later on the GPU (not timed here)."""
    from l2b_fast.datasets.taskonomy import loaders as data_loader

    warmup = max(2, 2 * workers)
    epoch_samples = batch_size * (warmup + batches) * max(1, workers)  # every worker yields >= warmup + batches
    loader = data_loader.taskonomy_train_loader(
        urls,
        batch_size=batch_size,
        size=size,
        seed=seed,
        epoch_samples=epoch_samples,
        num_workers=workers,
        shuffle_buffer=4 * batch_size,
        normalize=normalize,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    skipped = loader.skips.count
    del iterator, loader  # stops the persistent workers before the next measurement
    rate = batches * batch_size / elapsed
    return {"samples_per_s": rate, "samples_per_s_per_process": rate / max(1, workers), "skipped": skipped}


def parse_args(argv=None) -> argparse.Namespace:
    cores = usable_cores()
    parser = argparse.ArgumentParser(
        prog="python -m l2b_fast.bench.data_throughput", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="a shard directory with a manifest (default: synthetic Taskonomy shards written to a temporary directory)",
    )
    parser.add_argument("--split", default="train", help="split of --shards to read (default train)")
    parser.add_argument(
        "--samples", type=int, default=384, help="synthetic samples to generate without --shards (default 384)"
    )
    parser.add_argument(
        "--stored-size",
        type=int,
        default=256,
        help="side of the generated synthetic shards (default 256, as the converter stores)",
    )
    parser.add_argument("--sizes", default="128,256", help="working sizes (default 128,256: search and retrain)")
    parser.add_argument(
        "--workers",
        default=None,
        help=f"comma-separated DataLoader worker counts (default 0,1,{cores}: in-process, one worker, one per core)",
    )
    parser.add_argument(
        "--normalise-in",
        default="worker,device",
        help=(
            "where targets are normalised: worker (the loader yields targets) and/or device (the loader yields "
            "raw batches for protocol.to_targets_batch on the GPU; that step is not timed); default both"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help=(
            "timed batches per loader run (default: about two passes' worth of the profiled samples per "
            "process, at least 8)"
        ),
    )
    parser.add_argument(
        "--gpu-samples-per-s",
        type=float,
        default=None,
        help="search-step throughput of one GPU (samples/s) to convert into cores per GPU",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for CSV/JSON results (default: print only)")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.workers = [int(count) for count in (args.workers or f"0,1,{cores}").split(",")]
    args.normalise_in = args.normalise_in.split(",")
    if not set(args.normalise_in) <= {"worker", "device"}:
        parser.error("--normalise-in takes worker, device or both")
    if args.batch_size < 1 or args.samples < args.batch_size or min(args.sizes) < 8 or min(args.workers) < 0:
        parser.error("need --batch-size >= 1, --samples >= --batch-size, sizes >= 8 and workers >= 0")
    if args.gpu_samples_per_s is not None and args.gpu_samples_per_s <= 0:
        parser.error("--gpu-samples-per-s must be > 0")
    return args


def format_rows(rows: list[dict], columns: list[str]) -> str:
    table = [columns] + [
        ["" if row.get(c) is None else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])) for c in columns]
        for row in rows
    ]
    widths = [max(len(line[k]) for line in table) for k in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from l2b_fast.data import shards as shard_io

    torch.set_num_threads(1)  # the in-process case is one core, like a worker (DataLoader sets 1 in workers)
    meta = report.environment(torch.device("cpu"))
    meta.update(
        cores=usable_cores(),
        png_decoder=shard_io.png_decoder(),
        packages=package_versions(),
        pin_memory=torch.cuda.is_available(),
    )
    with tempfile.TemporaryDirectory(prefix="l2b-data-bench-") as scratch:
        if args.shards is None:
            from l2b_fast.datasets.taskonomy import synthetic as synthetic_taskonomy

            shard_dir, start = Path(scratch), time.perf_counter()
            synthetic_taskonomy.generate(
                shard_dir,
                args.samples,
                args.stored_size,
                splits=(("train", 1.0),),
                samples_per_shard=max(args.batch_size, args.samples // 8),
            )
            print(
                f"wrote {args.samples} synthetic {args.stored_size}x{args.stored_size} samples in "
                f"{time.perf_counter() - start:.1f} s",
                file=sys.stderr,
            )
            meta["data"] = f"synthetic taskonomy {args.stored_size}x{args.stored_size}, {args.samples} samples"
        else:
            shard_dir = args.shards
            meta["data"] = str(args.shards)
        urls = shard_io.shard_paths(shard_dir, args.split)
        meta["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        samples, read_seconds = read_samples(urls)
        meta["mean_sample_bytes"] = round(
            statistics.fmean(sum(len(v) for k, v in s.items() if k.endswith(".png")) for s in samples)
        )
        meta["shards"], meta["profiled_samples"] = len(urls), len(samples)
        print(
            f"{meta['device']} | {meta['cores']} cores | torch {meta['torch']} | PNG decoder "
            f"{meta['png_decoder']} | {len(samples)} samples in {len(urls)} shards, "
            f"{meta['mean_sample_bytes'] / 1e3:.0f} kB each"
        )
        batches = args.batches or max(8, math.ceil(2 * len(samples) / args.batch_size))
        stage_rows, loader_rows = [], []
        for size in args.sizes:
            per_sample = profile_stages(samples, read_seconds, size, args.batch_size)
            total = sum(per_sample.values())
            for stage in STAGES:
                stage_rows.append(
                    {
                        "size": size,
                        "stage": stage,
                        "ms_per_sample": round(per_sample[stage], 4),
                        "share_pct": round(100 * per_sample[stage] / total, 1),
                    }
                )
            stage_rows.append(
                {
                    "size": size,
                    "stage": "total",
                    "ms_per_sample": round(total, 4),
                    "share_pct": 100.0,
                    "samples_per_s": round(1e3 / total, 1),
                }
            )
            for normalise_in in args.normalise_in:
                for workers in args.workers:
                    measured = loader_throughput(
                        urls, size, args.batch_size, workers, batches, normalize=normalise_in == "worker"
                    )
                    row = {
                        "size": size,
                        "normalise_in": normalise_in,
                        "workers": workers,
                        "batch_size": args.batch_size,
                        "batches": batches,
                    }
                    row.update({k: round(v, 1) if isinstance(v, float) else v for k, v in measured.items()})
                    loader_rows.append(row)
                    print(
                        f"  size {size}, normalise in {normalise_in}, {workers} worker(s): "
                        f"{measured['samples_per_s']:.1f} samples/s",
                        file=sys.stderr,
                    )
        print("\nstage profile (one process, ms per sample):")
        print(format_rows(stage_rows, ["size", "stage", "ms_per_sample", "share_pct", "samples_per_s"]))
        print("\ntraining loader end to end:")
        print(
            format_rows(
                loader_rows,
                [
                    "size",
                    "normalise_in",
                    "workers",
                    "batch_size",
                    "samples_per_s",
                    "samples_per_s_per_process",
                    "skipped",
                ],
            )
        )
        estimate_rows = []
        if args.gpu_samples_per_s is not None:
            for size in args.sizes:
                for normalise_in in args.normalise_in:
                    # One core = one worker process (IPC included) when measured, else the in-process loader.
                    rates = {
                        row["workers"]: row["samples_per_s_per_process"]
                        for row in loader_rows
                        if row["size"] == size and row["normalise_in"] == normalise_in and row["workers"] <= 1
                    }
                    per_core = (
                        rates.get(1)
                        or rates.get(0)
                        or [row for row in stage_rows if row["size"] == size and row["stage"] == "total"][0][
                            "samples_per_s"
                        ]
                    )
                    estimate_rows.append(
                        {
                            "size": size,
                            "normalise_in": normalise_in,
                            "gpu_samples_per_s": args.gpu_samples_per_s,
                            "samples_per_s_per_core": per_core,
                            "cores_per_gpu": math.ceil(args.gpu_samples_per_s / per_core),
                        }
                    )
            print("\ncores to feed one GPU:")
            print(
                format_rows(
                    estimate_rows,
                    ["size", "normalise_in", "gpu_samples_per_s", "samples_per_s_per_core", "cores_per_gpu"],
                )
            )
    if args.out is not None:
        stem = f"data_taskonomy_{re.sub(r'[^A-Za-z0-9]+', '-', meta['device']).strip('-').lower()}_{meta['cores']}cores"
        rows = (
            [{"kind": "stage", **row} for row in stage_rows]
            + [{"kind": "loader", **row} for row in loader_rows]
            + [{"kind": "estimate", **row} for row in estimate_rows]
        )
        csv_path, json_path = report.write_results(
            rows, meta, args.out, stem, tags=("device", "cores", "torch", "png_decoder")
        )
        print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
