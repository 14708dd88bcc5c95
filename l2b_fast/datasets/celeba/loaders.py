"""CelebA shards -> batches of ``(rgb in [-1, 1], {"attributes": [B, 40] 0/1}, {"attributes": [B, 40] bool})``,
and the CelebA transforms. The mask says which attributes each example is labelled with (its ``labels.json``
member; an example without one has every label)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch

from l2b_fast.data.images import CorruptSampleError, decode_image, resize_rgb
from l2b_fast.data.loader import SkipCounter, build_loader, wds
from l2b_fast.datasets.celeba.dataset import ATTRIBUTES

__all__ = ["celeba_loader", "celeba_augment", "celeba_to_targets", "celeba_label_mask"]


# -------------------------------------------------------------------------------------------------- CelebA
class _CelebaConvert:
    def __init__(self, size, train: bool, flip: bool):
        self.size = (size, size) if isinstance(size, int) else size
        self.train, self.flip = train, flip

    def __call__(self, sample: dict, rng: np.random.Generator):
        for member in ("jpg", "jpeg", "png"):
            if member in sample:
                image = decode_image(sample[member], member)
                break
        else:
            raise CorruptSampleError("missing image member (jpg or png)")
        if "attr.json" not in sample:
            raise CorruptSampleError("missing member attr.json")
        attributes = json.loads(sample["attr.json"])["attributes"]
        if self.size is not None:
            image = resize_rgb(image, self.size[0], self.size[1], "bilinear")
        if self.train:
            image = celeba_augment(image, rng, flip=self.flip)
        rgb, attrs = celeba_to_targets(image, attributes)
        return rgb, {"attributes": attrs}, {"attributes": celeba_label_mask(sample.get("labels.json"))}


def celeba_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    train: bool,
    size: int | tuple[int, int] | None = None,
    flip: bool = True,
    seed: int = 0,
    epoch_samples: int | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    with_keys: bool = False,
    pin_memory: bool | None = None,
    skip_counter: SkipCounter | None = None,
) -> wds.WebLoader:
    """CelebA shards -> ``(rgb [B,3,H,W] in [-1, 1], {"attributes": [B,40] float 0/1}, {"attributes": [B,40] bool})``.

    The mask is True where the example is labelled with that attribute (:func:`celeba_label_mask`); the target
    of an unlabelled attribute is meaningless and counts in no loss or metric.

    ``train=True``: resampled + shuffled + random horizontal flip, ``epoch_samples`` required (as for
    Taskonomy). ``train=False``: one deterministic pass over ``urls[rank::world_size]``. ``size`` resizes
    (bilinear) to (size, size) or (H, W); None keeps the stored size (all images of a batch must agree).
    """
    return build_loader(
        urls,
        _CelebaConvert(size, train=train, flip=flip),
        train=train,
        batch_size=batch_size,
        seed=seed,
        epoch_samples=epoch_samples,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        counter=skip_counter or SkipCounter("celeba-train" if train else "celeba-eval"),
        with_keys=with_keys,
        pin_memory=pin_memory,
    )


def celeba_augment(image: np.ndarray, rng: np.random.Generator, *, flip: bool = True) -> np.ndarray:
    """CelebA training augmentation: random horizontal flip of uint8 [H, W, 3]."""
    if flip and rng.random() < 0.5:
        return np.ascontiguousarray(image[:, ::-1])
    return image


def celeba_to_targets(image: np.ndarray, attributes) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB [H, W, 3] and 40 attributes (0/1, or CelebA's -1/1) -> (rgb [3,H,W] in [-1, 1], float [40] 0/1)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise CorruptSampleError(f"CelebA image must be [H, W, 3], got {image.shape}")
    attrs = np.asarray(attributes)
    if attrs.shape != (40,):
        raise CorruptSampleError(f"CelebA needs 40 attributes, got shape {attrs.shape}")
    rgb = np.ascontiguousarray(
        (image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)).transpose(2, 0, 1)
    )
    return torch.from_numpy(rgb), torch.from_numpy((attrs > 0).astype(np.float32))


def celeba_label_mask(labels_json) -> torch.Tensor:
    """A sample's ``labels.json`` member (a JSON list of the attribute names it is labelled with; None: the
    member is absent, every attribute is labelled) -> bool [40] in :data:`ATTRIBUTES` order."""
    if labels_json is None:
        return torch.ones(len(ATTRIBUTES), dtype=torch.bool)
    try:
        names = json.loads(labels_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSampleError(f"labels.json is not JSON: {error}") from error
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CorruptSampleError("labels.json must be a list of attribute names")
    unknown = sorted(set(names) - set(ATTRIBUTES))
    if unknown:
        raise CorruptSampleError(f"labels.json names unknown attribute(s): {', '.join(unknown[:3])}")
    present = set(names)
    return torch.tensor([name in present for name in ATTRIBUTES], dtype=torch.bool)
