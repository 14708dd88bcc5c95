"""Raw CelebA (the aligned-and-cropped release) -> webdataset shards (schema: docs/data-schema.md).

Finds the image folder and the two annotation files independently among the usual layouts (:data:`IMAGE_DIRS`,
:data:`ATTRIBUTE_FILES`, :data:`PARTITION_FILES`: flat, the official Google-Drive folders ``Img/``, ``Anno/``,
``Eval/``, and Kaggle's edition with CSV annotations), parses the annotations strictly, shuffles each official
split with a fixed seed and packs ~``samples_per_shard`` images per shard. Every image is stored as its original
JPEG bytes (lossless, and no re-encoding cost), attributes as 0/1. Missing or undecodable images are skipped and
logged to ``skipped.tsv``; ``resume=True`` continues an interrupted conversion exactly
(:mod:`l2b_fast.data.resumable`).
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from l2b_fast.data.dependencies import import_data_package
from l2b_fast.data.resumable import ResumableConversion, error_reason
from l2b_fast.datasets.celeba.synthetic import ATTRIBUTES

__all__ = ["convert", "find_inputs", "read_attributes", "read_partition", "read_image", "SPLITS", "OFFICIAL_COUNTS"]

SPLITS = ("train", "val", "test")  # list_eval_partition values 0, 1, 2
OFFICIAL_COUNTS = {"train": 162_770, "val": 19_867, "test": 19_962}
# Candidates relative to the root, first found wins. Kaggle nests the image folder in one of the same name, so
# its candidate comes before the flat one.
IMAGE_DIRS = ("img_align_celeba/img_align_celeba", "img_align_celeba", "Img/img_align_celeba")
ATTRIBUTE_FILES = ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt", "list_eval_partition.csv")
IMAGE_NAME = re.compile(r"[^./\\\s]+\.jpg")  # the stem becomes the sample key, which must not contain '.' or '/'


def find_inputs(root: str | Path) -> tuple[Path, Path, Path]:
    """(image folder, attribute file, partition file) under ``root``; FileNotFoundError naming the candidates."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no raw CelebA directory at {root}")
    found = []
    for what, candidates, exists in (
        ("image folder", IMAGE_DIRS, Path.is_dir),
        ("attribute file", ATTRIBUTE_FILES, Path.is_file),
        ("partition file", PARTITION_FILES, Path.is_file),
    ):
        path = next((root / candidate for candidate in candidates if exists(root / candidate)), None)
        if path is None:
            raise FileNotFoundError(f"no CelebA {what} under {root}: looked for {', '.join(candidates)}")
        found.append(path)
    return found[0], found[1], found[2]


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line: whitespace-separated (.txt) or comma-separated (.csv)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            rows.append(
                (number, [field.strip() for field in line.split(",")] if path.suffix == ".csv" else line.split())
            )
    if not rows:
        raise ValueError(f"{path}: empty file")
    return rows


def _add_image(path: Path, number: int, name: str, table: dict, value) -> None:
    if not IMAGE_NAME.fullmatch(name):
        raise ValueError(f"{path}:{number}: bad image name {name!r} (expected e.g. 000001.jpg)")
    if name in table:
        raise ValueError(f"{path}:{number}: duplicate image {name}")
    table[name] = value


def read_attributes(path: str | Path) -> dict[str, list[int]]:
    """{image name: 40 attributes as 0/1 in :data:`ATTRIBUTES` order} from list_attr_celeba.txt (count line,
    names line, ``000001.jpg -1  1 ...``) or Kaggle's list_attr_celeba.csv (``image_id,5_o_Clock_Shadow,...``
    header, ``000001.jpg,-1,1,...``). ValueError naming the file and line for anything off the format."""
    path = Path(path)
    rows = _rows(path)
    declared = None
    if path.suffix == ".csv":
        (number, header), rows = rows[0], rows[1:]
        if header[0] != "image_id":
            raise ValueError(f"{path}:{number}: expected a header starting with image_id, got {header[0]!r}")
        names = header[1:]
    else:
        (count_number, count), rows = rows[0], rows[1:]
        if len(count) != 1 or not count[0].isdigit():
            raise ValueError(f"{path}:{count_number}: expected the number of images, got {' '.join(count)!r}")
        if not rows:
            raise ValueError(f"{path}:{count_number + 1}: expected the attribute names, got the end of the file")
        declared = int(count[0])
        (number, names), rows = rows[0], rows[1:]
    if len(names) != len(ATTRIBUTES):
        raise ValueError(f"{path}:{number}: expected {len(ATTRIBUTES)} attribute names, got {len(names)}")
    if tuple(names) != ATTRIBUTES:
        position = next(i for i, (name, standard) in enumerate(zip(names, ATTRIBUTES)) if name != standard)
        raise ValueError(
            f"{path}:{number}: attribute {position + 1} is {names[position]!r}, expected "
            f"{ATTRIBUTES[position]!r} (the standard names in the standard order)"
        )
    attributes: dict[str, list[int]] = {}
    for number, (name, *values) in rows:
        if len(values) != len(ATTRIBUTES):
            raise ValueError(f"{path}:{number}: expected {len(ATTRIBUTES)} values after {name}, got {len(values)}")
        bad = next((value for value in values if value not in ("-1", "1")), None)
        if bad is not None:
            raise ValueError(f"{path}:{number}: attribute value {bad!r} is not -1 or 1")
        _add_image(path, number, name, attributes, [int(value == "1") for value in values])
    if declared is not None and declared != len(attributes):
        raise ValueError(f"{path}:{count_number}: says {declared} images but the file lists {len(attributes)}")
    return attributes


def read_partition(path: str | Path) -> dict[str, str]:
    """{image name: "train" | "val" | "test"} from list_eval_partition.txt (``000001.jpg 0``) or Kaggle's
    list_eval_partition.csv (``image_id,partition`` header); ValueError naming the file and line."""
    path = Path(path)
    rows = _rows(path)
    if path.suffix == ".csv":
        (number, header), rows = rows[0], rows[1:]
        if header != ["image_id", "partition"]:
            raise ValueError(f"{path}:{number}: expected the header image_id,partition, got {','.join(header)!r}")
    partition: dict[str, str] = {}
    for number, fields in rows:
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(
                f"{path}:{number}: expected an image name and 0 (train), 1 (val) or 2 (test), got {' '.join(fields)!r}"
            )
        _add_image(path, number, fields[0], partition, SPLITS[int(fields[1])])
    return partition


def read_image(path: Path, verify: bool) -> bytes:
    """The file's bytes; with ``verify``, only if it is a JPEG that decodes fully and converts to RGB as the
    loader does (Pillow). ValueError naming the problem otherwise."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path.name}: {error.strerror or error}") from error
    if verify:
        Image = import_data_package("PIL.Image")

        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.load()  # decodes every scan: a truncated file fails here, not at training time
                image.convert("RGB")
        except Exception as error:  # Pillow raises OSError, SyntaxError, struct.error... for broken files
            raise ValueError(f"cannot decode {path.name}: {type(error).__name__}: {error_reason(error)}") from error
        if image_format != "JPEG":
            raise ValueError(f"{path.name} is {image_format}, not JPEG")
    return data


def _image_size(folder: Path, names: list[str]) -> list[int] | None:
    """[H, W] of the first image, in ``names`` order, whose header Pillow reads (None if none does)."""
    Image = import_data_package("PIL.Image")

    for name in names:
        try:
            with Image.open(folder / name) as image:
                return [image.height, image.width]
        except OSError:
            continue
    return None


def _stem(name: str) -> str:
    return name[: -len(".jpg")]


def convert(
    root: str | Path,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
    verify_images: bool = True,
) -> dict:
    """Converts the CelebA release under ``root`` into train/val/test shards in ``out``; returns the manifest
    ({} when ``stop_after_shards`` ended it early).

    The manifest's ``size`` is [H, W] of the first image by file name (218 x 178 in the real release; the
    aligned images all share it), ``official_counts`` whether the split sizes are CelebA's (a warning is
    printed otherwise). ``verify_images=False`` skips only missing files, not undecodable ones.
    """
    images, attribute_file, partition_file = find_inputs(root)
    attributes, partition = read_attributes(attribute_file), read_partition(partition_file)
    only_partition, only_attributes = (
        sorted(partition.keys() - attributes.keys()),
        sorted(attributes.keys() - partition.keys()),
    )
    if only_partition or only_attributes:
        raise ValueError(
            f"{partition_file} and {attribute_file} list different images: {len(only_partition)} only in the partition "
            f"{only_partition[:3]}, {len(only_attributes)} only in the attributes {only_attributes[:3]}"
        )
    names = sorted(partition)
    split_images = {split: [name for name in names if partition[name] == split] for split in SPLITS}
    counts = {split: len(split_names) for split, split_names in split_images.items()}
    official_counts = counts == OFFICIAL_COUNTS
    if not official_counts:
        print(
            f"warning: {partition_file} has {counts} images per split, not the official {OFFICIAL_COUNTS}; "
            "converting anyway",
            file=sys.stderr,
        )
    settings = {"root": str(Path(root).resolve()), "seed": seed, "verify_images": verify_images}
    conversion = ResumableConversion(
        out,
        settings,
        samples_per_shard=samples_per_shard,
        resume=resume,
        progress=progress,
        stop_after_shards=stop_after_shards,
        unit="images",
    )
    for split, split_names in split_images.items():
        order = [split_names[i] for i in np.random.default_rng(seed).permutation(len(split_names))]

        def load(name: str) -> dict[str, bytes]:
            return {
                "jpg": read_image(images / name, verify_images),
                "attr.json": json.dumps({"attributes": attributes[name]}, sort_keys=True).encode(),
                "json": json.dumps({"image": name, "split": split}, sort_keys=True).encode(),
            }

        if not conversion.pack(split, order, _stem, load):
            return {}
    return conversion.manifest(
        "celeba",
        _image_size(images, names),
        seed,
        created_by="l2b_fast.datasets.celeba.convert",
        attributes=list(ATTRIBUTES),
        official_counts=official_counts,
    )
