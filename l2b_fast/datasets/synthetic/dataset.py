"""The synthetic experiment's tasks as a multi-task data set: one regression per task, mean squared error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from l2b_fast.datasets.base import Column, MetricAccumulator, MultiTaskDataset, TaskSpec


@dataclasses.dataclass(frozen=True)
class SyntheticTasks(MultiTaskDataset):
    """Tasks ``<group>-<index>`` of :mod:`l2b_fast.datasets.synthetic.tasks` with ``output_dim`` outputs each; the
    loss and the metric are the mean squared error on z-scored targets (predicting the mean scores 1)."""

    task_names: tuple[str, ...]
    output_dim: int = 100
    name = "synthetic"
    columns = (Column("mse", "mean MSE", higher_is_better=False, number_format=".4f"),)
    paper_rows = ()

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return tuple(TaskSpec(task, self.output_dim, "mse", ("mse",)) for task in self.task_names)

    def task_targets(self, targets, masks=None):
        return dict(targets), masks

    def loss(self, task, pred, target, mask=None) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def metrics(self) -> SyntheticMetrics:
        return SyntheticMetrics(self)


class SyntheticMetrics(MetricAccumulator):
    """Squared errors summed per task (float64) and the samples; ``compute`` gives each task's MSE."""

    def __init__(self, dataset: SyntheticTasks):
        self.dataset = dataset
        super().__init__({task: () for task in dataset.task_names}, {})

    def update(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], masks=None) -> None:
        for task in self.dataset.task_names:
            error = (outputs[task].detach().to(torch.float64) - targets[task].to(torch.float64)).square()
            self._add(task, error.mean(dim=tuple(range(1, error.dim()))).sum())
        first = next(iter(outputs.values()))
        self._add("samples", torch.tensor(first.shape[0], device=first.device))

    def compute(self) -> dict[str, dict[str, float]]:
        samples = max(self.samples, 1)
        return {
            task: {"mse": float(self.sums[task]) / samples if self.samples else float("nan")}
            for task in self.dataset.task_names
        }

    def summary(self) -> dict[str, float]:
        values = [entry["mse"] for entry in self.compute().values()]
        return {"mse": sum(values) / len(values)}

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "tasks": list(self.dataset.task_names)}
