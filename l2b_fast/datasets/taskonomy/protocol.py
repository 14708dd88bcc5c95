"""Decoding, augmentation and normalisation of Taskonomy samples (raw encodings: docs/data-schema.md).

Everything works on whole numpy arrays (no per-pixel Python). The pipeline is

    decode_png (raw uint8/uint16 arrays)  ->  resize_raw (working resolution)  ->  augment (train only, RAW values)
    ->  TaskonomyProtocol.to_targets (normalised float tensors + boolean masks)
    or  TaskonomyProtocol.raw_tensors  ->  (batch, move to the GPU)  ->  TaskonomyProtocol.to_targets_batch

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
import functools
import math
from collections.abc import Mapping

import numpy as np
import torch

from l2b_fast.data.images import (
    CorruptSampleError,
    decode_png,
    nearest_index,
    pillow_image,
    resize_nearest,
    resize_rgb,
)

__all__ = [
    "TASKS",
    "VALID_KEY",
    "LABELLED_KEY",
    "PAD_VALUES",
    "CAFFE_BGR_MEAN",
    "CorruptSampleError",
    "decode_png",
    "TaskonomyProtocol",
    "resize_raw",
    "augment",
    "augment_reference",
]

#: Taskonomy task names in the order of the paper's Table 2 (also the shard member stems: ``{task}.png``).
TASKS: tuple[str, ...] = ("segment_semantic", "normal", "depth_zbuffer", "keypoints2d", "edge_texture")

#: Key of the boolean "this pixel came from the image" array that augmentation adds to a raw dict.
VALID_KEY = "_valid"

#: Key of the optional boolean [len(tasks)] "this sample is labelled with the task" array of a raw dict (added
#: after augmentation, which only sees maps): an unlabelled task's mask is all False and its segmentation
#: target all 255, whatever its (placeholder) raw map holds.
LABELLED_KEY = "_labelled"

#: Raw value written into padded pixels (in the raw encodings; the masks are what matters).
PAD_VALUES: dict[str, int] = {
    "rgb": 0,
    "segment_semantic": 255,
    "normal": 128,
    "depth_zbuffer": 65535,
    "keypoints2d": 0,
    "edge_texture": 0,
}

#: dtype of each raw Taskonomy encoding (a map of another dtype is a corrupt sample).
RAW_DTYPES: dict[str, type] = {
    "rgb": np.uint8,
    "segment_semantic": np.uint8,
    "normal": np.uint8,
    "depth_zbuffer": np.uint16,
    "keypoints2d": np.uint16,
    "edge_texture": np.uint16,
}

#: Caffe/AdaShare ImageNet mean in BGR order (subtracted from 0..255 BGR values; no scaling).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

_LOG_65536 = math.log(65536.0)


def resize_raw(
    raw: Mapping[str, np.ndarray], size: int | tuple[int, int], rgb_method: str = "nearest"
) -> dict[str, np.ndarray]:
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
    return _negate_normal_x(np.array(normal[:, ::-1]))


def _invalid_normals(normal):
    """bool [..., H, W]: pixels of a raw normal map (numpy or torch, [..., 3] last) that are exactly (128,128,128)."""
    return (normal[..., 0] == 128) & (normal[..., 1] == 128) & (normal[..., 2] == 128)


def _negate_normal_x(normal: np.ndarray) -> np.ndarray:
    """In place on a writable [H, W, 3] uint8 map: x -> 255 - x except on invalid (128,128,128) pixels."""
    normal[..., 0] = np.where(_invalid_normals(normal), np.uint8(128), np.uint8(255) - normal[..., 0])
    return normal


def _draw_geometry(h, w, rng, scale, crop, flip):
    """The random draws of one augmentation, in a fixed order (factor, flip, crop offset)."""
    nh, nw = h, w
    if scale is not None:
        factor = float(rng.uniform(scale[0], scale[1]))
        nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    probability = (0.5 if flip else 0.0) if isinstance(flip, bool) else float(flip)
    flipped = probability > 0 and rng.random() < probability
    if crop is None:
        return nh, nw, flipped, (nh, nw), 0, 0
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    top = int(rng.integers(0, max(nh, ch) - ch + 1))
    left = int(rng.integers(0, max(nw, cw) - cw + 1))
    return nh, nw, flipped, (ch, cw), top, left


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

    Computes exactly what :func:`augment_reference` (scale, then flip, then pad and crop, whole images) does,
    but only for the output window: labels are one gather through the composed nearest/flip/crop indices and
    rgb is resized from the source box that maps onto the window. Labels and masks are identical; rgb differs
    by at most 2 levels on some pixels, without bias (Pillow's fixed-point weights depend on the sampling
    origin). ~3x faster at 256x256.
    """
    out = {key: np.asarray(value) for key, value in raw.items()}
    first = out["rgb"] if "rgb" in out else next(v for k, v in out.items() if k != VALID_KEY)
    h, w = first.shape[:2]
    nh, nw, flipped, (ch, cw), top, left = _draw_geometry(h, w, rng, scale, crop, flip)
    # The window inside the scaled (and flipped) image; what lies beyond it is padding at the bottom/right.
    r0, r1 = top, min(top + ch, nh)
    c0, c1 = left, min(left + cw, nw)
    s0, s1 = (nw - c1, nw - c0) if flipped else (c0, c1)  # the window's columns before flipping
    rows = nearest_index(h, nh)[r0:r1]
    cols = nearest_index(w, nw)[s0:s1]
    if flipped:
        cols = cols[::-1]
    result = {}
    for key, value in out.items():
        if key == "rgb":
            if (nh, nw) == (h, w):
                window = value[r0:r1, s0:s1]
            else:
                pil = pillow_image()
                box = (s0 * w / nw, r0 * h / nh, s1 * w / nw, r1 * h / nh)
                image = pil.fromarray(np.ascontiguousarray(value))
                window = np.asarray(image.resize((s1 - s0, r1 - r0), pil.BILINEAR, box=box))
            if flipped:
                window = window[:, ::-1]
        else:
            window = np.take(np.take(value, rows, axis=0), cols, axis=1)
        full = np.full(
            (ch, cw) + value.shape[2:], False if key == VALID_KEY else PAD_VALUES.get(key, 0), dtype=value.dtype
        )
        full[: r1 - r0, : c1 - c0] = window
        if key == "normal" and flipped:
            _negate_normal_x(full)  # padding is (128,128,128): stays invalid
        result[key] = full
    if VALID_KEY not in result:
        valid = np.zeros((ch, cw), dtype=bool)
        valid[: r1 - r0, : c1 - c0] = True
        result[VALID_KEY] = valid
    return result


def augment_reference(
    raw: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] | None = (0.5, 1.5),
    crop: int | tuple[int, int] | None = None,
    flip: bool | float = True,
) -> dict[str, np.ndarray]:
    """The plain definition of :func:`augment` (same arguments, same random draws): resize whole maps, flip,
    pad, crop. Kept as the reference the fast version is tested against."""
    out = {key: np.asarray(value) for key, value in raw.items()}
    first = out["rgb"] if "rgb" in out else next(v for k, v in out.items() if k != VALID_KEY)
    h, w = first.shape[:2]
    if VALID_KEY not in out:
        out[VALID_KEY] = np.ones((h, w), dtype=bool)
    nh, nw, flipped, (ch, cw), top, left = _draw_geometry(h, w, rng, scale, crop, flip)
    if (nh, nw) != (h, w):
        out = {
            key: (resize_rgb(v, nh, nw, "bilinear") if key == "rgb" else resize_nearest(v, nh, nw))
            for key, v in out.items()
        }
    if flipped:
        out = {
            key: (_flip_normal(v) if key == "normal" else np.ascontiguousarray(v[:, ::-1])) for key, v in out.items()
        }
    ph, pw = max(0, ch - nh), max(0, cw - nw)
    if ph or pw:
        padded = {}
        for key, v in out.items():
            fill = False if key == VALID_KEY else PAD_VALUES.get(key, 0)
            pad = ((0, ph), (0, pw)) + ((0, 0),) * (v.ndim - 2)
            padded[key] = np.pad(v, pad, mode="constant", constant_values=fill)
        out = padded
    return {key: np.ascontiguousarray(v[top : top + ch, left : left + cw]) for key, v in out.items()}


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
            raise ValueError(
                f"rgb_normalization must be 'minus_one_one' or 'caffe_bgr', not {self.rgb_normalization!r}"
            )
        if self.rgb_resize not in ("nearest", "bilinear", "area"):
            raise ValueError(f"rgb_resize must be 'nearest', 'bilinear' or 'area', not {self.rgb_resize!r}")
        if self.segmentation_mask not in ("none", "ignore_uncertain_background"):
            raise ValueError(
                f"segmentation_mask must be 'none' or 'ignore_uncertain_background', not {self.segmentation_mask!r}"
            )

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
    # Every target is an elementwise function of one raw 8- or 16-bit value, so it is computed once per
    # possible value (the formulas below, the reference) and applied as a table lookup (np.take): exact, and
    # ~8x faster than the float64 formulas on whole maps.
    def normalize_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W]."""
        if rgb.dtype != np.uint8:
            raise CorruptSampleError(f"rgb must be uint8, got {rgb.dtype}")
        out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
        for channel, (table, index) in enumerate(zip(self._tables["rgb"], self._rgb_source_channels)):
            np.take(table, rgb[..., index], out=out[channel])
        return out

    @property
    def _rgb_source_channels(self) -> tuple[int, int, int]:
        """The input channel behind each output channel (caffe_bgr reverses the order); one table per output."""
        return (0, 1, 2) if self.rgb_normalization == "minus_one_one" else (2, 1, 0)

    def rgb_values(self, values: np.ndarray) -> np.ndarray:
        """The rgb formula: uint8 values [..., 3] -> float32 [..., 3] (x/255*2-1, or BGR minus the Caffe mean)."""
        x = np.asarray(values).astype(np.float32)
        if self.rgb_normalization == "minus_one_one":
            return x * np.float32(2.0 / 255.0) - np.float32(1.0)
        return x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)

    def target_values(self, task: str, values: np.ndarray) -> np.ndarray:
        """The normalisation formula of ``task`` applied elementwise to raw values (the module docstring's table)."""
        x = np.asarray(values)
        if task == "segment_semantic":
            return np.where(x == 0, 1, x.astype(np.int64)) - 1  # raw 0 (uncertain) -> background
        if task == "normal":
            return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
        if task == "depth_zbuffer":
            return (np.log1p(x.astype(np.float64)) / _LOG_65536).astype(np.float32)
        clip = {"keypoints2d": self.keypoints_clip, "edge_texture": self.edge_clip}[task]
        return (np.clip(x.astype(np.float64) / 65536.0, 0.0, clip) / clip * 2.0 - 1.0).astype(np.float32)

    def target_mask(self, task: str, raw):
        """Which pixels of a raw map count (before padding is removed): bool [..., H, W].

        ``raw``: a numpy map in its raw encoding, or a torch tensor of the raw values (any integer dtype)."""
        if task == "segment_semantic" and self.segmentation_mask == "ignore_uncertain_background":
            return raw >= 2
        if task == "normal" and self.mask_invalid_normals:
            return ~_invalid_normals(raw)
        if task == "depth_zbuffer":
            return raw < self.depth_valid_below
        shape = raw.shape[:-1] if task == "normal" else raw.shape
        if isinstance(raw, torch.Tensor):
            return torch.ones(shape, dtype=torch.bool, device=raw.device)
        return np.ones(shape, dtype=bool)

    @functools.cached_property
    def _tables(self) -> dict:
        """Lookup tables built from the formulas: rgb (three channel tables) and every task's raw value range."""
        rgb = self.rgb_values(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))
        tables = {"rgb": [np.ascontiguousarray(rgb[:, channel]) for channel in range(3)]}
        for task in self.tasks:
            tables[task] = self.target_values(
                task, np.arange(np.iinfo(RAW_DTYPES[task]).max + 1, dtype=RAW_DTYPES[task])
            )
        return tables

    def _torch_tables(self, device: torch.device) -> dict:
        cache = self.__dict__.setdefault("_torch_table_cache", {})  # frozen dataclass: no attribute assignment
        if device not in cache:
            tables = self._tables
            cache[device] = {
                "rgb": torch.from_numpy(np.stack(tables["rgb"])).to(device),
                **{task: torch.from_numpy(tables[task]).to(device) for task in self.tasks},
            }
        return cache[device]

    def _check_raw(self, raw: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """(H, W) of a raw sample; CorruptSampleError unless every map has its encoding's dtype and shape."""
        rgb = raw["rgb"]
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise CorruptSampleError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        for task in self.tasks:
            value = raw[task]
            expected = (h, w, 3) if task == "normal" else (h, w)
            if value.shape != expected or value.dtype != RAW_DTYPES[task]:
                raise CorruptSampleError(
                    f"{task} must be {np.dtype(RAW_DTYPES[task]).name} {expected}, got {value.dtype} {value.shape}"
                )
        return h, w

    def to_targets(
        self, raw: Mapping[str, np.ndarray]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Raw decoded arrays (optionally with ``raw[VALID_KEY]``) -> (rgb [3,H,W], targets, masks)."""
        self._check_raw(raw)
        valid = raw.get(VALID_KEY)
        valid = None if valid is None else np.asarray(valid, dtype=bool)
        padded = valid is not None and not valid.all()
        rgb = self.normalize_rgb(raw["rgb"])
        if padded:
            rgb *= valid  # padded pixels -> 0
        targets: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        labelled = raw.get(LABELLED_KEY)
        for index, task in enumerate(self.tasks):
            value, table = raw[task], self._tables[task]
            if task == "normal":
                target = np.take(table, np.moveaxis(value, 2, 0))  # [3, H, W] straight out of the lookup
            elif task == "segment_semantic":
                target = np.take(table, value)
            else:
                target = np.take(table, value)[None]
            mask = self.target_mask(task, value)
            if padded:
                mask &= valid
                if task == "segment_semantic":
                    np.putmask(target, ~valid, 255)  # cross-entropy ignore index for padded pixels
            if labelled is not None and not labelled[index]:
                mask[...] = False
                if task == "segment_semantic":
                    target[...] = 255
            targets[task] = torch.from_numpy(target)
            masks[task] = torch.from_numpy(mask)
        return torch.from_numpy(rgb), targets, masks

    # -- normalising on the GPU -----------------------------------------------------------------------------
    def raw_tensors(self, raw: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A raw (augmented) sample as CPU tensors for :meth:`to_targets_batch`, ~3.5x fewer bytes than the
        targets: rgb, the protocol's tasks, ``VALID_KEY`` (all True if absent) and ``LABELLED_KEY`` (all True if
        absent). uint16 maps travel as int16
        bit patterns (torch's uint16 has no arithmetic); :meth:`to_targets_batch` widens them back."""
        h, w = self._check_raw(raw)
        out = {}
        for key in self.members:
            value = raw[key]
            out[key] = torch.from_numpy(value.view(np.int16) if value.dtype == np.uint16 else value)
        valid = raw.get(VALID_KEY)
        out[VALID_KEY] = (
            torch.ones((h, w), dtype=torch.bool) if valid is None else torch.from_numpy(np.asarray(valid, dtype=bool))
        )
        labelled = raw.get(LABELLED_KEY)
        out[LABELLED_KEY] = (
            torch.ones(len(self.tasks), dtype=torch.bool)
            if labelled is None
            else torch.from_numpy(np.array(labelled, dtype=bool))
        )
        return out

    def to_targets_batch(self, raw: Mapping[str, torch.Tensor], device=None, non_blocking: bool = True):
        """:meth:`to_targets` for a batch of :meth:`raw_tensors` ([B, H, W(, 3)] each), on ``device``.

        Returns ``(rgb [B,3,H,W], {task: target [B,...]}, {task: mask [B,H,W]})`` with exactly the values of
        ``to_targets`` (same lookup tables). Moving the raw batch to the GPU and normalising there takes the
        normalisation off the loader workers and sends ~3.5x fewer bytes through them; no host sync.
        """
        device = raw["rgb"].device if device is None else torch.device(device)
        tables = self._torch_tables(device)
        moved = {key: value.to(device, non_blocking=non_blocking) for key, value in raw.items()}
        valid = moved[VALID_KEY]
        rgb_raw = moved["rgb"].long()
        rgb = torch.stack(
            [tables["rgb"][channel][rgb_raw[..., index]] for channel, index in enumerate(self._rgb_source_channels)],
            dim=1,
        )
        rgb = rgb * valid[:, None]
        targets, masks = {}, {}
        labelled = moved.get(LABELLED_KEY)  # [B, tasks] (batches of raw_tensors before it carried one: absent)
        for task_index, task in enumerate(self.tasks):
            value = moved[task]
            index = (value.int() & 0xFFFF).long() if RAW_DTYPES[task] == np.uint16 else value.long()
            target = tables[task][index]
            if task == "normal":
                target = target.permute(0, 3, 1, 2).contiguous()
            elif task == "segment_semantic":
                target = torch.where(valid, target, 255)
            else:
                target = target.unsqueeze(1)
            mask = self.target_mask(task, index) & valid
            if labelled is not None:
                has_label = labelled[:, task_index, None, None]
                mask = mask & has_label
                if task == "segment_semantic":
                    target = torch.where(has_label, target, 255)
            targets[task] = target
            masks[task] = mask
        return rgb, targets, masks
