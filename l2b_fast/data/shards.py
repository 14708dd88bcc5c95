"""Writing and reading webdataset shards and their manifest (schema: docs/data-schema.md).

Shared by the synthetic generators (and usable by converters) so every writer produces the same layout:
``{split}-{index:06d}.tar`` files plus one ``manifest.json`` per output directory. Shards are written with
``webdataset.TarWriter`` without its encoders (they would turn 16-bit PNGs into 8-bit ones) and with a fixed
mtime, so the same samples give byte-identical tars (reproducible data sets, cacheable checksums).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from l2b_fast.data.dependencies import import_data_package
from l2b_fast.data.images import decode_png, encode_png, png_decoder  # noqa: F401 (the shard encodings)

__all__ = [
    "encode_png",
    "decode_png",
    "png_decoder",
    "split_counts",
    "prepare_output_dir",
    "write_split",
    "write_manifest",
    "read_manifest",
    "shard_paths",
    "MANIFEST",
]

MANIFEST = "manifest.json"
# A conversion's own files beside the shards (l2b_fast.data.resumable): its progress and the skipped samples.
PROGRESS = "progress.json"
SKIPPED_LOG = "skipped.tsv"


# ------------------------------------------------------------------------------------------------ PNG codec
_SHARD_FILE = re.compile(r"[^./]+-\d{6}\.tar(\.partial)?")


def _is_pipeline_file(path: Path) -> bool:
    """A file the shard writers and converters create: shards (whole or partial), manifest, progress, skip log."""

    names = {MANIFEST, MANIFEST + ".tmp", PROGRESS, Path(PROGRESS).with_suffix(".tmp").name, SKIPPED_LOG}
    return path.is_file() and (path.name in names or _SHARD_FILE.fullmatch(path.name) is not None)


def prepare_output_dir(out_dir, *, overwrite: bool = False) -> Path:
    """An empty directory for a new shard set (created if missing), so no stale shard of an earlier run is
    left for a glob to pick up.

    A non-empty ``out_dir`` is refused (ValueError) unless ``overwrite``; with ``overwrite`` its shard-set files
    (``*-NNNNNN.tar``, partial shards, manifest, progress file, skip log) are deleted first, and a directory that
    holds anything else is still refused: this never deletes files it did not write.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries:
        shown = ", ".join(entry.name for entry in entries[:4]) + (" ..." if len(entries) > 4 else "")
        if not overwrite:
            raise ValueError(
                f"output directory {out} is not empty ({shown}): new shards would mix with old ones; pass "
                "--overwrite to replace a shard directory, or choose another --out"
            )
        foreign = [entry.name for entry in entries if not _is_pipeline_file(entry)]
        if foreign:
            raise ValueError(
                f"output directory {out} holds files that are not shards "
                f"({', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}): --overwrite only replaces a "
                "shard directory; choose another --out"
            )
        for entry in entries:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _member_bytes(key: str, name: str, value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if name == "json" or name.endswith(".json"):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if isinstance(value, np.ndarray) and name.endswith("png"):
        return encode_png(value)
    raise ValueError(
        f"sample {key!r}: member {name!r} must be bytes, str, a JSON value (for *.json) or an array (for *.png), "
        f"got {type(value).__name__}"
    )


def write_tar(path: Path, samples: list[dict]) -> None:
    wds = import_data_package("webdataset")

    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0.0)  # no encoders: 16-bit PNGs stay 16-bit
        for sample in samples:
            writer.write(sample)
        writer.close()
    os.replace(temporary, path)  # an interrupted write leaves a .partial file, never a half shard


def write_split(samples: Iterable[dict], out_dir, split: str, *, samples_per_shard: int = 1000) -> dict:
    """Pack ``samples`` (in the given order: shuffle before calling) into ``{split}-{index:06d}.tar`` files.

    Each sample is a dict with ``"__key__"`` (no '.', unique within the split) and members named by extension
    (``"rgb.png"``, ``"json"``, ``"attr.json"``...) whose values are bytes, str, JSON values (for ``json`` /
    ``*.json``) or uint8/uint16 arrays (for ``*.png``, encoded with :func:`encode_png`). Samples are consumed
    lazily (one shard in memory at a time). Returns the split's manifest entry
    ``{"shards": [file names], "samples": [count per shard], "total": n}``; no samples -> no shards.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not split or "/" in split or "." in split:
        raise ValueError(f"bad split name {split!r} (shard names are {{split}}-{{index:06d}}.tar)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entry = {"shards": [], "samples": [], "total": 0}
    seen: set[str] = set()
    buffer: list[dict] = []

    def flush():
        name = f"{split}-{len(entry['shards']):06d}.tar"
        write_tar(out / name, buffer)
        entry["shards"].append(name)
        entry["samples"].append(len(buffer))
        entry["total"] += len(buffer)
        buffer.clear()

    for sample in samples:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"bad sample key {key!r}: a non-empty str without '.' or '/' is required")
        if key in seen:
            raise ValueError(f"duplicate sample key {key!r} in split {split!r}")
        seen.add(key)
        members = {name: _member_bytes(key, name, value) for name, value in sample.items() if not name.startswith("_")}
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        buffer.append({"__key__": key, **members})
        if len(buffer) == samples_per_shard:
            flush()
    if buffer:
        flush()
    return entry


def write_manifest(out_dir, dataset: str, size, splits: Mapping[str, dict], seed, **extra) -> dict:
    """Write ``manifest.json`` (atomically) and return it.

    ``{"dataset", "size", "splits": {split: {"shards", "samples", "total"}}, "created_by", "seed", **extra}``;
    pass ``created_by=...`` in ``extra`` to name the writer (default ``l2b_fast.data.shards``).
    """
    manifest = {
        "dataset": dataset,
        "size": size,
        "splits": {name: dict(entry) for name, entry in splits.items()},
        "created_by": extra.pop("created_by", "l2b_fast.data.shards"),
        "seed": seed,
        **extra,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, out / MANIFEST)
    return manifest


# ------------------------------------------------------------------------------------------------ reading
def read_manifest(out_dir) -> dict:
    """Load and check ``{out_dir}/manifest.json``; ValueError (naming the problem) if it is missing, not JSON,
    lacks a field, has inconsistent counts, or lists a shard file that does not exist.

    It does not open the tars (cheap enough to call at every loader start)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no manifest: {path} does not exist (is {out_dir} a shard directory?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt manifest {path}: {error}") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"corrupt manifest {path}: top level is {type(manifest).__name__}, not an object")
    for field in ("dataset", "size", "splits"):
        if field not in manifest:
            raise ValueError(f"corrupt manifest {path}: missing field {field!r}")
    if not isinstance(manifest["splits"], dict):
        raise ValueError(f"corrupt manifest {path}: 'splits' is not an object")
    missing = []
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not all(k in entry for k in ("shards", "samples", "total")):
            raise ValueError(f"corrupt manifest {path}: split {split!r} needs 'shards', 'samples' and 'total'")
        shards, counts = entry["shards"], entry["samples"]
        if not isinstance(shards, list) or not isinstance(counts, list) or len(shards) != len(counts):
            raise ValueError(
                f"corrupt manifest {path}: split {split!r} has {len(shards)} shards but {len(counts)} counts"
            )
        if sum(counts) != entry["total"]:
            raise ValueError(
                f"corrupt manifest {path}: split {split!r} counts sum to {sum(counts)}, total says {entry['total']}"
            )
        missing += [name for name in shards if not (Path(out_dir) / name).is_file()]
    if missing:
        raise ValueError(
            f"manifest {path} lists {len(missing)} missing shard file(s): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return manifest


def shard_paths(out_dir, split: str) -> list[str]:
    """Full paths of a split's shards in manifest order (what the loaders take as ``urls``)."""
    manifest = read_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in the manifest of {out_dir} (has {sorted(manifest['splits'])})")
    return [str(Path(out_dir) / name) for name in manifest["splits"][split]["shards"]]


def split_counts(n: int, splits) -> list[tuple[str, int]]:
    """``n`` samples over named ``splits`` ``[(name, fraction), ...]`` (floors; the rest to the first split)."""
    names = [name for name, _ in splits]
    fractions = np.array([float(f) for _, f in splits])
    if len(set(names)) != len(names) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"bad splits {splits!r}")
    fractions = fractions / fractions.sum()
    counts = [int(math.floor(n * f)) for f in fractions]
    counts[0] += n - sum(counts)
    return list(zip(names, counts))
