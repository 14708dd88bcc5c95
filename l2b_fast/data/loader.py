"""Streaming webdataset loaders for Taskonomy and CelebA shards (schema: docs/data-schema.md).

Training (:func:`taskonomy_train_loader`, :func:`celeba_loader` with ``train=True``): shards are resampled with
replacement from a seeded stream that differs per rank and per DataLoader worker (``rank * 1000 + worker``,
the rank taken in the main process when the loader is built), samples pass through a seeded shuffle buffer,
are augmented and batched inside the workers, and every worker stops after
``epoch_samples // (batch_size * world_size * max(1, num_workers))`` batches, so all DDP ranks run the same
number of steps per epoch. Workers are persistent, so each epoch draws new shards and augmentations;
everything is reproducible for a given ``seed``, world size and worker count. A worker count above the CPUs
the process may use is lowered to that number (with a one-line notice), as more workers only compete for them.

Evaluation (:func:`taskonomy_eval_loader`, :func:`celeba_loader` with ``train=False``): rank ``r`` of ``W``
reads the disjoint shard list ``shards[r::W]`` (split further across workers with ``split_by_worker``), once,
in a deterministic order, without shuffling or augmentation (resize only). Ranks may see different numbers of
batches: do no collective operation per batch; sum metrics per rank and combine them with
:func:`reduce_metric_sums` at the end.

Corrupt data never crashes or hangs a loader: an undecodable PNG, a missing member, an unreadable or
truncated tar are skipped, reported with a :class:`SkippedDataWarning` (once per shard and process: a training
loader re-reads a broken shard every time it draws it) and counted in the loader's :class:`SkipCounter`
(``loader.skips.count``, every event, shared across DataLoader worker processes). After
``max_consecutive_failures`` failures in a row without a good sample a pipeline gives up on the current
stream (so a set of shards that are all broken ends the epoch instead of looping forever). Skip events are not
samples (a truncated shard loses an unknown number): an evaluation compares the samples it evaluated with the
count in the shards' manifests through :func:`sample_count_report`, which reports both and warns if they differ.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from l2b_fast.data.dependencies import import_data_package
from l2b_fast.data.images import CorruptSampleError

wds = import_data_package("webdataset")

__all__ = [
    "SkippedDataWarning",
    "SkipCounter",
    "build_loader",
    "reduce_metric_sums",
    "manifest_sample_count",
    "sample_count_report",
    "sample_count_message",
    "expand_urls",
    "batches_per_worker",
]


class SkippedDataWarning(UserWarning):
    """A corrupt sample or shard was skipped."""


class SkipCounter:
    """Exception handler for webdataset stages: warn, count, continue.

    Called by webdataset for errors reading a shard (``__call__``: an unreadable or truncated tar, one or two
    events per broken shard, however many samples it held) and by the decoding stage for each sample it drops
    (:meth:`skip_sample`). The counts live in shared memory, so skips in DataLoader worker processes show up in
    the object held by the main process. ``messages`` holds the first few messages of the current process only.

    Warnings: one per shard and process, with the count so far; the shard's later events (the same broken shard
    drawn again by a resampling training loader, its other corrupt samples) are counted without a warning.
    Events that name no shard warn each, up to ``max_warnings`` warnings in all.
    """

    def __init__(self, name: str = "data", *, max_consecutive_failures: int = 1000, max_warnings: int = 50):
        self.name = name
        self.max_consecutive_failures = max_consecutive_failures
        self.max_warnings = max_warnings
        self._count = multiprocessing.Value("q", 0)
        self._samples = multiprocessing.Value("q", 0)
        self._consecutive = 0
        self._warned = 0
        self._warned_shards: set[str] = set()  # this process's: each worker process warns on its own
        self.messages: list[str] = []

    @property
    def count(self) -> int:
        """Skip events so far (all processes): one per skipped sample, one or two per broken shard."""
        return int(self._count.value)

    @property
    def skipped_samples(self) -> int:
        """Samples that were read but could not be decoded (all processes)."""
        return int(self._samples.value)

    @property
    def shard_errors(self) -> int:
        """Errors reading shards: the samples they cost are unknown here (compare with the manifest,
        :func:`sample_count_report`)."""
        return self.count - self.skipped_samples

    def reset(self) -> None:
        for value in (self._count, self._samples):
            with value.get_lock():
                value.value = 0
        self.messages.clear()
        self._consecutive = 0
        self._warned = 0
        self._warned_shards.clear()

    def ok(self) -> None:
        """Record a good sample (resets the consecutive-failure guard)."""
        self._consecutive = 0

    def skip_sample(self, exn: BaseException) -> bool:
        """Counts one undecodable sample (then as ``__call__``)."""
        with self._samples.get_lock():
            self._samples.value += 1
        return self(exn)

    def __call__(self, exn: BaseException) -> bool:
        with self._count.get_lock():
            self._count.value += 1
            total = self._count.value
        self._consecutive += 1
        shard = _shard_of(exn)
        detail = exn.args[0] if shard is not None and exn.args else exn  # webdataset appends the stream and url
        message = f"{self.name}: skipped corrupt data ({type(exn).__name__}: {detail})"
        if len(self.messages) < 100:
            self.messages.append(message)
        if shard not in self._warned_shards and self._warned < self.max_warnings:
            self._warned += 1
            if shard is not None:
                self._warned_shards.add(shard)
                message += f" in shard {shard}; {total} skipped so far; its later errors are counted, not warned"
            else:
                message += f"; {total} skipped so far"
            if self._warned == self.max_warnings:
                message += " [further skip warnings suppressed in this process]"
            warnings.warn(message, SkippedDataWarning, stacklevel=2)
        if self._consecutive > self.max_consecutive_failures:
            warnings.warn(
                f"{self.name}: {self._consecutive} consecutive failures without a good sample; giving up on this "
                "stream",
                SkippedDataWarning,
                stacklevel=2,
            )
            self._consecutive = 0
            return False
        return True

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, count={self.count})"


# ------------------------------------------------------------------------------------------------- helpers
def _shard_of(exn: BaseException) -> str | None:
    """The shard an error came from: set by the decoding stage, or the url webdataset appends to the
    exception's arguments (its last one); None when neither names one."""
    shard = getattr(exn, "shard", None)
    if shard is not None:
        return str(shard)
    arguments = getattr(exn, "args", ())
    return arguments[-1] if len(arguments) >= 2 and isinstance(arguments[-1], str) else None


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern ("train-{000000..000009}.tar"), a "::"-joined string, or a list -> a list of urls."""
    if isinstance(urls, str):
        return wds.shardlists.expand_urls(urls)
    return [str(u) for u in urls]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): the most DataLoader workers that
    do not make torch's DataLoader warn about too many workers."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this OS
        return max(1, os.cpu_count() or 1)


_capped_worker_notices: set[tuple[int, int]] = set()


def _capped_workers(num_workers: int, rank: int) -> int:
    """``num_workers`` limited to the usable CPUs, with a one-line notice (once per process and value, rank 0)."""
    cpus = usable_cpus()
    if num_workers <= cpus:
        return num_workers
    if rank == 0 and (num_workers, cpus) not in _capped_worker_notices:
        _capped_worker_notices.add((num_workers, cpus))
        print(f"data: {num_workers} loader workers asked for, {cpus} CPU(s) usable: using {cpus}", file=sys.stderr)
    return cpus


def _dist_rank_world() -> tuple[int, int]:
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def batches_per_worker(epoch_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each DataLoader worker yields per epoch so that all ranks take the same number of steps."""
    return max(1, int(epoch_samples) // (int(batch_size) * int(world_size) * max(1, int(num_workers))))


class _WorkerSeed:
    """ResampledShards' per-stream seed, with the rank fixed when the loader was built (picklable)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker()[0]


class _ShardList:
    """Deterministic, possibly empty, list of shard urls (SimpleShardList refuses an empty list)."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)

    def __call__(self) -> Iterator[dict]:
        for url in self.urls:
            yield dict(url=url)


class _EpochStage:
    """A pipeline stage with a numpy Generator seeded by (seed, rank, worker, epoch of this stage copy)."""

    def __init__(self, seed: int, rank: int, salt: int):
        self.seed, self.rank, self.salt = int(seed), int(rank), int(salt)
        self.epoch = -1

    def _rng(self) -> np.random.Generator:
        self.epoch += 1
        return np.random.default_rng([self.salt, self.seed & 0xFFFFFFFF, self.rank, _worker()[0], self.epoch])


class _Shuffle(_EpochStage):
    def __init__(self, bufsize: int, seed: int, rank: int):
        super().__init__(seed, rank, salt=1)
        self.bufsize = int(bufsize)

    def __call__(self, src: Iterable) -> Iterator:
        rng = random.Random(int(self._rng().integers(2**62)))
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class _Convert(_EpochStage):
    """Decode + transform each sample dict with ``convert(sample, rng)``; failures go to the counter."""

    def __init__(self, convert: Callable, counter: SkipCounter, seed: int, rank: int, with_keys: bool):
        super().__init__(seed, rank, salt=2)
        self.convert, self.counter, self.with_keys = convert, counter, with_keys

    def __call__(self, src: Iterable[dict]) -> Iterator[tuple]:
        rng = self._rng()
        for sample in src:
            key = sample.get("__key__", "?")
            try:
                out = self.convert(sample, rng)
            except Exception as exn:
                exn = CorruptSampleError(f"sample {key!r} in {sample.get('__url__', '?')}: {exn}")
                exn.shard = sample.get("__url__")  # one warning per shard, however many of its samples fail
                if self.counter.skip_sample(exn):
                    continue
                break
            self.counter.ok()
            yield (*out, key) if self.with_keys else out


def _stack(items: list):
    first = items[0]
    if isinstance(first, torch.Tensor):
        out = None
        if torch.utils.data.get_worker_info() is not None:
            # Stack straight into shared memory, as default_collate does: otherwise sending the batch to the
            # main process copies it once more (~100 MB per 32-sample batch at 256x256).
            storage = first.untyped_storage()._new_shared(
                len(items) * first.numel() * first.element_size(), device=first.device
            )
            out = first.new_empty(0).set_(storage).view(len(items), *first.shape)
        return torch.stack(items, out=out)
    if isinstance(first, dict):
        return {k: _stack([item[k] for item in items]) for k in first}
    return list(items)  # keys


def _collate(samples: list[tuple]) -> tuple:
    return tuple(_stack([s[i] for s in samples]) for i in range(len(samples[0])))


def build_loader(
    urls,
    convert,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    epoch_samples: int | None,
    num_workers: int,
    shuffle_buffer: int,
    rank: int | None,
    world_size: int | None,
    counter: SkipCounter,
    with_keys: bool,
    pin_memory: bool | None,
) -> wds.WebLoader:
    urls = expand_urls(urls)
    if not urls:
        raise ValueError("no shard urls given")
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else int(rank)
    world_size = dist_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    num_workers = _capped_workers(num_workers, rank)  # before the epoch length, which depends on it
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if train:
        if epoch_samples is None or epoch_samples <= 0:
            raise ValueError("a training loader needs epoch_samples > 0 (samples per epoch over all ranks)")
        per_worker = batches_per_worker(epoch_samples, batch_size, world_size, num_workers)
        stages = [
            # Resampling with a per-rank, per-worker seed is the node/worker split for training.
            wds.ResampledShards(urls, seed=int(seed), worker_seed=_WorkerSeed(rank), deterministic=True),
            wds.tarfile_to_samples(handler=counter),
            _Shuffle(shuffle_buffer, seed, rank),
            _Convert(convert, counter, seed, rank, with_keys),
            wds.batched(batch_size, collation_fn=_collate, partial=False),
        ]
        dataset = wds.DataPipeline(*stages).with_epoch(per_worker)
        batches = per_worker * max(1, num_workers)
    else:
        mine = urls[rank::world_size]
        stages = [
            _ShardList(mine),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter),
            _Convert(convert, counter, seed, rank, with_keys),
            wds.batched(batch_size, collation_fn=_collate, partial=True),
        ]
        dataset = wds.DataPipeline(*stages)
        batches = None
        num_workers = min(num_workers, len(mine))
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=train and num_workers > 0,
    )
    loader.skips = counter
    loader.batches_per_epoch = batches  # None for evaluation (depends on the shards)
    loader.expected_samples = None if train else manifest_sample_count(urls[rank::world_size])
    loader.rank, loader.world_size, loader.shards = rank, world_size, (urls if train else urls[rank::world_size])
    return loader


# ---------------------------------------------------------------------------------------------- reduction
def reduce_metric_sums(sums: dict[str, torch.Tensor], counts):
    """Sum per-rank metric sums and sample counts over all ranks (exact: every rank read disjoint shards).

    ``sums``: {name: tensor}; ``counts``: an int, a tensor, or {name: int | tensor}. Returns new
    ``(sums, counts)`` of the same structure; the inputs are not modified. Without an initialised process
    group this is the identity. Tensors are reduced on their own device (NCCL needs CUDA tensors; use int64
    or float64 for exact sums).
    """
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def reduce(value):
        if isinstance(value, torch.Tensor):
            out = value.detach().clone()
            if active:
                dist.all_reduce(out, op=dist.ReduceOp.SUM)
            return out
        if isinstance(value, (int, np.integer)):
            out = torch.tensor(int(value), dtype=torch.int64)
            if active:
                if dist.get_backend() == "nccl":
                    out = out.cuda()
                dist.all_reduce(out, op=dist.ReduceOp.SUM)
            return int(out.item())
        if isinstance(value, float):
            out = torch.tensor(value, dtype=torch.float64)
            if active:
                if dist.get_backend() == "nccl":
                    out = out.cuda()
                dist.all_reduce(out, op=dist.ReduceOp.SUM)
            return float(out.item())
        raise TypeError(f"cannot reduce {type(value).__name__}")

    new_sums = {name: reduce(value) for name, value in sums.items()}
    new_counts = {name: reduce(value) for name, value in counts.items()} if isinstance(counts, dict) else reduce(counts)
    return new_sums, new_counts


# ------------------------------------------------------------------------------------ completeness of an evaluation
def manifest_sample_count(urls: Sequence[str]) -> int | None:
    """Samples the shard manifests list for these shard files (each file's ``manifest.json`` in its folder), or
    None when a url is not a local shard listed in a valid manifest (then nothing can be compared)."""
    from .shards import MANIFEST, read_manifest

    counts_by_folder: dict[Path, dict[str, int] | None] = {}
    total = 0
    for url in urls:
        path = Path(url)
        if not path.is_file():
            return None
        folder = path.parent.resolve()
        if folder not in counts_by_folder:
            counts_by_folder[folder] = None
            if (folder / MANIFEST).is_file():
                try:
                    manifest = read_manifest(folder)
                except ValueError:
                    pass
                else:
                    counts_by_folder[folder] = {
                        name: count
                        for entry in manifest["splits"].values()
                        for name, count in zip(entry["shards"], entry["samples"])
                    }
        counts = counts_by_folder[folder]
        if counts is None or path.name not in counts:
            return None
        total += counts[path.name]
    return total


def sample_count_message(report: dict) -> str | None:
    """One line on an incomplete evaluation (None when it read what the manifest lists, or there is no manifest).

    The missing samples are those skipped as corrupt (read but undecodable, counted one by one) and those never
    read (lost with a truncated or unreadable shard: its read errors count events, not samples), so the numbers
    add up to what the manifest lists.
    """
    samples, listed = report["samples"], report["manifest_samples"]
    if listed is None or listed == samples:
        return None
    if samples > listed:
        return f"evaluated {samples} samples, more than the {listed} the manifest lists for these shards"
    missing, skipped, shard_errors = listed - samples, report["skipped_samples"], report["shard_errors"]
    never_read = missing - skipped
    parts = [f"{skipped} corrupt sample(s) skipped"] if skipped else []
    if never_read > 0:
        cause = f"{shard_errors} shard read error(s)" if shard_errors else "absent from the shards"
        parts.append(f"{never_read} never read ({cause})")
    return f"evaluated {samples} of the {listed} samples the manifest lists: {missing} missing ({', '.join(parts)})"


def sample_count_report(loader, samples: int) -> dict:
    """How complete an evaluation pass was: the ``samples`` it evaluated (count them from the batches, e.g.
    ``metrics.samples``) against the count the manifests list for the loader's shards.

    Returns ``{"samples", "manifest_samples", "missing_samples", "skipped_samples", "shard_errors"}``, summed
    over all ranks of an initialised process group (call it on every rank, after the pass). ``manifest_samples``
    and ``missing_samples`` are None when the shards are not all listed in a manifest. Warns
    (:class:`SkippedDataWarning`, the line of :func:`sample_count_message`) when the two counts differ: a corrupt
    sample costs one sample, a truncated or unreadable shard an unknown number of them.
    """
    expected = getattr(loader, "expected_samples", None)
    skips = getattr(loader, "skips", None)
    values = {
        "samples": int(samples),
        "manifest_samples": 0 if expected is None else int(expected),
        "ranks_without_manifest": int(expected is None),
        "skipped_samples": 0 if skips is None else skips.skipped_samples,
        "shard_errors": 0 if skips is None else skips.shard_errors,
    }
    _, values = reduce_metric_sums({}, values)
    report = {
        "samples": values["samples"],
        "manifest_samples": None if values["ranks_without_manifest"] else values["manifest_samples"],
        "skipped_samples": values["skipped_samples"],
        "shard_errors": values["shard_errors"],
    }
    listed = report["manifest_samples"]
    report["missing_samples"] = None if listed is None else max(0, listed - report["samples"])
    message = sample_count_message(report)
    if message is not None:
        warnings.warn(f"{message}; the metrics cover only the samples evaluated", SkippedDataWarning, stacklevel=2)
    return report
