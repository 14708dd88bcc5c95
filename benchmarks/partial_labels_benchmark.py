"""How partial labels move a CelebA-VGG search: synthetic CelebA shards at several label fractions, each searched,
retrained and evaluated at a tiny width on the CPU through the ``l2b`` command line.

For every fraction F (and seed) it runs, in a work folder:

    l2b data synthetic-celeba --out DATA --n N --size IMAGE --seed SEED --label-fraction F
    l2b search --preset celeba-vgg --data DATA --out RUN --seed SEED --threads 1 --quiet --set ... (tiny settings)
    l2b retrain --tree RUN/tree.json --data DATA --seed SEED --threads 1 --quiet --set ...
    l2b eval RUN --data DATA

and records the labels kept, the search's last validation mean accuracy (over labelled validation examples), the
derived tree (widths, parameters, and how far it moved from the tree searched with every label: the share of
attribute pairs that split off at the same layer), the test mean accuracy after the retrain and the labelled test
examples (eval.json). Writes ``partial_labels_<cpu>.{csv,json}`` tagged with device and versions.

    python benchmarks/partial_labels_benchmark.py --out benchmarks/results --work /tmp/partial-labels
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from l2b_fast.bench.report import environment, write_results

SEARCH_SETTINGS = (
    "model.width=0.125",
    "search.size=32",
    "search.batch_size=32",
    "search.epochs=8",
    "search.warmup_epochs=2",
    "search.lr_weights=1e-3",  # the preset's 1e-4 barely moves a tiny net in 8 epochs of 480 faces
    "data.num_workers=0",
    "data.eval_batch_size=64",
)
RETRAIN_SETTINGS = (
    "retrain.size=32",
    "retrain.batch_size=32",
    "retrain.epochs=8",
    "retrain.lr_weights=1e-3",
    "retrain.baselines=false",
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def l2b(*arguments: str) -> list[str]:
    command = [sys.executable, "-m", "l2b_fast.cli", *arguments]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return ["l2b", *arguments]


def split_layers(tree: dict) -> dict[tuple[int, int], int]:
    """``{(task i, task j): the first layer at which their paths differ}`` of a tree.json (the depth if never)."""
    layers = tree["layers"]
    tasks = len(tree["tasks"])
    # the last layer has one node per task; walk each task's ancestors back up to the first layer
    paths = []
    for task in range(tasks):
        node, path = task, [task]
        for layer in reversed(layers[1:]):
            node = layer["parents"][node]
            path.append(node)
        paths.append(path[::-1])
    depth = len(layers)
    return {
        (i, j): next((layer for layer in range(depth) if paths[i][layer] != paths[j][layer]), depth)
        for i, j in itertools.combinations(range(tasks), 2)
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, required=True, help="folder for the shards and runs (made if missing)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=600, help="synthetic faces over train/val/test (80/10/10)")
    parser.add_argument("--image-size", type=int, default=48)
    args = parser.parse_args(argv)
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1.0 (the reference tree)")

    rows, commands = [], []
    for seed in args.seeds:
        reference = None
        for fraction in sorted(args.fractions, reverse=True):  # 1.0 first: the tree the others are compared with
            name = f"f{fraction:g}-seed{seed}"
            data, run = args.work / f"data-{name}", args.work / f"run-{name}"
            started = time.perf_counter()
            steps = [
                l2b(
                    *("data", "synthetic-celeba", "--out", str(data), "--n", str(args.n)),
                    *("--size", str(args.image_size), "--seed", str(seed), "--label-fraction", str(fraction)),
                    "--overwrite",
                ),
                l2b(
                    *("search", "--preset", "celeba-vgg", "--data", str(data), "--out", str(run)),
                    *("--seed", str(seed), "--threads", "1", "--quiet", "--overwrite"),
                    *(part for setting in SEARCH_SETTINGS for part in ("--set", setting)),
                ),
                l2b(
                    *("retrain", "--tree", str(run / "tree.json"), "--data", str(data)),
                    *("--seed", str(seed), "--threads", "1", "--quiet", "--overwrite"),
                    *(part for setting in RETRAIN_SETTINGS for part in ("--set", setting)),
                ),
                l2b("eval", str(run), "--data", str(data), "--threads", "1"),
            ]
            seconds = time.perf_counter() - started
            commands += [" ".join(step) for step in steps]
            manifest = json.loads((data / "manifest.json").read_text())
            train = manifest["splits"]["train"]
            with (run / "epochs.csv").open() as handle:
                last_epoch = list(csv.DictReader(handle))[-1]
            tree = json.loads((run / "tree.json").read_text())
            summary = json.loads((run / "summary.json").read_text())
            evaluation = json.loads((run / "eval.json").read_text())
            splits = split_layers(tree)
            reference = splits if fraction == 1.0 else reference
            same = sum(splits[pair] == reference[pair] for pair in splits) / len(splits)
            rows.append(
                {
                    "label_fraction": fraction,
                    "seed": seed,
                    "train_samples": train["total"],
                    "train_labels_kept": round(sum(train["labels"].values()) / (train["total"] * 40), 4),
                    "search_val_mean_accuracy": round(float(last_epoch["val.mean_accuracy"]), 2),
                    "tree_widths": "-".join(str(len(layer["parents"])) for layer in tree["layers"]),
                    "tree_parameters": summary["tree_parameters"],
                    "pairs_split_as_full_labels": round(same, 4),
                    "test_mean_accuracy": round(evaluation["summary"]["mean_accuracy"], 2),
                    "test_samples": evaluation["samples"],
                    "test_labelled_mean": round(sum(evaluation["labelled"].values()) / 40, 1),
                    "seconds": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    meta = {
        **environment(torch.device("cpu")),
        "n": args.n,
        "image_size": args.image_size,
        "search_settings": list(SEARCH_SETTINGS),
        "retrain_settings": list(RETRAIN_SETTINGS),
        "commands": commands,
    }
    paths = write_results(rows, meta, args.out, f"partial_labels_{slug(meta['device'])}", ("device", "torch"))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
