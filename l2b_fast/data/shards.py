"""Writing and reading webdataset shards and their manifest (schema: docs/data-schema.md).

Shared by the synthetic generators (and usable by converters) so every writer produces the same layout:
``{split}-{index:06d}.tar`` files plus one ``manifest.json`` per output directory. Shards are written with
``webdataset.TarWriter`` without its encoders (they would turn 16-bit PNGs into 8-bit ones) and with a fixed
mtime, so the same samples give byte-identical tars (reproducible data sets, cacheable checksums).
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .dependencies import import_data_package

__all__ = ["encode_png", "decode_png", "png_decoder", "prepare_output_dir", "write_split", "write_manifest", "read_manifest", "shard_paths", "MANIFEST"]

MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------------ PNG codec
def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes in the raw Taskonomy encodings: uint16 HxW -> 16-bit grey (mode I;16), uint8 HxW -> L,
    uint8 HxWx3 -> RGB (HxWx1 is squeezed). Anything else is a ValueError: silently converting e.g. int32 or
    float would change the stored values, which is exactly the bug this schema guards against.
    ``compress_level`` (0-9, zlib) only trades speed for size: 1 is ~2.5x faster and ~20% larger."""
    Image = import_data_package("PIL.Image")

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))  # Pillow picks I;16 for uint16
        if image.mode != "I;16":  # very old Pillow: force the mode explicitly
            image = Image.frombytes("I;16", (array.shape[1], array.shape[0]), np.ascontiguousarray(array, dtype="<u2").tobytes())
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        image = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(f"encode_png: expected uint16 HxW, uint8 HxW or uint8 HxWx3, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _png_header(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from the IHDR chunk, or None if ``data`` does not start like a PNG."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def _check_png_chunks(data: bytes) -> None:
    """ValueError unless every chunk is complete and its CRC matches, up to IEND.

    pyspng tells libspng to ignore CRCs (and zlib's checksum), so a flipped byte in image data would decode to
    silently wrong pixels; checking the CRCs here costs ~1% of the decode (zlib.crc32 runs at GB/s).
    """
    position, end = 8, len(data)
    while position + 12 <= end:
        length = int.from_bytes(data[position : position + 4], "big")
        stop = position + 8 + length
        if stop + 4 > end:
            break
        if zlib.crc32(data[position + 4 : stop]) != int.from_bytes(data[stop : stop + 4], "big"):
            raise ValueError(f"decode_png: cannot decode: CRC mismatch in chunk {data[position + 4 : position + 8]!r}")
        if data[position + 4 : position + 8] == b"IEND":
            return
        position = stop + 4
    raise ValueError("decode_png: cannot decode: truncated PNG (no complete IEND chunk)")


try:  # libspng: ~1.3x faster than Pillow on 8-bit RGB, the largest member (extra "data")
    import pyspng as _pyspng
except ImportError:  # pragma: no cover - exercised in the Pillow-only test subprocess
    _pyspng = None

# (bit depth, colour type) that libspng decodes to exactly what Pillow gives: grey 8, RGB 8, grey 16 (the
# three encodings encode_png writes). Anything else (palette, alpha, 16-bit RGB) goes through Pillow.
_SPNG_KINDS = {(8, 0), (8, 2), (16, 0)}


def png_decoder() -> str:
    """Name of the PNG decoder :func:`decode_png` uses for the shard encodings: "pyspng" or "pillow"."""
    return "pyspng" if _pyspng is not None else "pillow"


def decode_png(data: bytes, decoder: str | None = None) -> np.ndarray:
    """PNG bytes -> numpy array with the stored values (16-bit grey stays uint16; never 8-bit conversion).

    ``decoder``: "pyspng", "pillow" or None (the fastest installed, :func:`png_decoder`); both give identical
    arrays (tested). Widen uint16 to int32 before arithmetic (torch has no uint16 arithmetic). ValueError for
    undecodable bytes.
    """
    decoder = decoder or png_decoder()
    if decoder not in ("pyspng", "pillow"):
        raise ValueError(f"decode_png: unknown decoder {decoder!r} (pyspng, pillow)")
    if decoder == "pyspng" and _pyspng is None:
        raise ValueError("decode_png: pyspng is not installed (pip install pyspng)")
    header = _png_header(data)
    if decoder == "pyspng" and header in _SPNG_KINDS:
        _check_png_chunks(data)
        try:
            array = _pyspng.load(data)
        except Exception as error:
            raise ValueError(f"decode_png: cannot decode: {type(error).__name__}: {error}") from error
        if header == (16, 0):
            array = np.ascontiguousarray(array[..., 0])  # libspng returns 16-bit grey as grey+alpha
        return array
    return _decode_png_pillow(data)


def _decode_png_pillow(data: bytes) -> np.ndarray:
    Image = import_data_package("PIL.Image")

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            array = np.array(image)  # a writable copy
    except Exception as error:
        raise ValueError(f"decode_png: cannot decode: {type(error).__name__}: {error}") from error
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # some Pillow versions return mode "I" for 16-bit grey
    elif array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))  # mode I;16B
    return array


# ------------------------------------------------------------------------------------------------ writing
_SHARD_FILE = re.compile(r"[^./]+-\d{6}\.tar(\.partial)?")


def _is_pipeline_file(path: Path) -> bool:
    """A file the shard writers and converters create: shards (whole or partial), manifest, progress, skip log."""
    from l2b_fast.data.resumable import PROGRESS, SKIPPED_LOG

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
            raise ValueError(f"output directory {out} is not empty ({shown}): new shards would mix with old ones; pass --overwrite to replace a shard directory, or choose another --out")
        foreign = [entry.name for entry in entries if not _is_pipeline_file(entry)]
        if foreign:
            raise ValueError(f"output directory {out} holds files that are not shards ({', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}): --overwrite only replaces a shard directory; choose another --out")
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
    raise ValueError(f"sample {key!r}: member {name!r} must be bytes, str, a JSON value (for *.json) or an array (for *.png), got {type(value).__name__}")


def _write_tar(path: Path, samples: list[dict]) -> None:
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
        _write_tar(out / name, buffer)
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
            raise ValueError(f"corrupt manifest {path}: split {split!r} has {len(shards)} shards but {len(counts)} counts")
        if sum(counts) != entry["total"]:
            raise ValueError(f"corrupt manifest {path}: split {split!r} counts sum to {sum(counts)}, total says {entry['total']}")
        missing += [name for name in shards if not (Path(out_dir) / name).is_file()]
    if missing:
        raise ValueError(f"manifest {path} lists {len(missing)} missing shard file(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return manifest


def shard_paths(out_dir, split: str) -> list[str]:
    """Full paths of a split's shards in manifest order (what the loaders take as ``urls``)."""
    manifest = read_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in the manifest of {out_dir} (has {sorted(manifest['splits'])})")
    return [str(Path(out_dir) / name) for name in manifest["splits"][split]["shards"]]
