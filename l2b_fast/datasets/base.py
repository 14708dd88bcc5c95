"""The interface every multi-task data set implements: its tasks, losses, metrics and the paper's rows.

A search, retrain or evaluation pipeline takes a :class:`MultiTaskDataset` and never needs to know which data
set it is: ``dataset.out_channels`` sizes the task heads, ``dataset.task_targets`` turns a loader batch into
per-task targets, ``dataset.losses`` gives one scalar per task (weighted by the trainer, paper Eq. 1),
``dataset.metrics()`` accumulates the paper's test metrics over batches, and ``dataset.columns`` /
``dataset.paper_rows`` lay out the paper's table beside our numbers.

Metrics are sums and counts (float64 / int64 tensors of fixed shapes, created up front), never running means,
so that batches of any size, several ranks' partial results (:meth:`MetricAccumulator.all_reduce`) and a single
pass over everything give the same value.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping

import torch

__all__ = [
    "TaskSpec",
    "Column",
    "PaperRow",
    "MetricAccumulator",
    "MultiTaskDataset",
    "check_prediction",
    "format_table",
]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: its name (the key of model outputs and targets), the channels of its prediction, its training
    loss and the metrics :meth:`MultiTaskDataset.metrics` reports for it (first: the paper's)."""

    name: str
    out_channels: int
    loss: str
    metrics: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of the paper's results table: ``label`` as printed, our value from ``summary()[name]``, values
    printed with ``number_format`` (the paper's precision)."""

    name: str
    label: str
    higher_is_better: bool
    number_format: str = ".3f"


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """A row of a results table in the paper: ``values`` keyed by :attr:`Column.name`, parameters in millions."""

    method: str
    parameters_millions: float | None
    values: Mapping[str, float]
    source: str


def ordered_subset(chosen, known: tuple[str, ...], error: str) -> tuple[str, ...]:
    """``chosen`` (one name or several, distinct, non-empty, all in ``known``) in ``known``'s order;
    otherwise ``ValueError(f"{error}; got [...]")``."""
    names = (chosen,) if isinstance(chosen, str) else tuple(chosen)
    if not names or len(set(names)) != len(names) or any(name not in known for name in names):
        raise ValueError(f"{error}; got {list(names)}")
    return tuple(name for name in known if name in names)


def check_prediction(task: str, pred: torch.Tensor, channels: int, spatial: tuple[int, ...] | None) -> None:
    """ValueError unless ``pred`` is a floating tensor [B, channels, *spatial] (``spatial`` None: [B, channels])."""
    if not isinstance(pred, torch.Tensor) or not pred.is_floating_point():
        raise TypeError(
            f"{task}: the prediction must be a floating-point tensor, got "
            f"{type(pred).__name__}{'' if not isinstance(pred, torch.Tensor) else ' ' + str(pred.dtype)}"
        )
    expected = ("B", channels, *(spatial or ()))
    if (
        pred.dim() != len(expected)
        or pred.shape[1] != channels
        or (spatial is not None and tuple(pred.shape[2:]) != tuple(spatial))
    ):
        raise ValueError(
            f"{task}: prediction of shape {tuple(pred.shape)}, expected [{', '.join(map(str, expected))}] "
            "(upsample the head's output to the target's size)"
        )


class MetricAccumulator(abc.ABC):
    """Sums (float64) and counts (int64) of a data set's metrics over batches; :meth:`compute` gives the values.

    ``sums`` and ``counts`` hold tensors whose shapes are fixed at construction, so every rank holds the same
    state even if it saw no batch, and :meth:`all_reduce` sums them over the ranks with two collectives: as
    long as each sample was evaluated on exactly one rank, the reduced state equals one pass over all samples.
    ``samples`` counts the samples passed to :meth:`update` (report it, and compare it with the data set's
    sample count, :func:`l2b_fast.data.loader.sample_count_report`).
    """

    def __init__(self, sums: Mapping[str, tuple[int, ...]], counts: Mapping[str, tuple[int, ...]]):
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in sums.items()}
        self.counts = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in {**counts, "samples": ()}.items()}

    @property
    def samples(self) -> int:
        """Samples accumulated so far (over all ranks after :meth:`all_reduce`)."""
        return int(self.counts["samples"])

    def to(self, device) -> MetricAccumulator:
        """Moves the state (e.g. to the model's device, so updates cause no transfer); returns self."""
        self.sums = {name: value.to(device) for name, value in self.sums.items()}
        self.counts = {name: value.to(device) for name, value in self.counts.items()}
        return self

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Adds a batch's contribution to ``sums[name]`` or ``counts[name]`` (moving the state on first use)."""
        state = self.sums if name in self.sums else self.counts
        if state[name].device != value.device:
            self.to(value.device)
            state = self.sums if name in self.sums else self.counts
        state[name] += value.to(state[name].dtype)

    @abc.abstractmethod
    def update(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Adds one batch: model ``outputs`` and the data set's per-task ``targets`` / ``masks``."""

    @abc.abstractmethod
    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` over everything accumulated (NaN where nothing counted)."""

    def labelled(self) -> dict[str, int]:
        """``{task: samples labelled with it}`` so far; this default says every sample has every task's label
        (data sets with partial labels override it)."""
        return {task: self.samples for task in self.compute()}

    @abc.abstractmethod
    def summary(self) -> dict[str, float]:
        """Our values of the paper's table columns, ``{column name: value}``."""

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Adds another accumulator's state (of the same kind and settings) into this one; returns self."""
        if type(other) is not type(self) or other.describe() != self.describe():
            raise ValueError("merge: the accumulators differ in kind or settings")
        for name, value in other.sums.items():
            self._add(name, value.to(self.sums[name].device))
        for name, value in other.counts.items():
            self._add(name, value.to(self.counts[name].device))
        return self

    def all_reduce(self, group=None) -> MetricAccumulator:
        """Sums the state over the ranks of ``group`` in place (identity without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        for state in (self.sums, self.counts):  # one flat tensor per dtype: two collectives in all
            names = list(state)
            if not names:  # e.g. a data set with no float sums: nothing to reduce
                continue
            flat = torch.cat([state[name].reshape(-1).to(device) for name in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for name in names:
                size = state[name].numel()
                state[name] = flat[offset : offset + size].view(state[name].shape).to(state[name].device)
                offset += size
        return self

    def describe(self) -> dict:
        """The settings that define the metrics (store them next to reported numbers)."""
        return {"kind": type(self).__name__}


class MultiTaskDataset(abc.ABC):
    """A data set's tasks, losses, metrics and paper results. Subclasses set :attr:`name` (the shard
    manifest's ``dataset``), :attr:`task_specs`, :attr:`columns` and :attr:`paper_rows`."""

    name: str
    task_specs: tuple[TaskSpec, ...]
    columns: tuple[Column, ...]
    paper_rows: tuple[PaperRow, ...]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.task_specs)

    @property
    def out_channels(self) -> dict[str, int]:
        """``{task: channels of its prediction}`` (what a task head must output)."""
        return {spec.name: spec.out_channels for spec in self.task_specs}

    def spec(self, task: str) -> TaskSpec:
        for spec in self.task_specs:
            if spec.name == task:
                return spec
        raise ValueError(f"unknown {self.name} task {task!r}; tasks: {', '.join(self.tasks)}")

    @abc.abstractmethod
    def task_targets(
        self, targets: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[dict, dict | None]:
        """A loader batch's ``(targets, masks)`` -> per-task ``(targets, masks)`` keyed by :attr:`tasks`."""

    @abc.abstractmethod
    def loss(
        self, task: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training loss of one task on a batch: a scalar tensor (0, with a gradient path, if no pixel counts)."""

    def losses(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{task: loss}`` for every task in ``outputs`` (per-task targets and masks, :meth:`task_targets`)."""
        missing = [task for task in outputs if task not in targets]
        if missing:
            raise ValueError(f"no targets for task(s) {', '.join(missing)}")
        return {
            task: self.loss(task, pred, targets[task], None if masks is None else masks.get(task))
            for task, pred in outputs.items()
        }

    @abc.abstractmethod
    def metrics(self) -> MetricAccumulator:
        """A fresh accumulator of this data set's test metrics."""

    def check_manifest(self, manifest: Mapping) -> None:
        """ValueError unless a shard manifest (:func:`l2b_fast.data.shards.read_manifest`) holds this data set."""
        found = manifest.get("dataset")
        if found != self.name:
            raise ValueError(f"the shards hold {found!r} data, not {self.name!r}")

    def describe(self) -> dict:
        """Everything that defines the tasks, losses and metrics, as plain data."""
        return {"dataset": self.name, "tasks": {spec.name: dataclasses.asdict(spec) for spec in self.task_specs}}


def format_table(
    dataset: MultiTaskDataset,
    ours: Mapping[str, float] | None = None,
    ours_parameters: int | None = None,
    *,
    ours_label: str = "ours (this run)",
) -> str:
    """The paper's results table of ``dataset`` as text, with our row (``dataset.metrics().summary()``) last."""
    header = ["method", "params (M)"] + [
        f"{column.label} {'(higher better)' if column.higher_is_better else '(lower better)'}"
        for column in dataset.columns
    ]
    rows = [
        [row.method, "-" if row.parameters_millions is None else f"{row.parameters_millions:g}"]
        + [format(row.values[c.name], c.number_format) if c.name in row.values else "-" for c in dataset.columns]
        for row in dataset.paper_rows
    ]
    if ours is not None:
        rows.append(
            [ours_label, "-" if ours_parameters is None else f"{ours_parameters / 1e6:.3g}"]
            + [format(ours[c.name], c.number_format) if c.name in ours else "-" for c in dataset.columns]
        )
    widths = [max(len(line[k]) for line in [header] + rows) for k in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if k == 0 else cell.rjust(width) for k, (cell, width) in enumerate(zip(line, widths))
        )
        for line in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
