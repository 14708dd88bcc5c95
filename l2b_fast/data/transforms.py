"""Decoding, augmentation and normalisation of Taskonomy / CelebA samples (raw encodings: docs/data-schema.md).

Everything works on whole numpy arrays (no per-pixel Python). The pipeline is

    decode_png (raw uint8/uint16 arrays)  ->  resize_raw (working resolution)  ->  augment (train only, RAW values)
    ->  TaskonomyProtocol.to_targets (normalised float tensors + boolean masks)

Augmentation runs on the RAW encodings so that every modality sees the same geometric transform and the
normalisation stays configurable. Pixels that augmentation invents (crop padding) are tracked in the boolean
array ``raw[VALID_KEY]``; ``to_targets`` turns them into ``mask == False``, segmentation target 255 (the
ignore index) and rgb 0 (after normalisation).

Layouts of the ``to_targets`` output (H = W = working size):
    rgb              float32 [3, H, W]
    segment_semantic int64   [H, W]     classes 0..16 (uncertain folded into background = 0), 255 = ignore
    normal           float32 [3, H, W]  unit vectors, x/255*2-1
    depth_zbuffer    float32 [1, H, W]  log1p(d)/log(65536)
    keypoints2d      float32 [1, H, W]  clip(k/65536, 0, 0.005) rescaled to [-1, 1]
    edge_texture     float32 [1, H, W]  clip(e/65536, 0, 0.08) rescaled to [-1, 1]
    masks            bool    [H, W] for every task (True = pixel counts in loss/metric)
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Mapping

import numpy as np
import torch

from l2b_fast.data import shards

try:  # Pillow is an optional dependency (extra "data"); only decoding and rgb resizing need it.
    from PIL import Image
except ModuleNotFoundError:  # pragma: no cover - exercised only without pillow
    Image = None

__all__ = [
    "TASKS",
    "VALID_KEY",
    "PAD_VALUES",
    "CAFFE_BGR_MEAN",
    "CorruptSampleError",
    "decode_png",
    "decode_image",
    "TaskonomyProtocol",
    "resize_nearest",
    "resize_rgb",
    "resize_raw",
    "augment",
    "celeba_to_targets",
    "celeba_augment",
]

#: Taskonomy task names in the order of the paper's Table 2 (also the shard member stems: ``{task}.png``).
TASKS: tuple[str, ...] = ("segment_semantic", "normal", "depth_zbuffer", "keypoints2d", "edge_texture")

#: Key of the boolean "this pixel came from the image" array that augmentation adds to a raw dict.
VALID_KEY = "_valid"

#: Raw value written into padded pixels (in the raw encodings; the masks are what matters).
PAD_VALUES: dict[str, int] = {
    "rgb": 0,
    "segment_semantic": 255,
    "normal": 128,
    "depth_zbuffer": 65535,
    "keypoints2d": 0,
    "edge_texture": 0,
}

#: Caffe/AdaShare ImageNet mean in BGR order (subtracted from 0..255 BGR values; no scaling).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

_LOG_65536 = math.log(65536.0)


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded (bad PNG bytes, missing member, wrong shape). Pipelines skip it."""


# --------------------------------------------------------------------------------------------------- decoding
def _require_pillow() -> None:
    if Image is None:  # pragma: no cover
        raise ModuleNotFoundError("l2b_fast.data needs Pillow: pip install pillow (extra 'data')")


def decode_png(data: bytes, name: str = "png") -> np.ndarray:
    """Decode PNG bytes keeping 16-bit values (``shards.decode_png``); :class:`CorruptSampleError` if undecodable.

    Never use webdataset's image decoders (they convert 16-bit to 8-bit). Widen uint16 to int32 before any
    arithmetic.
    """
    try:
        return shards.decode_png(data)
    except ValueError as exn:
        raise CorruptSampleError(f"cannot decode {name}: {exn}") from exn


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decode any 8-bit image (JPEG or PNG) to uint8 RGB [H, W, 3] (CelebA)."""
    _require_pillow()
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as exn:
        raise CorruptSampleError(f"cannot decode {name}: {type(exn).__name__}: {exn}") from exn
    return array


# --------------------------------------------------------------------------------------------------- resizing
def _nearest_index(src: int, dst: int) -> np.ndarray:
    """cv2.INTER_NEAREST source indices: floor(i * src / dst); an integer factor k gives a[::k]."""
    return np.minimum((np.arange(dst, dtype=np.int64) * src) // dst, src - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W] or [H, W, C] with cv2's convention (512 -> 256 is ``a[::2, ::2]``)."""
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    if h % height == 0 and w % width == 0:
        return np.ascontiguousarray(array[:: h // height, :: w // width])
    return array[_nearest_index(h, height)[:, None], _nearest_index(w, width)[None, :]]


def resize_rgb(rgb: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize uint8 RGB [H, W, 3]: "nearest" (cv2 convention), "bilinear" or "area" (Pillow, uint8 out)."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    if method == "nearest":
        return resize_nearest(rgb, height, width)
    _require_pillow()
    resample = {"bilinear": Image.BILINEAR, "area": Image.BOX}.get(method)
    if resample is None:
        raise ValueError(f"unknown rgb resize method {method!r} (nearest, bilinear, area)")
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), resample))


def resize_raw(raw: Mapping[str, np.ndarray], size: int | tuple[int, int], rgb_method: str = "nearest") -> dict[str, np.ndarray]:
    """Resize every map of a raw sample to the working resolution (labels always nearest)."""
    height, width = (size, size) if isinstance(size, int) else size
    out = {}
    for key, value in raw.items():
        if key == "rgb":
            out[key] = resize_rgb(value, height, width, rgb_method)
        else:
            out[key] = resize_nearest(value, height, width)
    return out


# ----------------------------------------------------------------------------------------------- augmentation
def _flip_normal(normal: np.ndarray) -> np.ndarray:
    """Mirror a raw normal map horizontally and negate x (x -> 255 - x); invalid (128,128,128) stays invalid."""
    flipped = normal[:, ::-1]
    invalid = np.all(flipped == 128, axis=-1)
    out = np.array(flipped)  # contiguous copy
    out[..., 0] = np.where(invalid, 128, 255 - flipped[..., 0].astype(np.int32)).astype(normal.dtype)
    return out


def augment(
    raw: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] | None = (0.5, 1.5),
    crop: int | tuple[int, int] | None = None,
    flip: bool | float = True,
) -> dict[str, np.ndarray]:
    """Random scale, horizontal flip and random crop, applied consistently to every map of a RAW sample.

    - scale: factor drawn uniformly from ``scale`` (None: no scaling); rgb bilinear, labels nearest (so labels
      keep their integer values).
    - flip: mirror every map with probability 1/2 (True), never (False) or the given probability (float); the
      normal map's x component is negated in raw encoding (x -> 255 - x; invalid (128,128,128) stays).
    - crop: output size; if the (scaled) image is smaller it is padded at the bottom/right with
      :data:`PAD_VALUES` and those pixels are False in ``out[VALID_KEY]`` (ignored), then cropped at a random
      offset.

    Returns a new dict with the same keys plus ``VALID_KEY`` (bool [H, W]).
    """
    out = {key: np.asarray(value) for key, value in raw.items()}
    first = out["rgb"] if "rgb" in out else next(v for k, v in out.items() if k != VALID_KEY)
    h, w = first.shape[:2]
    if VALID_KEY not in out:
        out[VALID_KEY] = np.ones((h, w), dtype=bool)

    if scale is not None:
        factor = float(rng.uniform(scale[0], scale[1]))
        nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
        out = {key: (resize_rgb(v, nh, nw, "bilinear") if key == "rgb" else resize_nearest(v, nh, nw)) for key, v in out.items()}
        h, w = nh, nw

    probability = (0.5 if flip else 0.0) if isinstance(flip, bool) else float(flip)
    if probability > 0 and rng.random() < probability:
        out = {key: (_flip_normal(v) if key == "normal" else np.ascontiguousarray(v[:, ::-1])) for key, v in out.items()}

    if crop is not None:
        ch, cw = (crop, crop) if isinstance(crop, int) else crop
        ph, pw = max(0, ch - h), max(0, cw - w)
        if ph or pw:
            padded = {}
            for key, v in out.items():
                fill = False if key == VALID_KEY else PAD_VALUES.get(key, 0)
                pad = ((0, ph), (0, pw)) + ((0, 0),) * (v.ndim - 2)
                padded[key] = np.pad(v, pad, mode="constant", constant_values=fill)
            out = padded
            h, w = h + ph, w + pw
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        out = {key: np.ascontiguousarray(v[top : top + ch, left : left + cw]) for key, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------- protocol
@dataclasses.dataclass(frozen=True)
class TaskonomyProtocol:
    """How raw Taskonomy encodings become targets and masks. Defaults follow AdaShare / the L2B paper.

    Attributes:
        tasks: tasks to decode and return (a sample missing one of them is skipped).
        rgb_normalization: "minus_one_one" (the paper: x/255*2-1) or "caffe_bgr" (AdaShare's code: channels
            in BGR order minus :data:`CAFFE_BGR_MEAN`, unscaled).
        rgb_resize: interpolation of rgb when resizing to the working resolution for evaluation/training input
            ("nearest": AdaShare, cv2 INTER_NEAREST for every modality; "bilinear"; "area"). Labels are always
            nearest.
        depth_valid_below: depth mask keeps raw d < this (64500 ~ 126 m; 65535 = no geometry).
        mask_invalid_normals: if True the normal mask drops invalid (128,128,128) pixels; False (AdaShare's
            metric: mean cosine similarity without a mask) keeps them (padding is always masked).
        keypoints_clip: keypoints2d target clip(k/65536, 0, keypoints_clip) rescaled to [-1, 1].
        edge_clip: edge_texture target clip(e/65536, 0, edge_clip) rescaled to [-1, 1].
        segmentation_mask: "none" (AdaShare's code: every pixel counts) or "ignore_uncertain_background" (the
            paper's text: raw 0 = uncertain and 1 = background pixels are masked). The target itself always
            maps raw 0 -> 1, then subtracts 1 (17 classes, 0 = background).
        train_scale: random scale range of training augmentation (None: no scaling).
        train_flip: random horizontal flip in training augmentation.
    """

    tasks: tuple[str, ...] = TASKS
    rgb_normalization: str = "minus_one_one"
    rgb_resize: str = "nearest"
    depth_valid_below: int = 64500
    mask_invalid_normals: bool = False
    keypoints_clip: float = 0.005
    edge_clip: float = 0.08
    segmentation_mask: str = "none"
    train_scale: tuple[float, float] | None = (0.5, 1.5)
    train_flip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown Taskonomy tasks {unknown}; known: {TASKS}")
        if self.rgb_normalization not in ("minus_one_one", "caffe_bgr"):
            raise ValueError(f"rgb_normalization must be 'minus_one_one' or 'caffe_bgr', not {self.rgb_normalization!r}")
        if self.rgb_resize not in ("nearest", "bilinear", "area"):
            raise ValueError(f"rgb_resize must be 'nearest', 'bilinear' or 'area', not {self.rgb_resize!r}")
        if self.segmentation_mask not in ("none", "ignore_uncertain_background"):
            raise ValueError(f"segmentation_mask must be 'none' or 'ignore_uncertain_background', not {self.segmentation_mask!r}")

    @property
    def mask_rule(self) -> str:
        """Short name of the mask rules in force, for reports (e.g. 'seg=none,normal=unmasked')."""
        return f"seg={self.segmentation_mask},normal={'masked' if self.mask_invalid_normals else 'unmasked'}"

    def describe(self) -> dict:
        """Every field as plain data (store it next to reported metrics)."""
        return {**dataclasses.asdict(self), "mask_rule": self.mask_rule}

    @property
    def members(self) -> tuple[str, ...]:
        """Shard members (without '.png') this protocol decodes."""
        return ("rgb",) + self.tasks

    # -- normalisation ------------------------------------------------------------------------------------
    def normalize_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W]."""
        x = rgb.astype(np.float32)
        if self.rgb_normalization == "minus_one_one":
            x = x * np.float32(2.0 / 255.0) - np.float32(1.0)
        else:
            x = x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def to_targets(self, raw: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Raw decoded arrays (optionally with ``raw[VALID_KEY]``) -> (rgb [3,H,W], targets, masks)."""
        rgb_raw = raw["rgb"]
        if rgb_raw.ndim != 3 or rgb_raw.shape[2] != 3:
            raise CorruptSampleError(f"rgb must be [H, W, 3], got shape {rgb_raw.shape}")
        h, w = rgb_raw.shape[:2]
        valid = raw.get(VALID_KEY)
        valid = np.ones((h, w), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        rgb = self.normalize_rgb(rgb_raw)
        rgb[:, ~valid] = 0.0
        targets: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            value = raw[task]
            expected = (h, w, 3) if task == "normal" else (h, w)
            if value.shape != expected:
                raise CorruptSampleError(f"{task} must have shape {expected}, got {value.shape}")
            target, mask = getattr(self, f"_{task}")(value)
            if task == "segment_semantic":
                target[~valid] = 255  # cross-entropy ignore index for padded pixels
            targets[task] = torch.from_numpy(target)
            masks[task] = torch.from_numpy(mask & valid)
        return torch.from_numpy(rgb), targets, masks

    def _segment_semantic(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = s.astype(np.int64)
        target = np.where(s == 0, 1, s) - 1
        if self.segmentation_mask == "none":
            mask = np.ones(s.shape, dtype=bool)
        else:
            mask = s >= 2
        return target, mask

    def _normal(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        target = np.ascontiguousarray((n.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)).transpose(2, 0, 1))
        if self.mask_invalid_normals:
            mask = ~np.all(n == 128, axis=-1)
        else:
            mask = np.ones(n.shape[:2], dtype=bool)
        return target, mask

    def _depth_zbuffer(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = d.astype(np.int32)
        target = (np.log1p(d.astype(np.float64)) / _LOG_65536).astype(np.float32)[None]
        return target, d < self.depth_valid_below

    @staticmethod
    def _clipped(x: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
        v = np.clip(x.astype(np.int32).astype(np.float64) / 65536.0, 0.0, clip) / clip * 2.0 - 1.0
        return v.astype(np.float32)[None], np.ones(x.shape, dtype=bool)

    def _keypoints2d(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._clipped(k, self.keypoints_clip)

    def _edge_texture(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._clipped(e, self.edge_clip)


# ---------------------------------------------------------------------------------------------------- CelebA
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
    rgb = np.ascontiguousarray((image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)).transpose(2, 0, 1))
    return torch.from_numpy(rgb), torch.from_numpy((attrs > 0).astype(np.float32))
