"""Taskonomy shards -> batches: the training loader (resampled, shuffled, augmented) and the evaluation loader."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from l2b_fast.data.images import CorruptSampleError, decode_png
from l2b_fast.data.labels import LABELS_MEMBER
from l2b_fast.data.loader import SkipCounter, build_loader, wds
from l2b_fast.datasets.taskonomy.protocol import (
    LABELLED_KEY,
    PAD_VALUES,
    RAW_DTYPES,
    TASKS,
    TaskonomyProtocol,
    augment,
    resize_raw,
)

__all__ = ["taskonomy_train_loader", "taskonomy_eval_loader"]


# ----------------------------------------------------------------------------------------------- Taskonomy
class _TaskonomyConvert:
    def __init__(self, protocol: TaskonomyProtocol, size: int, train: bool, normalize: bool):
        self.protocol, self.size, self.train, self.normalize = protocol, int(size), train, normalize

    def __call__(self, sample: dict, rng: np.random.Generator):
        labels = sample_labels(sample.get(LABELS_MEMBER))
        raw = {}
        for member in self.protocol.members:
            if member != "rgb" and member not in labels:
                continue  # unlabelled: a placeholder map below, whether or not the shard holds one
            data = sample.get(f"{member}.png")
            if data is None:
                raise CorruptSampleError(f"missing member {member}.png")
            raw[member] = decode_png(data, name=f"{member}.png")
        for task in self.protocol.tasks:
            if task not in labels:  # same size as rgb, so resizing and augmentation treat it like any map
                shape = raw["rgb"].shape[:2] + ((3,) if task == "normal" else ())
                raw[task] = np.full(shape, PAD_VALUES[task], dtype=RAW_DTYPES[task])
        shapes = {member: a.shape[:2] for member, a in raw.items()}
        if len(set(shapes.values())) != 1:
            raise CorruptSampleError(f"modalities differ in size: {shapes}")
        if raw["rgb"].ndim != 3 or raw["rgb"].shape[2] != 3:
            raise CorruptSampleError(f"rgb.png is not RGB (shape {raw['rgb'].shape})")
        raw = resize_raw(raw, self.size, self.protocol.rgb_resize)
        if self.train:
            raw = augment(raw, rng, scale=self.protocol.train_scale, crop=self.size, flip=self.protocol.train_flip)
        raw[LABELLED_KEY] = np.array([task in labels for task in self.protocol.tasks])
        if not self.normalize:
            return (self.protocol.raw_tensors(raw),)
        return self.protocol.to_targets(raw)


def sample_labels(labels_json) -> frozenset[str]:
    """A sample's ``labels.json`` member (a JSON list of the task names it is labelled with; None: the member is
    absent, every task is labelled) -> the set of its labelled tasks; CorruptSampleError if malformed."""
    if labels_json is None:
        return frozenset(TASKS)
    try:
        names = json.loads(labels_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSampleError(f"labels.json is not JSON: {error}") from error
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CorruptSampleError("labels.json must be a list of task names")
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise CorruptSampleError(f"labels.json names unknown task(s): {', '.join(unknown[:3])}")
    return frozenset(names)


def taskonomy_train_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    size: int,
    protocol: TaskonomyProtocol | None = None,
    seed: int = 0,
    epoch_samples: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    with_keys: bool = False,
    pin_memory: bool | None = None,
    skip_counter: SkipCounter | None = None,
    normalize: bool = True,
) -> wds.WebLoader:
    """Infinite-stream training loader cut into epochs of ``epoch_samples`` samples (over all ranks).

    Each sample: decode the protocol's members, resize to ``size`` (labels nearest, rgb ``protocol.rgb_resize``),
    augment (random scale ``protocol.train_scale``, flip, random crop ``size`` with ignored padding), normalise.
    Yields ``(rgb [B,3,S,S] float32, {task: target [B,...]}, {task: mask [B,S,S] bool})`` (plus a list of keys
    with ``with_keys``); a task the sample's ``labels.json`` does not list has an all-False mask (and
    segmentation target 255), and its member may be absent; batches are full. ``rank``/``world_size`` default
    to torch.distributed (or the RANK/WORLD_SIZE environment) at call time. ``loader.batches_per_epoch``
    batches per epoch per rank.

    ``normalize=False`` yields ``(raw,)`` instead: the augmented raw maps (``protocol.raw_tensors``, stacked),
    to be normalised where the model runs with ``protocol.to_targets_batch(raw, device)``: identical values,
    while the workers skip the normalisation and move ~3.5x fewer bytes.
    """
    protocol = protocol or TaskonomyProtocol()
    return build_loader(
        urls,
        _TaskonomyConvert(protocol, size, train=True, normalize=normalize),
        train=True,
        batch_size=batch_size,
        seed=seed,
        epoch_samples=epoch_samples,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        counter=skip_counter or SkipCounter("taskonomy-train"),
        with_keys=with_keys,
        pin_memory=pin_memory,
    )


def taskonomy_eval_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    size: int,
    protocol: TaskonomyProtocol | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    with_keys: bool = False,
    pin_memory: bool | None = None,
    skip_counter: SkipCounter | None = None,
    normalize: bool = True,
) -> wds.WebLoader:
    """One deterministic pass over this rank's shards ``urls[rank::world_size]`` (resize only, no shuffle).

    Yields the same tuples as :func:`taskonomy_train_loader` (``normalize`` as there); the last batch may be
    partial. Combine per-rank metric sums with :func:`reduce_metric_sums`.
    """
    protocol = protocol or TaskonomyProtocol()
    return build_loader(
        urls,
        _TaskonomyConvert(protocol, size, train=False, normalize=normalize),
        train=False,
        batch_size=batch_size,
        seed=0,
        epoch_samples=None,
        num_workers=num_workers,
        shuffle_buffer=0,
        rank=rank,
        world_size=world_size,
        counter=skip_counter or SkipCounter("taskonomy-eval"),
        with_keys=with_keys,
        pin_memory=pin_memory,
    )
