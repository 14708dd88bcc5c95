"""Partial labels: which tasks each example is labelled with, in shards and manifests.

A sample may carry a ``labels.json`` member, a JSON list of the task names it has labels for; a sample without
that member has every task's label (so shards written before partial labels keep working). A split's manifest
entry may carry ``"labels": {task: count}``, the number of its samples labelled with each task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["LABELS_MEMBER", "check_label_fraction", "sample_labels", "count_labels"]

LABELS_MEMBER = "labels.json"


def check_label_fraction(fraction: float) -> float:
    """``fraction`` as a float, or ValueError unless 0 < fraction <= 1."""
    value = float(fraction)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    return value


def sample_labels(tasks: Sequence[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """The tasks one example keeps: each with probability ``fraction``, at least one (drawn uniformly when the
    coin flips keep none), in ``tasks``' order. Always draws ``len(tasks) + 1`` numbers, so ``rng``'s stream
    does not depend on the outcome."""
    keep = rng.random(len(tasks)) < fraction
    fallback = int(rng.integers(len(tasks)))
    if not keep.any():
        keep[fallback] = True
    return [task for task, kept in zip(tasks, keep) if kept]


def count_labels(tasks: Sequence[str], labelled: Iterable[Sequence[str]]) -> dict[str, int]:
    """``{task: number of examples whose label list holds it}`` over ``labelled`` (one list per example)."""
    counts = dict.fromkeys(tasks, 0)
    for names in labelled:
        for name in names:
            counts[name] += 1
    return counts
