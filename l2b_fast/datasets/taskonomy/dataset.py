"""Taskonomy's five tasks (the paper's Sec. 4.3, AdaShare's protocol): losses, the Table 2 metrics, the paper's rows.

Targets and masks are what :mod:`l2b_fast.data.loader` yields (``TaskonomyProtocol.to_targets``):
``segment_semantic`` int64 [B, H, W] with classes 0..16 (0 = background, raw uncertain folded into it) and 255
where augmentation padded; ``normal`` [B, 3, H, W] in [-1, 1]; ``depth_zbuffer``, ``keypoints2d``,
``edge_texture`` [B, 1, H, W]; masks bool [B, H, W] (False = the pixel does not count). Predictions have the
target's spatial size: upsample a head's output first.

Training losses (pooled over the batch's counted pixels, as AdaShare's): L1 for depth, keypoints and edges,
class-weighted cross-entropy for segmentation (mean weighted by the pixels' class weights, like
``nn.CrossEntropyLoss(weight=...)``), 1 - cosine similarity for normals (both vectors normalised).

Test metrics (Table 2; lower is better except normal): segmentation cross-entropy with a named mask rule
(``"paper"``: uncertain and background pixels masked, as the paper's text says; ``"adashare"``: only padding
masked, as AdaShare's code does; the metric's name carries the rule), normal mean cosine similarity (the
loader's normal mask: unmasked by default), depth MAE on normalised values with d >= 126 m masked, keypoint and
edge MAE on normalised values. AdaShare's test script evaluates one image per batch and averages per-image
means, which ``average="image"`` (the default) reproduces at any batch size; ``average="pixel"`` weighs every
counted pixel of the split equally instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from l2b_fast.datasets.base import (
    Column,
    MetricAccumulator,
    MultiTaskDataset,
    PaperRow,
    TaskSpec,
    check_prediction,
    ordered_subset,
)
from l2b_fast.datasets.taskonomy.protocol import TASKS
from l2b_fast.datasets.taskonomy.synthetic import CLASSES as OBJECT_CLASSES

__all__ = [
    "TASKS",
    "SEGMENTATION_CLASSES",
    "IGNORE_INDEX",
    "DEFAULT_CLASS_WEIGHTS",
    "class_weights_from_frequencies",
    "segmentation_pixel_counts",
    "load_class_weights",
    "Taskonomy",
    "TaskonomyMetrics",
    "PAPER_ROWS",
]

#: The 17 segmentation classes of the targets: 0 = background (raw 0 uncertain and 1 background), then 16 COCO objects.
SEGMENTATION_CLASSES: tuple[str, ...] = ("background",) + tuple(OBJECT_CLASSES)

#: Segmentation target of pixels that never count (augmentation padding): cross-entropy's ignore index.
IGNORE_INDEX = 255

#: Default cross-entropy class weights. Taskonomy ships its own (``semseg_prior_factor.npy``, used by AdaShare:
#: background about 0.542, object classes between about 7.2 and 9.2), but that file is not available to this
#: project, so the default is the two-level approximation background 0.542, every object class 8.2 (the middle
#: of the published range). Pass the real file (``class_weights="path/semseg_prior_factor.npy"``) or weights
#: counted on your own training shards (:func:`class_weights_from_frequencies`) for the exact protocol.
DEFAULT_CLASS_WEIGHTS: tuple[float, ...] = (0.542,) + (8.2,) * len(OBJECT_CLASSES)

_LABELS = {
    "segment_semantic": "Segmentation",
    "normal": "Normal",
    "depth_zbuffer": "Depth",
    "keypoints2d": "Keypoint",
    "edge_texture": "Edge",
}
_CHANNELS = {
    "segment_semantic": len(SEGMENTATION_CLASSES),
    "normal": 3,
    "depth_zbuffer": 1,
    "keypoints2d": 1,
    "edge_texture": 1,
}


def class_weights_from_frequencies(pixel_counts: Sequence[float], smoothing: float = 0.5) -> tuple[float, ...]:
    """Rebalancing weights from the training set's pixel count per class (Zhang et al.'s colourisation prior,
    the rebalancing Taskonomy's prior factors follow): ``w_c = 1 / ((1 - smoothing) p_c + smoothing / K)``,
    scaled so that the pixel-weighted mean ``sum_c p_c w_c`` is 1. With a background share of ~0.94 and
    smoothing 0.5 this gives background ~0.56 and objects ~8-9.7, the magnitudes Taskonomy ships."""
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if (
        counts.dim() != 1
        or len(counts) < 2
        or not bool(torch.isfinite(counts).all())
        or bool((counts < 0).any())
        or float(counts.sum()) <= 0
    ):
        raise ValueError("pixel_counts must be at least two finite, non-negative counts with a positive sum")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must lie in (0, 1], got {smoothing}")
    p = counts / counts.sum()
    weights = 1.0 / ((1 - smoothing) * p + smoothing / len(p))
    return tuple(float(w) for w in weights / (p * weights).sum())


def segmentation_pixel_counts(batches: Iterable) -> list[int]:
    """Pixels per segmentation class (17 counts) over ``batches`` of a Taskonomy loader, ``(rgb, targets,
    masks)`` tuples; padding (255) is not counted. Feed the result to :func:`class_weights_from_frequencies`."""
    counts = torch.zeros(len(SEGMENTATION_CLASSES), dtype=torch.int64)
    for batch in batches:
        target = batch[1]["segment_semantic"]
        labels = target[target != IGNORE_INDEX].long().cpu()
        if labels.numel() and int(labels.max()) >= len(SEGMENTATION_CLASSES):
            raise ValueError(
                f"segmentation label {int(labels.max())} outside 0..{len(SEGMENTATION_CLASSES) - 1} (and 255)"
            )
        counts += torch.bincount(labels, minlength=len(SEGMENTATION_CLASSES))
    return counts.tolist()


def load_class_weights(path: str | Path) -> tuple[float, ...]:
    """The 17 class weights of a ``.npy`` file (e.g. Taskonomy's ``semseg_prior_factor.npy``)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no class-weight file {path}")
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read class weights from {path}: {error}") from error
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))


def _check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(SEGMENTATION_CLASSES):
        raise ValueError(
            f"class_weights needs {len(SEGMENTATION_CLASSES)} values (one per segmentation class), got {len(weights)}"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"class_weights must be finite and positive, got {weights}")
    return weights


#: Table 2 of the paper (Taskonomy test set; AdaShare's protocol); parameters in millions.
PAPER_ROWS: tuple[PaperRow, ...] = tuple(
    PaperRow(method, params, dict(zip(TASKS, values)), "Guo et al. 2020, Table 2")
    for method, params, values in (
        ("Single-Task (Sun et al., 2019)", 124, (0.575, 0.707, 0.022, 0.197, 0.212)),
        ("Multi-Task (Sun et al., 2019)", 41, (0.587, 0.702, 0.024, 0.194, 0.201)),
        ("Cross-Stitch (Misra et al., 2016)", 124, (0.560, 0.684, 0.022, 0.202, 0.219)),
        ("Sluice (Ruder et al., 2017)", 124, (0.610, 0.702, 0.023, 0.192, 0.198)),
        ("NDDR-CNN (Gao et al., 2019)", 133, (0.539, 0.705, 0.024, 0.194, 0.206)),
        ("MTAN (Liu et al., 2019b)", 114, (0.637, 0.702, 0.023, 0.193, 0.203)),
        ("AdaShare (Sun et al., 2019)", 41, (0.566, 0.707, 0.025, 0.192, 0.193)),
        ("LearnToBranch (Guo et al., 2020)", 51, (0.462, 0.709, 0.018, 0.122, 0.136)),
    )
)


@dataclasses.dataclass(frozen=True)
class Taskonomy(MultiTaskDataset):
    """Taskonomy's tasks (a subset of :data:`TASKS` in that order), their losses and Table 2 metrics.

    Attributes:
        tasks: the tasks to train and evaluate.
        class_weights: 17 segmentation class weights (loss and metric), a path to a ``.npy`` file holding them,
            or None for unweighted cross-entropy. Default :data:`DEFAULT_CLASS_WEIGHTS` (an approximation:
            read its note).
        segmentation_mask: the metric's rule, "paper" (uncertain and background masked) or "adashare" (only
            padding masked). The training loss uses the loader's mask instead.
        average: "image" (mean of per-image means, AdaShare's test script) or "pixel" (every counted pixel alike).
    """

    tasks: tuple[str, ...] = TASKS
    class_weights: tuple[float, ...] | str | Path | None = DEFAULT_CLASS_WEIGHTS
    segmentation_mask: str = "paper"
    average: str = "image"

    name = "taskonomy"
    columns = tuple(Column(task, _LABELS[task], task == "normal") for task in TASKS)
    paper_rows = PAPER_ROWS

    def __post_init__(self):
        object.__setattr__(
            self,
            "tasks",
            ordered_subset(self.tasks, TASKS, f"tasks must be distinct Taskonomy tasks out of {', '.join(TASKS)}"),
        )
        weights = self.class_weights
        if isinstance(weights, (str, Path)):
            weights = load_class_weights(weights)
        object.__setattr__(self, "class_weights", None if weights is None else _check_weights(weights))
        if self.segmentation_mask not in ("paper", "adashare"):
            raise ValueError(f"segmentation_mask must be 'paper' or 'adashare', not {self.segmentation_mask!r}")
        if self.average not in ("image", "pixel"):
            raise ValueError(f"average must be 'image' or 'pixel', not {self.average!r}")

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        loss = {
            "segment_semantic": "weighted cross-entropy" if self.class_weights else "cross-entropy",
            "normal": "1 - cosine similarity",
        }
        return tuple(
            TaskSpec(
                task, _CHANNELS[task], loss.get(task, "L1"), TaskonomyMetrics.metric_names(task, self.segmentation_mask)
            )
            for task in self.tasks
        )

    def weight_tensor(self, device) -> torch.Tensor | None:
        """The class weights on ``device`` (cached), or None."""
        if self.class_weights is None:
            return None
        cache = self.__dict__.setdefault("_weight_cache", {})  # frozen dataclass: no attribute assignment
        key = torch.device(device)
        if key not in cache:
            cache[key] = torch.tensor(self.class_weights, dtype=torch.float64, device=key)
        return cache[key]

    def task_targets(self, targets, masks=None):
        missing = [task for task in self.tasks if task not in targets]
        if missing:
            raise ValueError(
                f"the batch has no target for {', '.join(missing)} (the loader's protocol must decode every task)"
            )
        return {task: targets[task] for task in self.tasks}, None if masks is None else {
            task: masks[task] for task in self.tasks if task in masks
        }

    def pixel_terms(
        self, task: str, pred: torch.Tensor, target: torch.Tensor, counted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(numerator, denominator)`` [B] of ``task``'s pixel average over the ``counted`` pixels.

        Segmentation: sum of class-weighted negative log-likelihoods / sum of the class weights; normal: sum of
        cosine similarities / pixels; the others: sum of absolute errors over channels and pixels / (pixels x
        channels). Computed in float64 for float64 predictions, else float32 (also under autocast).
        """
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        pred = pred.to(dtype)
        counted = counted.to(torch.bool)
        if task == "segment_semantic":
            safe = torch.where(counted, target, 0).long()
            nll = -F.log_softmax(pred, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
            weights = self.weight_tensor(pred.device)
            pixel_weight = counted.to(dtype) if weights is None else weights.to(dtype)[safe] * counted
            return (pixel_weight * nll).sum((1, 2)), pixel_weight.sum((1, 2))
        if task == "normal":
            cosine = (F.normalize(pred, dim=1) * F.normalize(target.to(dtype), dim=1)).sum(1)
            return (cosine * counted).sum((1, 2)), counted.sum((1, 2)).to(dtype)
        error = (pred - target.to(dtype)).abs().sum(1)
        return (error * counted).sum((1, 2)), counted.sum((1, 2)).to(dtype) * pred.shape[1]

    def _check(self, task: str, pred, target, mask) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this Taskonomy has {', '.join(self.tasks)}")
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"{task}: the target must be a tensor, got {type(target).__name__}")
        if task == "segment_semantic":
            if target.dim() != 3 or target.dtype not in (torch.int64, torch.int32, torch.uint8):
                raise ValueError(
                    f"{task}: target must be integer class indices [B, H, W], got {target.dtype} {tuple(target.shape)}"
                )
            target = target.unsqueeze(1)
        elif target.dim() != 4 or target.shape[1] != _CHANNELS[task]:
            raise ValueError(f"{task}: target must be [B, {_CHANNELS[task]}, H, W], got {tuple(target.shape)}")
        check_prediction(task, pred, _CHANNELS[task], tuple(target.shape[2:]))
        if pred.shape[0] != target.shape[0]:
            raise ValueError(f"{task}: prediction batch {pred.shape[0]} but target batch {target.shape[0]}")
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != (target.shape[0], *target.shape[2:])
        ):
            raise ValueError(
                f"{task}: mask must be bool [B, H, W] = {[target.shape[0], *target.shape[2:]]}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
            )

    def loss(self, task, pred, target, mask=None):
        """The batch's training loss, pooled over its counted pixels (``mask`` and, for segmentation, target != 255)."""
        self._check(task, pred, target, mask)
        counted = (
            torch.ones((target.shape[0], *target.shape[-2:]), dtype=torch.bool, device=target.device)
            if mask is None
            else mask
        )
        if task == "segment_semantic":
            counted = counted & (target != IGNORE_INDEX)
        numerator, denominator = self.pixel_terms(task, pred, target, counted)
        total = denominator.sum()
        if task == "normal":
            return (total - numerator.sum()) / total.clamp_min(1)  # mean of 1 - cosine; 0 if nothing counts
        return numerator.sum() / total.clamp_min(torch.finfo(total.dtype).tiny)  # 0 if nothing counts

    def metrics(self) -> TaskonomyMetrics:
        return TaskonomyMetrics(self)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "class_weights": self.class_weights,
            "class_weights_source": "DEFAULT_CLASS_WEIGHTS (approximation of Taskonomy's semseg_prior_factor)"
            if self.class_weights == DEFAULT_CLASS_WEIGHTS
            else "given",
            "segmentation_mask": self.segmentation_mask,
            "average": self.average,
        }


class TaskonomyMetrics(MetricAccumulator):
    """Table 2 metrics over batches (see the module docstring); ``compute()`` -> ``{task: {metric: value}}``.

    Per task and metric it keeps the sum of per-image means with the number of images that had a counted
    pixel (``average="image"``) and the pooled numerator and denominator over all pixels (``average="pixel"``).
    Segmentation counts pixels by the metric's rule on the target alone (the loader's segmentation mask is not
    used: padding is 255, background and uncertain are class 0); the other tasks count the loader's mask.
    """

    PARTS = ("image_sum", "pixel_sum", "pixel_weight")

    def __init__(self, dataset: Taskonomy):
        self.dataset = dataset
        self.names = [
            (task, metric) for task in dataset.tasks for metric in self.metric_names(task, dataset.segmentation_mask)
        ]
        super().__init__(
            sums={f"{task}/{metric}/{part}": () for task, metric in self.names for part in self.PARTS},
            counts={
                **{f"{task}/{metric}/images": () for task, metric in self.names},
                **{f"{task}/labelled": () for task in dataset.tasks},
            },
        )

    @staticmethod
    def metric_names(task: str, segmentation_mask: str) -> tuple[str, ...]:
        """The metrics reported for ``task``; the first is the paper's Table 2 column."""
        if task == "segment_semantic":
            return (f"cross_entropy_mask_{segmentation_mask}", f"pixel_accuracy_mask_{segmentation_mask}")
        return {"normal": ("cosine_similarity",), "depth_zbuffer": ("mae_masked",)}.get(task, ("mae",))

    def _accumulate(self, task: str, metric: str, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        numerator, denominator = numerator.detach().to(torch.float64), denominator.detach().to(torch.float64)
        has_pixels = denominator > 0
        image_means = torch.where(has_pixels, numerator / torch.where(has_pixels, denominator, 1.0), 0.0)
        self._add(f"{task}/{metric}/image_sum", image_means.sum())
        self._add(f"{task}/{metric}/images", has_pixels.sum())
        self._add(f"{task}/{metric}/pixel_sum", numerator.sum())
        self._add(f"{task}/{metric}/pixel_weight", denominator.sum())

    @torch.no_grad()
    def update(self, outputs, targets, masks=None):
        dataset, batch = self.dataset, None
        for task in dataset.tasks:
            if task not in outputs or task not in targets:
                raise ValueError(f"update: no {'output' if task not in outputs else 'target'} for task {task!r}")
            pred, target = outputs[task], targets[task]
            mask = None if masks is None or task == "segment_semantic" else masks.get(task)
            dataset._check(task, pred, target, mask)
            if batch is not None and pred.shape[0] != batch:
                raise ValueError(f"update: task {task!r} has batch {pred.shape[0]}, another task {batch}")
            batch = pred.shape[0]
            if task == "segment_semantic":
                counted = target != IGNORE_INDEX
                self._add(f"{task}/labelled", counted.flatten(1).any(1).sum())
                if dataset.segmentation_mask == "paper":
                    counted &= target != 0  # background and uncertain pixels (both class 0)
                names = self.metric_names(task, dataset.segmentation_mask)
                self._accumulate(task, names[0], *dataset.pixel_terms(task, pred, target, counted))
                correct = (pred.argmax(1) == target) & counted
                self._accumulate(task, names[1], correct.sum((1, 2)), counted.sum((1, 2)))
            else:
                counted = (
                    torch.ones((target.shape[0], *target.shape[-2:]), dtype=torch.bool, device=target.device)
                    if mask is None
                    else mask
                )
                self._add(f"{task}/labelled", counted.flatten(1).any(1).sum())
                self._accumulate(
                    task,
                    self.metric_names(task, dataset.segmentation_mask)[0],
                    *dataset.pixel_terms(task, pred, target, counted),
                )
        self._add("samples", torch.tensor(batch or 0, device=self.counts["samples"].device))

    def labelled(self) -> dict[str, int]:
        """``{task: images with at least one counted pixel of it}`` (an unlabelled image has none; segmentation
        counts the pixels that are not padding, whatever the metric's rule)."""
        return {task: int(self.counts[f"{task}/labelled"]) for task in self.dataset.tasks}

    def compute(self):
        values: dict[str, dict[str, float]] = {}
        for task, metric in self.names:
            key = f"{task}/{metric}"
            if self.dataset.average == "image":
                count = int(self.counts[f"{key}/images"])
                value = float(self.sums[f"{key}/image_sum"]) / count if count else math.nan
            else:
                weight = float(self.sums[f"{key}/pixel_weight"])
                value = float(self.sums[f"{key}/pixel_sum"]) / weight if weight > 0 else math.nan
            values.setdefault(task, {})[metric] = value
        return values

    def summary(self):
        values = self.compute()
        return {
            task: values[task][self.metric_names(task, self.dataset.segmentation_mask)[0]]
            for task in self.dataset.tasks
        }

    def describe(self):
        return {"kind": type(self).__name__, **self.dataset.describe()}
