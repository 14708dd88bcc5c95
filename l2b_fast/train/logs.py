"""A run's CSV logs (and TensorBoard scalars when TensorBoard is installed), cut back to a checkpoint on resume."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def probability_row(probabilities: Sequence[torch.Tensor]) -> dict[str, float]:
    """Every branching probability as ``p.b<block>.i<parent>.j<child>``: one ``[I, J]`` matrix per block."""
    row = {}
    for b, matrix in enumerate(probabilities):
        rows, cols = matrix.shape
        row.update({f"p.b{b}.i{i}.j{j}": matrix[i, j].item() for j in range(cols) for i in range(rows)})
    return row


class RunLogs:
    """CSV files in ``out_dir`` with fixed columns, e.g. ``{"log.csv": [...], "epochs.csv": [...]}``.

    Every row has a ``step`` column. ``open(resume_step)`` rewrites each file keeping only the rows with
    ``step <= resume_step`` (rows a killed run wrote after its last checkpoint are written again by the
    resumed run), or starts the files empty (``resume_step=None``). TensorBoard's event files are purged past
    the same step.
    """

    def __init__(self, out_dir: str | Path, columns: Mapping[str, Sequence[str]]):
        self.out_dir = Path(out_dir)
        self.columns = {name: list(names) for name, names in columns.items()}
        for name, names in self.columns.items():
            if "step" not in names:
                raise ValueError(f"{name}: a log needs a 'step' column")
        self._tensorboard = None

    def open(self, resume_step: int | None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, columns in self.columns.items():
            path = self.out_dir / name
            kept = []
            if resume_step is not None and path.exists():
                with path.open(newline="") as handle:
                    kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self._tensorboard = None
        else:
            self._tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step)

    def append(self, name: str, row: Mapping) -> None:
        with (self.out_dir / name).open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns[name]).writerow(row)
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(f"{name.removesuffix('.csv')}/{key}", value, row["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class Progress:
    """tqdm when installed and stderr is a terminal; otherwise a line every ~10% of the run."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.next_report = start
        self.started = time.time()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss, tau: float | None) -> None:
        """``loss``: a number, or a function giving it (called only when a line is shown: it may synchronise)."""
        if not self.enabled:
            return
        due = step >= self.next_report or step == self.total
        if self.bar is not None:
            self.bar.update(1)
            if not due:
                return
        elif not due:
            return
        value = loss() if callable(loss) else loss
        shown = {"loss": f"{value:.4g}"} | ({} if tau is None else {"tau": f"{tau:.3g}"})
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.next_report = step + max(1, self.total // 100)
        else:
            values = "  ".join(f"{name} {value}" for name, value in shown.items())
            print(f"step {step}/{self.total}  {values}  {time.time() - self.started:.0f}s", file=sys.stderr, flush=True)
            self.next_report = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
