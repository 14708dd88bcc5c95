"""CelebA's 40 binary attributes as 40 tasks (the paper's Sec. 4.2): losses, Table 1's mean accuracy, the paper's rows.

Each attribute is one task (a leaf of the tree), predicted as one logit per image (``[B]`` or ``[B, 1]``).
The loader yields ``{"attributes": float [B, 40]}`` with 0/1 labels and ``{"attributes": bool [B, 40]}`` label
masks (:func:`l2b_fast.datasets.celeba.loaders.celeba_loader`); :meth:`CelebA.task_targets` splits them into one
``[B]`` target and mask per attribute, and losses and metrics count only the labelled examples. Loss: binary
cross-entropy on the logit ("40 cross-entropy losses with equal weightings"); metric: accuracy of ``logit > 0``
per attribute and their mean over the attributes, in percent (Table 1).
"""

from __future__ import annotations

import dataclasses
import math

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

#: The 40 binary attributes of CelebA, in the order of its annotation file.
ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

__all__ = ["ATTRIBUTES", "CelebA", "CelebAMetrics", "PAPER_ROWS"]

#: Table 1 of the paper (CelebA test set): mean accuracy in percent, parameters in millions (None: not given).
PAPER_ROWS: tuple[PaperRow, ...] = tuple(
    PaperRow(method, params, {"mean_accuracy": accuracy}, "Guo et al. 2020, Table 1")
    for method, accuracy, params in (
        ("LNet+ANet (Wang et al., 2016)", 87.0, None),
        ("Walk and Learn (Wang et al., 2016)", 88.0, None),
        ("MOON (Rudd et al., 2016)", 90.94, 119.73),
        ("Indep Group (Hand & Chellappa, 2017)", 91.06, None),
        ("MCNN-AUX (Hand & Chellappa, 2017)", 91.29, None),
        ("VGG-16 Baseline (Lu et al., 2017)", 91.44, 134.41),
        ("Branch-VGG (Lu et al., 2017)", 90.79, 2.09),
        ("LearnToBranch-VGG (Guo et al., 2020)", 91.55, 1.94),
        ("GNAS-Deep-Wide (Huang et al., 2018)", 91.36, 6.41),
        ("LearnToBranch-Deep-Wide (Guo et al., 2020)", 91.62, 6.33),
    )
)


@dataclasses.dataclass(frozen=True)
class CelebA(MultiTaskDataset):
    """CelebA's attributes as tasks (``attributes``: a subset of :data:`ATTRIBUTES`, kept in the standard order)."""

    attributes: tuple[str, ...] = ATTRIBUTES

    name = "celeba"
    columns = (Column("mean_accuracy", "Acc (%)", True, ".2f"),)
    paper_rows = PAPER_ROWS

    def __post_init__(self):
        chosen = ordered_subset(
            self.attributes,
            ATTRIBUTES,
            f"attributes must be distinct CelebA attributes (e.g. {ATTRIBUTES[0]}, {ATTRIBUTES[20]})",
        )
        object.__setattr__(self, "attributes", chosen)

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return tuple(TaskSpec(name, 1, "binary cross-entropy", ("accuracy",)) for name in self.attributes)

    def task_targets(self, targets, masks=None):
        """``{"attributes": [B, 40]}`` (the loader's) -> ``{attribute: [B]}``; the loader's label masks
        ``{"attributes": bool [B, 40]}`` -> ``{attribute: bool [B]}`` (None: every example labelled)."""
        table = targets.get("attributes") if isinstance(targets, dict) else None
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != len(ATTRIBUTES):
            raise ValueError(
                f"CelebA targets must be {{'attributes': [B, {len(ATTRIBUTES)}]}} as celeba_loader yields, got "
                f"{_describe(table)}"
            )
        split = {name: table[:, ATTRIBUTES.index(name)] for name in self.attributes}
        labelled = None if masks is None else masks.get("attributes")
        if labelled is None:
            return split, None
        if not isinstance(labelled, torch.Tensor) or labelled.dtype != torch.bool or labelled.shape != table.shape:
            raise ValueError(
                f"CelebA masks must be {{'attributes': bool {list(table.shape)}}} as celeba_loader yields, got "
                f"{_describe(labelled)}"
            )
        return split, {name: labelled[:, ATTRIBUTES.index(name)] for name in self.attributes}

    def _logits(self, task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if task not in self.attributes:
            raise ValueError(f"unknown task {task!r}: not one of this CelebA's attributes")
        if isinstance(pred, torch.Tensor) and pred.dim() == 1:
            pred = pred.unsqueeze(1)
        check_prediction(task, pred, 1, None)
        if not isinstance(target, torch.Tensor) or target.shape != (pred.shape[0],):
            raise ValueError(f"{task}: target must be [B] = [{pred.shape[0]}] labels 0/1, got {_describe(target)}")
        return pred[:, 0]

    def _check_mask(self, task: str, mask, batch: int) -> None:
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (batch,)
        ):
            raise ValueError(f"{task}: label mask must be bool [B] = [{batch}], got {_describe(mask)}")

    def loss(self, task, pred, target, mask=None):
        """Binary cross-entropy of the logit, averaged over the examples labelled with ``task`` (``mask`` bool
        [B], None: all). A batch without any such example gives 0 with a zero gradient (never NaN)."""
        logits = self._logits(task, pred, target)
        self._check_mask(task, mask, logits.shape[0])
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if mask is None:
            return F.binary_cross_entropy_with_logits(logits.to(dtype), target.to(dtype))
        # an unlabelled example's target may be anything (NaN included): replace it before the loss sees it, and
        # drop its term with where() (not a product, which would turn an infinite term into NaN)
        safe_target = torch.where(mask, target.to(dtype), torch.zeros((), dtype=dtype, device=target.device))
        per_example = F.binary_cross_entropy_with_logits(logits.to(dtype), safe_target, reduction="none")
        kept = torch.where(mask, per_example, torch.zeros_like(per_example))
        return kept.sum() / mask.sum().clamp_min(1).to(dtype)

    def metrics(self) -> CelebAMetrics:
        return CelebAMetrics(self)

    def describe(self) -> dict:
        return {**super().describe(), "attributes": list(self.attributes)}


def _describe(value) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class CelebAMetrics(MetricAccumulator):
    """Correct predictions (``logit > 0`` vs label > 0.5) and labelled examples per attribute, and the sample
    count: an attribute's accuracy counts only the examples labelled with it."""

    def __init__(self, dataset: CelebA):
        self.dataset = dataset
        tasks = (len(dataset.attributes),)
        super().__init__(sums={}, counts={"correct": tasks, "labelled": tasks})

    @torch.no_grad()
    def update(self, outputs, targets, masks=None):
        correct, labelled, batch = [], [], None
        for task in self.dataset.attributes:
            if task not in outputs or task not in targets:
                raise ValueError(f"update: no {'output' if task not in outputs else 'target'} for attribute {task!r}")
            logits = self.dataset._logits(task, outputs[task], targets[task])
            if batch is not None and logits.shape[0] != batch:
                raise ValueError(f"update: attribute {task!r} has batch {logits.shape[0]}, another {batch}")
            batch = logits.shape[0]
            mask = None if masks is None else masks.get(task)
            self.dataset._check_mask(task, mask, batch)
            hits = (logits > 0) == (targets[task] > 0.5)
            correct.append((hits if mask is None else hits & mask).sum())
            labelled.append(torch.tensor(batch, device=logits.device) if mask is None else mask.sum())
        self._add("correct", torch.stack(correct))
        self._add("labelled", torch.stack(labelled))
        self._add("samples", torch.tensor(batch, device=self.counts["samples"].device))

    def labelled(self) -> dict[str, int]:
        """``{attribute: examples labelled with it}`` accumulated so far."""
        return dict(zip(self.dataset.attributes, self.counts["labelled"].tolist()))

    def compute(self):
        return {
            name: {"accuracy": 100.0 * int(count) / labelled if labelled else math.nan}
            for (name, labelled), count in zip(self.labelled().items(), self.counts["correct"].tolist())
        }

    def summary(self):
        """Mean accuracy over the attributes with at least one labelled example (NaN if none has one)."""
        accuracies = [values["accuracy"] for values in self.compute().values() if not math.isnan(values["accuracy"])]
        return {"mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else math.nan}

    def describe(self):
        return {"kind": type(self).__name__, **self.dataset.describe()}
