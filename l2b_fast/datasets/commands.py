"""The ``l2b data`` commands a recipe offers: a converter of a raw release and a synthetic generator."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from l2b_fast.datasets.recipe import DataCommand


def conversion_command(
    name: str, dataset: str, description: str, convert: Callable[..., dict], add_options: Callable | None = None
) -> DataCommand:
    """``l2b data NAME --root RAW --out DIR``: ``convert(root, out, samples_per_shard=, seed=, resume=, **options)``;
    ``add_options(parser)`` adds the converter's own options and returns the names of the ``args`` it passes on."""
    options: list[str] = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", type=Path, required=True, help=f"raw {dataset} directory")
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--samples-per-shard", type=int, default=1000)
        parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion in OUT")
        if add_options is not None:
            options[:] = add_options(parser)

    def run(args: argparse.Namespace) -> dict:
        extra = {option: getattr(args, option) for option in options}
        return convert(
            args.root, args.out, samples_per_shard=args.samples_per_shard, seed=args.seed, resume=args.resume, **extra
        )

    return DataCommand(name, f"raw {dataset} -> shards", description, add_arguments, run)


def generator_command(name: str, what: str, generate: Callable[..., dict], default_size: int) -> DataCommand:
    """``l2b data NAME --out DIR --n N``: ``generate(out, n, size, seed=, samples_per_shard=, overwrite=,
    label_fraction=)``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--n", type=int, required=True, help="number of samples over all splits")
        parser.add_argument("--size", type=int, default=default_size, help=f"image side (default {default_size})")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--samples-per-shard", type=int, default=1000)
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the shard set already in OUT (its shards, manifest and logs are deleted first; "
            "other files make it refuse)",
        )
        parser.add_argument(
            "--label-fraction",
            type=float,
            default=1.0,
            metavar="F",
            help="each example keeps each task's label with probability F, 0 < F <= 1, at least one task per "
            "example (seeded by --seed; default 1: every label)",
        )

    def run(args: argparse.Namespace) -> dict:
        if args.n < 1:
            raise ValueError("--n must be >= 1")
        if not 0.0 < args.label_fraction <= 1.0:  # also refuses NaN
            raise ValueError(f"--label-fraction must lie in (0, 1], got {args.label_fraction}")
        return generate(
            args.out,
            args.n,
            args.size,
            seed=args.seed,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
            label_fraction=args.label_fraction,
        )

    return DataCommand(
        name, f"generate {what}", f"Generate {what} as train/val/test shards with a manifest.", add_arguments, run
    )
