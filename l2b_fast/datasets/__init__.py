"""Multi-task data sets as objects: tasks, losses, metrics and the paper's results (:class:`MultiTaskDataset`).

    from l2b_fast import datasets
    dataset = datasets.get("taskonomy")            # or "celeba"; options as keywords
    targets, masks = dataset.task_targets(batch_targets, batch_masks)
    losses = dataset.losses(outputs, targets, masks)          # {task: scalar}
    metrics = dataset.metrics(); metrics.update(outputs, targets, masks); metrics.compute()
"""

from __future__ import annotations

from .base import Column, MetricAccumulator, MultiTaskDataset, PaperRow, TaskSpec, format_table
from .celeba import CelebA
from .taskonomy import Taskonomy

__all__ = ["MultiTaskDataset", "MetricAccumulator", "TaskSpec", "Column", "PaperRow", "Taskonomy", "CelebA", "get", "names", "format_table"]

_DATASETS: dict[str, type[MultiTaskDataset]] = {"taskonomy": Taskonomy, "celeba": CelebA}


def names() -> list[str]:
    """Names of the known data sets (the ``dataset`` field of their shard manifests)."""
    return sorted(_DATASETS)


def get(name: str, **options) -> MultiTaskDataset:
    """The data set called ``name`` with ``options`` (its dataclass fields); ValueError for an unknown name."""
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(names())}")
    try:
        return _DATASETS[name](**options)
    except TypeError as error:  # an unknown option: name the valid ones
        fields = ", ".join(field for field in _DATASETS[name].__dataclass_fields__)
        raise ValueError(f"{name}: {error}; options: {fields}") from error
