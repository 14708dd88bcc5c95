"""Plot the CSV files written by ``python -m l2b_fast.bench --out DIR``: fwd+bwd time per implementation and,
where the CSV has it, the step's peak memory (a second row of panels).

    python benchmarks/plot_branch_benchmark.py benchmarks/results/*.csv --out benchmarks/results/branch.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path, help="result CSV files")
    parser.add_argument("--out", type=Path, required=True, help="output image (.png or .svg)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = defaultdict(list)
    for path in args.csv:
        with path.open() as handle:
            for row in csv.DictReader(handle):
                panels[
                    f"{row['device']}\n{row['shape']} I={row['parents']} J={row['children']} {row['activation']} "
                    f"{row['dtype']}"
                ].append(row)
    if not panels:
        parser.error("no rows in the given CSV files")
    with_memory = any(row.get("step_peak_MiB") for rows in panels.values() for row in rows)  # older CSVs lack it
    figure, axes = plt.subplots(
        2 if with_memory else 1, len(panels), figsize=(4.5 * len(panels), 7.2 if with_memory else 3.8), squeeze=False
    )
    for axis, (title, rows) in zip(axes[0], panels.items()):
        names = [row["implementation"] for row in rows]
        times = [float(row["fwd_bwd_ms"]) for row in rows]
        bars = axis.bar(names, times, color=["#999999" if n == "naive" else "#3070b0" for n in names])
        for bar, row in zip(bars, rows):
            label = f"{float(row['speedup_vs_naive']):.1f}x" if row["speedup_vs_naive"] else ""
            axis.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        axis.set_yscale("log")
        axis.set_ylabel("forward + backward (ms, log)")
        axis.set_title(title, fontsize=8)
    for axis, rows in zip(axes[1] if with_memory else [], panels.values()):
        if not any(row.get("step_peak_MiB") for row in rows):
            axis.text(0.5, 0.5, "memory not recorded in this CSV", ha="center", va="center", transform=axis.transAxes)
            axis.set_axis_off()
            continue
        names = [row["implementation"] for row in rows]
        peaks = [float(row["step_peak_MiB"]) if row.get("step_peak_MiB") else 0.0 for row in rows]
        bars = axis.bar(names, peaks, color=["#999999" if n == "naive" else "#30a070" for n in names])
        for bar, peak in zip(bars, peaks):
            axis.annotate(
                f"{peak:g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        axis.set_ylabel("peak memory of a step (MiB)")
        inputs = rows[0].get("inputs_MiB")
        axis.set_title(
            f"above the resident inputs ({inputs} MiB)" if inputs else "above the resident inputs", fontsize=8
        )
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
