"""Resumable conversion of a raw data set into shards: the machinery the converters share.

Each split's items, in an order the caller fixes (shuffle before packing), are loaded one by one and packed
~``samples_per_shard`` per ``{split}-{index:06d}.tar`` (written as ``.partial`` and renamed, so a kill never
leaves a half shard under its final name). Items whose loading raises ValueError are skipped and logged to
``skipped.tsv`` as ``key<TAB>reason``. After every shard, ``progress.json`` commits, per split, the position
reached in the item list, the shards with their sample counts and the number of skipped items, together with
the skip lines gathered since the previous shard. A resumed conversion starts after the last committed shard
and cuts ``skipped.tsv`` back to its committed length, so it writes the same shards and log as an uninterrupted
one: no item is lost or repeated.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from l2b_fast.data import shards
from l2b_fast.data.labels import LABELS_MEMBER
from l2b_fast.data.shards import PROGRESS, SKIPPED_LOG

__all__ = ["ResumableConversion", "error_reason", "PROGRESS", "SKIPPED_LOG"]


Item = TypeVar("Item")


def error_reason(error: BaseException) -> str:
    """``str(error)`` without object addresses (Pillow names its BytesIO ``... at 0x7f..``): reproducible logs."""
    return re.sub(r" at 0x[0-9a-f]+", "", str(error))


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


class ResumableConversion:
    """One conversion into ``out``; call :meth:`pack` for each split, then :meth:`manifest`.

    ``settings``: everything else that determines the output (source, seed, sizes...); it is recorded in
    ``progress.json`` with ``samples_per_shard`` and a resume with other settings is refused. Without
    ``resume``, an ``out`` that already holds a conversion (a manifest or a progress file) is refused.
    ``progress`` prints skips and finished shards to stderr, counting samples in ``unit`` ("views",
    "images"). ``stop_after_shards`` ends the conversion after that many shards (tests simulate a kill with it).
    """

    def __init__(
        self,
        out: str | Path,
        settings: dict,
        *,
        samples_per_shard: int,
        resume: bool,
        progress: bool = True,
        stop_after_shards: int | None = None,
        unit: str = "samples",
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out = Path(out)
        self.samples_per_shard = samples_per_shard
        self.progress = progress
        self.stop_after_shards = stop_after_shards
        self.unit = unit
        self.shards_written = 0
        self.out.mkdir(parents=True, exist_ok=True)
        self._state_path = self.out / PROGRESS
        settings = {**settings, "samples_per_shard": samples_per_shard}
        if resume and self._state_path.exists():
            self.state = json.loads(self._state_path.read_text())
            if self.state["settings"] != settings:
                raise ValueError(
                    f"{self.out} was converted with other settings {self.state['settings']}; convert into "
                    "another directory"
                )
            log = self.out / SKIPPED_LOG  # progress files written before this field existed: trust the log
            self.state.setdefault("skipped_log_bytes", log.stat().st_size if log.exists() else 0)
        elif (self.out / shards.MANIFEST).exists() or self._state_path.exists():
            raise ValueError(f"{self.out} already holds a conversion: use --resume to continue it or another --out")
        else:
            self.state = {"settings": settings, "splits": {}, "skipped_log_bytes": 0}
        log = self.out / SKIPPED_LOG
        if log.exists():  # drop lines appended after the last commit (or a stale log before a fresh start)
            with log.open("r+b") as stream:
                stream.truncate(self.state["skipped_log_bytes"])

    def pack(
        self,
        split: str,
        items: Sequence[Item],
        key: Callable[[Item], str],
        load: Callable[[Item], dict],
        tasks: Sequence[str] | None = None,
    ) -> bool:
        """Packs ``split``'s ``items`` (in their final order) from where an earlier run stopped.

        ``tasks``: count each task's labelled samples into the split's ``labels`` (a sample's ``labels.json``
        member lists its tasks; without one it has them all), committed with each shard like the rest.

        ``key(item)``: the sample key (no '.'), also naming the item in the skip log. ``load(item)``: the
        sample's members ``{name: bytes}``, or ValueError (its message is the logged reason) to skip the item.
        Returns False if ``stop_after_shards`` ended the conversion, True once the split is complete.
        """
        entry = self.state["splits"].setdefault(split, {"next": 0, "shards": [], "samples": [], "skipped": 0})
        batch: list[dict] = []
        skipped: list[str] = []  # committed with the next shard, so a resume neither loses nor repeats them
        for position in range(entry["next"], len(items)):
            item = items[position]
            try:
                batch.append({"__key__": key(item), **load(item)})
            except ValueError as error:
                skipped.append(f"{key(item)}\t{error}\n")
                if self.progress:
                    print(f"skip {key(item)}: {error}", file=sys.stderr)
            scanned = position + 1
            if len(batch) == self.samples_per_shard or (batch and scanned == len(items)):
                name = f"{split}-{len(entry['shards']):06d}.tar"
                shards.write_tar(self.out / name, batch)
                entry["shards"].append(name)
                entry["samples"].append(len(batch))
                if tasks is not None:
                    labels = entry.setdefault("labels", dict.fromkeys(tasks, 0))
                    for sample in batch:
                        for task in json.loads(sample[LABELS_MEMBER]) if LABELS_MEMBER in sample else tasks:
                            labels[task] += 1
                self._commit(entry, scanned, skipped)
                self.shards_written += 1
                if self.progress:
                    print(
                        f"{split}: {name} ({len(batch)} {self.unit}, {scanned}/{len(items)} scanned)", file=sys.stderr
                    )
                batch = []
                if self.stop_after_shards is not None and self.shards_written >= self.stop_after_shards:
                    return False
        self._commit(entry, len(items), skipped)  # items skipped after the split's last shard
        return True

    def _commit(self, entry: dict, position: int, skipped: list[str]) -> None:
        """Records the progress up to ``position`` (after its shard is in place) with the items skipped so far."""
        if skipped:
            log = self.out / SKIPPED_LOG
            with log.open("ab") as stream:
                stream.write("".join(skipped).encode("utf-8"))
            self.state["skipped_log_bytes"] = log.stat().st_size
            entry["skipped"] += len(skipped)
            skipped.clear()
        entry["next"] = position
        _write_json(self._state_path, self.state)

    def manifest(self, dataset: str, size, seed: int, created_by: str, **extra) -> dict:
        """Writes ``manifest.json`` (:func:`shards.write_manifest`, each split with its ``skipped`` count) and
        returns it. ValueError if no sample could be converted: then no manifest is written and the progress
        file is removed (a shard directory without samples is useless), and ``skipped.tsv`` says why."""
        if not any(entry["samples"] for entry in self.state["splits"].values()):
            skipped = sum(entry["skipped"] for entry in self.state["splits"].values())
            self._state_path.unlink(missing_ok=True)
            raise ValueError(
                f"no sample could be converted: all {skipped} were skipped (reasons in {self.out / SKIPPED_LOG})"
            )
        splits = {
            split: {
                "shards": entry["shards"],
                "samples": entry["samples"],
                "total": sum(entry["samples"]),
                "skipped": entry["skipped"],
                **({"labels": entry["labels"]} if "labels" in entry else {}),
            }
            for split, entry in self.state["splits"].items()
        }
        return shards.write_manifest(self.out, dataset, size, splits, seed, created_by=created_by, **extra)
