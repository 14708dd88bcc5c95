"""Raw Taskonomy -> webdataset shards (schema: docs/data-schema.md).

Reads any of the three raw layouts with either domain-name set:

- ``{root}/{domain}/taskonomy/{building}/point_{p}_view_{v}_domain_{domain}.png`` (Omnidata downloader),
- ``{root}/{domain}/{building}/...`` (other loaders),
- ``{root}/{building}/{domain}/...`` (the 2018 release, with ``depth``, ``segmentsemantic``, ``edge2d``,
  ``keypoint2d`` as domain names),

keeps the views of the split's buildings whose rgb decodes, resizes 512 -> 256 by cv2-equivalent nearest
(``a[::2, ::2]``), shuffles the views across buildings with a fixed seed and packs ~``samples_per_shard`` views
per shard. A view whose rgb is valid but some task's file is missing or corrupt is kept with the tasks it has:
its ``labels.json`` member lists them (a view with every task has no such member) and the manifest counts each
split's labels per task (``"labels"``). Views without a valid rgb or without any task are skipped and logged to
``skipped.tsv``. Every finished shard is renamed into place and recorded in ``progress.json``, so an
interrupted conversion resumes after its last finished shard without duplicating or losing views
(:mod:`l2b_fast.data.resumable`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from l2b_fast.data import shards
from l2b_fast.data.labels import LABELS_MEMBER
from l2b_fast.data.resumable import ResumableConversion, error_reason
from l2b_fast.datasets.taskonomy.protocol import TASKS

DOMAINS = ("rgb", "depth_zbuffer", "normal", "edge_texture", "keypoints2d", "segment_semantic")
DOMAIN_ALIASES = {
    "rgb": ("rgb",),
    "depth_zbuffer": ("depth_zbuffer", "depth"),
    "normal": ("normal",),
    "edge_texture": ("edge_texture", "edge2d"),
    "keypoints2d": ("keypoints2d", "keypoint2d"),
    "segment_semantic": ("segment_semantic", "segmentsemantic"),
}
# dtype and channels of each raw encoding (TASKONOMY.md, "Encodings").
ENCODINGS = {
    "rgb": (np.uint8, 3),
    "depth_zbuffer": (np.uint16, 1),
    "normal": (np.uint8, 3),
    "edge_texture": (np.uint16, 1),
    "keypoints2d": (np.uint16, 1),
    "segment_semantic": (np.uint8, 1),
}
# Official tiny split (train_val_test_tiny.csv of the Taskonomy repository).
TINY_SPLIT = {
    "train": (
        "hanson merom klickitat onaga leonardo marstons newfields pinesdale lakeville cosmos benevolence pomaria "
        "tolstoy shelbyville allensville wainscott beechwood coffeen stockman hiteman woodbine lindenwood forkland "
        "mifflinburg ranchester"
    ).split(),
    "val": "wiconisco corozal collierville markleeville darden".split(),
    "test": "ihlen muleshoe uvalda noxapater mcdade".split(),
}
FILE_PATTERN = re.compile(r"point_(\d+)_view_(\d+)_domain_([A-Za-z0-9_]+)\.png$")

ViewKey = tuple[str, int, int]  # (building, point, view)


def view_name(key: ViewKey) -> str:
    building, point, view = key
    return f"{building}_point_{point}_view_{view}"


def find_views(root: str | Path, buildings: Iterable[str]) -> dict[ViewKey, dict[str, Path]]:
    """Every view of ``buildings`` found under ``root`` in any layout: {view: {domain: file}}."""
    root = Path(root)
    views: dict[ViewKey, dict[str, Path]] = {}
    for building in buildings:
        for domain, names in DOMAIN_ALIASES.items():
            for name in names:
                for folder in (root / name / "taskonomy" / building, root / name / building, root / building / name):
                    if not folder.is_dir():
                        continue
                    for path in folder.iterdir():
                        match = FILE_PATTERN.search(path.name)
                        if match and match.group(3) in names:
                            key = (building, int(match.group(1)), int(match.group(2)))
                            views.setdefault(key, {}).setdefault(domain, path)
    return views


def decode(path: Path, domain: str) -> np.ndarray:
    """The raw array of one file, checked against its domain's encoding (ValueError if it does not match)."""
    try:
        array = shards.decode_png(path.read_bytes())
    except (OSError, ValueError) as error:  # unreadable, truncated, not a PNG
        raise ValueError(f"cannot decode {path.name}: {error_reason(error)}") from error
    dtype, channels = ENCODINGS[domain]
    if array.ndim == 3 and channels == 1:
        array = array[..., 0]
    if array.dtype != dtype or (array.ndim == 3) != (channels == 3) or (channels == 3 and array.shape[2] < 3):
        raise ValueError(
            f"{path.name}: expected {np.dtype(dtype).name} with {channels} channel(s), got {array.dtype} {array.shape}"
        )
    return array[..., :3] if channels == 3 else array


def _load_domain(files: dict[str, Path], domain: str, size: int) -> bytes:
    """One domain's file at ``size`` as PNG bytes, or ValueError naming what is wrong."""
    if domain not in files:
        raise ValueError(f"missing {domain}")
    array = decode(files[domain], domain)
    if array.shape[0] != array.shape[1] or array.shape[0] % size:
        raise ValueError(f"{files[domain].name}: {array.shape[:2]} cannot be resized to {size}x{size} by nearest")
    step = array.shape[0] // size
    return shards.encode_png(np.ascontiguousarray(array[::step, ::step]))  # cv2 INTER_NEAREST


def load_view(files: dict[str, Path], size: int) -> dict[str, bytes]:
    """The members of one view at ``size`` (512 or 256): rgb and every task whose file is there and decodes,
    with ``labels.json`` (the tasks kept) when one is missing or corrupt; ValueError if the rgb is missing or
    corrupt or no task is usable."""
    members = {"rgb.png": _load_domain(files, "rgb", size)}
    problems = []
    for domain in DOMAINS[1:]:
        try:
            members[f"{domain}.png"] = _load_domain(files, domain, size)
        except ValueError as error:
            problems.append(str(error))
    labels = [domain for domain in DOMAINS[1:] if f"{domain}.png" in members]
    if not labels:
        raise ValueError(f"no task label: {'; '.join(problems)}")
    if problems:
        members[LABELS_MEMBER] = json.dumps([task for task in TASKS if task in labels]).encode()
    return members


def _no_views_message(root: Path, split: str) -> str:
    entries = sorted(path.name for path in root.iterdir())
    found = f"it holds {', '.join(entries[:6])}{' ...' if len(entries) > 6 else ''}" if entries else "it is empty"
    example = TINY_SPLIT["train"][0]
    return (
        f"no Taskonomy view of the {split} split's buildings under {root} ({found}); expected files like "
        f"{root}/rgb/taskonomy/{example}/point_0_view_0_domain_rgb.png, {root}/rgb/{example}/... or "
        f"{root}/{example}/rgb/... for the buildings {', '.join(TINY_SPLIT['train'][:3])}, ..."
    )


def convert(
    root: str | Path,
    out: str | Path,
    *,
    split: str = "tiny",
    size: int = 256,
    samples_per_shard: int = 1000,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict:
    """Converts the ``split`` ("tiny") buildings under ``root`` into shards in ``out``; returns the manifest."""
    if split != "tiny":
        raise ValueError(f"unknown split {split!r}: supported: tiny")
    if size not in (256, 512):
        raise ValueError(f"size must be 256 or 512, got {size}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"no raw Taskonomy directory at {root}")
    views_by_part = {part: find_views(root, buildings) for part, buildings in TINY_SPLIT.items()}
    if not any(views_by_part.values()):  # checked before anything is written
        raise ValueError(_no_views_message(root, split))
    settings = {"root": str(root.resolve()), "split": split, "size": size, "seed": seed}
    conversion = ResumableConversion(
        out,
        settings,
        samples_per_shard=samples_per_shard,
        resume=resume,
        progress=progress,
        stop_after_shards=stop_after_shards,
        unit="views",
    )
    for part, views in views_by_part.items():
        order = sorted(views)
        np.random.default_rng(seed).shuffle(order)  # across buildings, reproducibly

        def load(key: ViewKey) -> dict[str, bytes]:
            building, point, view = key
            meta = {"building": building, "point": point, "view": view, "size": size}
            return {**load_view(views[key], size), "json": json.dumps(meta).encode()}

        if not conversion.pack(part, order, view_name, load, tasks=TASKS):
            return {}
    return conversion.manifest("taskonomy", size, seed, created_by="l2b_fast.datasets.taskonomy.convert")
