"""Budget sweep: searches of synthetic-c under a few parameter budgets, each derived tree retrained from scratch beside
the all-shared tree and the independent baseline; the validation loss against the parameters, as a CSV and a plot.

    python benchmarks/budget_sweep.py --out runs/budget_sweep

(about 10 minutes on 2 CPU cores with the defaults; ``--budgets``, ``--samples`` and the epoch options shrink it.)
Writes ``benchmarks/results/budget_sweep_<machine>.csv`` and ``.png`` (``--results`` to change the folder).
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import time
from pathlib import Path

import torch

from l2b_fast import config as configs
from l2b_fast import pipeline
from l2b_fast.tree import Tree

COLUMNS = ("model", "budget", "parameters", "flops", "expected_parameters", "met", "val_loss", "seconds")


def machine_tag() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1]
                break
    except OSError:
        pass
    cores = torch.get_num_threads()
    return f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:40]}_{cores}cores"


def sweep_config(args, budget: int | None) -> dict:
    overrides = [
        f"data.samples={args.samples}",
        f"search.epochs={args.search_epochs}",
        f"search.warmup_epochs={args.warmup_epochs}",
        f"retrain.epochs={args.retrain_epochs}",
    ]
    if budget is not None:
        overrides += [f"search.budget_parameters={budget}", f"search.budget_weight={args.weight}"]
    return configs.load_config(preset="synthetic-c", overrides=overrides)


def validation_loss(final: dict) -> float:
    return float(final["val_loss"])


def run(args) -> list[dict]:
    rows = []
    for index, budget in enumerate([None, *args.budgets]):
        name = "unbudgeted" if budget is None else f"budget_{budget}"
        config = sweep_config(args, budget)
        started = time.perf_counter()
        found = pipeline.search(config, args.out / name, seed=args.seed, progress=False)
        tree = Tree.load(args.out / name / "tree.json")
        retrained = pipeline.retrain(
            config, tree, args.out / name / "retrain", seed=args.seed, progress=False, baselines=index == 0
        )
        seconds = round(time.perf_counter() - started, 1)
        budget_entry = found.get("budget", {}).get("parameters", {})
        for model, result in retrained["models"].items():
            learned = model == "learned_tree"
            rows.append(
                {
                    "model": name if learned else model,
                    "budget": budget if learned else "",
                    "parameters": result["parameters"],
                    "flops": found["tree_flops"] if learned else "",
                    "expected_parameters": budget_entry.get("expected", "") if learned else "",
                    "met": budget_entry.get("met", "") if learned else "",
                    "val_loss": round(validation_loss(result["final"]), 4),
                    "seconds": seconds if learned else result["seconds"],
                }
            )
            print(", ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        baseline = row["model"] in ("all_shared", "independent")
        axes.scatter(row["parameters"], row["val_loss"], marker="s" if baseline else "o", s=50)
        axes.annotate(row["model"], (row["parameters"], row["val_loss"]), textcoords="offset points", xytext=(5, 4))
    axes.set_xscale("log")
    axes.set_xlabel("parameters of the retrained tree")
    axes.set_ylabel("validation loss (sum over the 15 tasks, z-scored targets)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/budget_sweep"), help="run folders")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results", help="CSV and plot folder")
    parser.add_argument("--budgets", type=int, nargs="+", default=[54000, 58000], help="parameter budgets")
    parser.add_argument("--weight", type=float, default=5.0, help="search.budget_weight")
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"budget_sweep_{machine_tag()}"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    title = (
        f"synthetic-c, {args.samples} samples, search {args.search_epochs} epochs, retrain {args.retrain_epochs}, "
        f"budget weight {args.weight:g}, seed {args.seed}"
    )
    plot(rows, stem.with_suffix(".png"), title)
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
