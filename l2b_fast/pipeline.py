"""Search -> derive -> retrain -> evaluate on streamed shards (the paper's CelebA and Taskonomy experiments).

A config (``l2b_fast/presets/taskonomy-resnet34.toml``, ``celeba-vgg.toml``, ``celeba-deepwide.toml`` or a
user's copy) names the data kind, the model family and the training settings; nothing here depends on which
data set it is: the tasks, losses and metrics come from :mod:`l2b_fast.datasets`, the model from
:data:`l2b_fast.models.SPECS`, the batches from the loaders of :mod:`l2b_fast.data.loader`, training from
:class:`~l2b_fast.train.stream.StreamTrainer` (one process or many under ``torchrun``).

Outputs: ``search`` writes ``OUT/tree.json`` (derived, pruned), ``tree.png/.svg``, ``probabilities.png/.svg``,
``log.csv``, ``epochs.csv``, ``checkpoints/last.pt`` and ``summary.json``; ``retrain`` writes the same logs and
checkpoint for the tree trained from scratch plus ``retrain_summary.json``, ``tree.json`` and ``config.json``
(so the folder alone can be evaluated); ``evaluate`` writes ``RUN/eval.json``. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from l2b_fast import datasets, viz
from l2b_fast.models import SPECS
from l2b_fast.nn import parameter_count
from l2b_fast.train import distributed
from l2b_fast.train.stream import StreamConfig, StreamTrainer
from l2b_fast.tree import Tree, derive

# Keys of [search]/[retrain] that shape the data, not the trainer (the rest are StreamConfig fields).
DATA_KEYS = ("size", "batch_size", "epoch_samples")
STREAM_FIELDS = {field.name for field in dataclasses.fields(StreamConfig)} - {"seed", "progress"}
MODEL_KEYS = ("family", "execution")  # the rest of [model] are the family's spec options


@dataclasses.dataclass(frozen=True)
class DataKind:
    """How to read and make shards of one kind: the loaders' and the synthetic generator's entry points."""

    train_loader: Callable
    eval_loader: Callable
    generate: Callable


def _taskonomy() -> DataKind:
    from l2b_fast.data import loader, synthetic_taskonomy

    def train(urls, *, batch_size, size, seed, epoch_samples, num_workers):
        return loader.taskonomy_train_loader(urls, batch_size=batch_size, size=size, seed=seed, epoch_samples=epoch_samples, num_workers=num_workers)

    def evaluation(urls, *, batch_size, size, num_workers):
        return loader.taskonomy_eval_loader(urls, batch_size=batch_size, size=size, num_workers=num_workers)

    return DataKind(train, evaluation, synthetic_taskonomy.generate)


def _celeba() -> DataKind:
    from l2b_fast.data import loader, synthetic_celeba

    def train(urls, *, batch_size, size, seed, epoch_samples, num_workers):
        return loader.celeba_loader(urls, batch_size=batch_size, train=True, size=size, seed=seed, epoch_samples=epoch_samples, num_workers=num_workers)

    def evaluation(urls, *, batch_size, size, num_workers):
        return loader.celeba_loader(urls, batch_size=batch_size, train=False, size=size, num_workers=num_workers)

    return DataKind(train, evaluation, synthetic_celeba.generate)


DATA_KINDS: dict[str, Callable[[], DataKind]] = {"taskonomy": _taskonomy, "celeba": _celeba}


class ToInputSize(nn.Module):
    """Runs ``net`` and resizes every dense prediction (``[B, C, H, W]``) whose side differs from the input's to
    the input's (bilinear): a model whose output stride does not divide the image size (e.g. the Taskonomy
    ResNet's 8 at 36 x 36) still predicts at the targets' resolution. Other outputs pass unchanged. ``tasks``
    and the sampling ``seed=`` / ``generator=`` of a supernet pass through."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.tasks = net.tasks

    def forward(self, inputs: torch.Tensor, *, seed: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        options = {name: value for name, value in (("seed", seed), ("generator", generator)) if value is not None}
        outputs = self.net(inputs, **options)
        size = inputs.shape[-2:]
        return {task: F.interpolate(out, size=size, mode="bilinear", align_corners=False) if out.dim() == 4 and out.shape[-2:] != size else out
                for task, out in outputs.items()}


# ----------------------------------------------------------------------------------------------- config
def check_config(config: Mapping, source: str) -> None:
    """ValueError (one line, naming ``source``) unless a streaming config has what the pipeline reads."""
    kind = config["data"]["kind"]
    if kind not in DATA_KINDS:
        raise ValueError(f"{source}: data kind {kind!r} is not one of {sorted(DATA_KINDS)}")
    family = config["model"].get("family")
    if family not in SPECS:
        raise ValueError(f"{source}: [model] family {family!r} is not one of {sorted(SPECS)}")
    for section in ("search", "retrain"):
        settings = config.get(section)
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: missing [{section}] section")
        unknown = sorted(set(settings) - set(DATA_KEYS) - STREAM_FIELDS)
        if unknown:
            raise ValueError(f"{source}: unknown [{section}] settings {unknown}; known: {sorted(set(DATA_KEYS) | STREAM_FIELDS)}")
        missing = [key for key in ("size", "batch_size", "epochs") if key not in settings]
        if missing:
            raise ValueError(f"{source}: [{section}] needs {', '.join(missing)}")
        batch = settings["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{source}: [{section}] batch_size must be a positive integer, got {batch!r}")
    dataset(config)  # unknown [dataset] options fail here


def dataset(config: Mapping) -> datasets.MultiTaskDataset:
    return datasets.get(config["data"]["kind"], **config.get("dataset", {}))


def model_spec(config: Mapping, tasks, size):
    model = config["model"]
    options = {key: (tuple(value) if isinstance(value, list) else value) for key, value in model.items() if key not in MODEL_KEYS}
    return SPECS[model["family"]](tasks=tuple(tasks), input_size=_size(size), **options)


def _size(size):
    return tuple(size) if isinstance(size, list) else size


def stream_config(section: Mapping, seed: int, progress: bool) -> StreamConfig:
    settings = {key: value for key, value in section.items() if key not in DATA_KEYS}
    return StreamConfig(**settings, seed=seed, progress=progress)


# ------------------------------------------------------------------------------------------------- data
def check_data(config: Mapping, data_dir: str | Path, splits: tuple[str, ...]) -> dict:
    """The manifest of ``data_dir`` if it holds non-empty ``splits`` of the config's data set; else ValueError."""
    from l2b_fast.data.shards import read_manifest

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data {data_dir}: no such directory")
    manifest = read_manifest(data_dir)
    try:
        dataset(config).check_manifest(manifest)
    except ValueError as error:
        raise ValueError(f"--data {data_dir}: {error} (preset {config.get('name')} needs {config['data']['kind']} shards)") from None
    for split in splits:
        entry = manifest["splits"].get(split)
        if entry is None or entry["total"] == 0:
            raise ValueError(f"--data {data_dir}: the {split!r} split is empty or missing (splits: {_split_totals(manifest)})")
    return manifest


def _split_totals(manifest: Mapping) -> str:
    return ", ".join(f"{name} {entry['total']}" for name, entry in manifest["splits"].items()) or "none"


def make_synthetic_data(config: Mapping, out_dir: str | Path, seed: int, device: str = "cpu") -> Path:
    """Small synthetic shards of the config's kind (its ``[synthetic]`` section) in ``out_dir``, written by rank
    0 while the other ranks wait (under ``torchrun``); an existing complete set is reused (resume)."""
    out_dir = Path(out_dir)
    section = config.get("synthetic", {})
    context = distributed.setup(device)  # the process group, so that only rank 0 writes
    if context.is_main and not (out_dir / "manifest.json").is_file():
        samples = int(section.get("samples", 200))
        DATA_KINDS[config["data"]["kind"]]().generate(out_dir, samples, int(section.get("size", 64)), seed=seed, samples_per_shard=max(1, samples // 8), overwrite=True)
    distributed.barrier()
    return out_dir


def _split_urls(data_dir: Path, split: str) -> list[str]:
    from l2b_fast.data.shards import shard_paths

    return shard_paths(data_dir, split)


def _train_data(config: Mapping, section: Mapping, data_dir: Path, manifest: Mapping, seed: int, world_size: int):
    """A factory ``data(epoch)``: each epoch's loader seeded with ``seed + epoch`` (exact resume), and its batch size."""
    kind = DATA_KINDS[config["data"]["kind"]]()
    urls = _split_urls(data_dir, "train")
    batch_size = section["batch_size"]
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split over {world_size} ranks")
    per_rank = batch_size // world_size
    epoch_samples = section.get("epoch_samples") or manifest["splits"]["train"]["total"]
    if epoch_samples < batch_size:
        raise ValueError(f"an epoch of {epoch_samples} samples holds no batch of {batch_size}: lower batch_size (--set search.batch_size=N) or add data")
    num_workers = int(config["data"].get("num_workers", 0))

    def epoch_loader(epoch: int):
        return kind.train_loader(urls, batch_size=per_rank, size=_size(section["size"]), seed=seed + epoch, epoch_samples=epoch_samples, num_workers=num_workers)

    return epoch_loader


def _eval_loader(config: Mapping, data_dir: Path, split: str, size):
    kind = DATA_KINDS[config["data"]["kind"]]()
    return kind.eval_loader(_split_urls(data_dir, split), batch_size=int(config["data"].get("eval_batch_size", 16)), size=_size(size), num_workers=int(config["data"].get("num_workers", 0)))


def _val_data(config: Mapping, data_dir: Path, manifest: Mapping, size):
    entry = manifest["splits"].get("val")
    if entry is None or entry["total"] == 0:
        return None
    return lambda: _eval_loader(config, data_dir, "val", size)


# ---------------------------------------------------------------------------------------------- stages
class _StepCounter:
    """Counts the optimizer steps this process ran (a resumed run's earlier steps are not timed)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, trainer: StreamTrainer) -> None:
        self.steps += 1


def _throughput(trainer: StreamTrainer, section: Mapping, steps: int, seconds: float) -> dict:
    images = steps * section["batch_size"] * trainer.config.accumulation
    result = {"seconds": round(seconds, 2), "images": images, "images_per_second": round(images / seconds, 2) if seconds > 0 else None}
    if trainer.device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 3)
    return result


def _environment(context: distributed.DistContext) -> dict:
    return {
        "device": str(context.device) if context.device.type != "cuda" else torch.cuda.get_device_name(context.device),
        "world_size": context.world_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def search(config: Mapping, out: str | Path, data_dir: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Trains the supernet on ``data_dir``'s train split, derives and prunes the tree; returns the summary."""
    out, data_dir = Path(out), Path(data_dir)
    context = distributed.setup(device)
    manifest = check_data(config, data_dir, ("train",))
    section = config["search"]
    data = dataset(config)
    spec = model_spec(config, data.tasks, section["size"])
    torch.manual_seed(seed)
    supernet = spec.supernet(execution=config["model"].get("execution", "auto"))
    trainer = StreamTrainer(
        ToInputSize(supernet), data, _train_data(config, section, data_dir, manifest, seed, context.world_size), stream_config(section, seed, progress), out,
        val_data=_val_data(config, data_dir, manifest, section["size"]), context=context,
    )
    counter, started = _StepCounter(), time.perf_counter()
    final = trainer.fit(resume=resume, on_step=counter)
    timing = _throughput(trainer, section, counter.steps, time.perf_counter() - started)
    tree = derive(supernet).pruned()
    summary = {
        "name": config["name"],
        "seed": seed,
        "data": str(data_dir),
        "final": final,
        "timing": timing,
        "supernet_parameters": parameter_count(supernet),
        "tree_parameters": parameter_count(spec.treenet(tree)),
        "probabilities": [p.tolist() for p in supernet.probabilities()],
        "environment": _environment(context),
    }
    if context.is_main:
        tree.save(out / "tree.json")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        viz.draw_search_pictures(tree.to_dict(), out, config["name"])
    distributed.barrier()
    return summary


def retrain(config: Mapping, tree: Tree, out: str | Path, data_dir: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Trains the derived tree from scratch at the retrain size; returns (and writes) ``retrain_summary.json``."""
    out, data_dir = Path(out), Path(data_dir)
    context = distributed.setup(device)
    manifest = check_data(config, data_dir, ("train",))
    section = config["retrain"]
    data = dataset(config)
    if tuple(tree.tasks) != tuple(data.tasks):
        raise ValueError(f"the tree's tasks {list(tree.tasks)} do not match the config's {list(data.tasks)}")
    spec = model_spec(config, data.tasks, section["size"])
    torch.manual_seed(seed + 1)
    net = spec.treenet(tree)
    trainer = StreamTrainer(
        ToInputSize(net), data, _train_data(config, section, data_dir, manifest, seed, context.world_size), stream_config(section, seed, progress), out,
        val_data=_val_data(config, data_dir, manifest, section["size"]), context=context,
    )
    counter, started = _StepCounter(), time.perf_counter()
    final = trainer.fit(resume=resume, on_step=counter)
    summary = {
        "name": config["name"],
        "seed": seed,
        "data": str(data_dir),
        "final": final,
        "timing": _throughput(trainer, section, counter.steps, time.perf_counter() - started),
        "parameters": parameter_count(net),
        "environment": _environment(context),
    }
    if context.is_main:
        tree.save(out / "tree.json")
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "retrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    return summary


def trained_run(run: str | Path) -> Path:
    """The folder holding a retrained tree: ``run`` itself, or ``run/retrain`` (a search folder); else ValueError."""
    run = Path(run)
    for folder in (run / "retrain", run):
        if all((folder / name).is_file() for name in ("tree.json", "config.json", "checkpoints/last.pt")) and (folder / "retrain_summary.json").is_file():
            return folder
    raise ValueError(f"{run} holds no retrained tree (tree.json, config.json, checkpoints/last.pt, retrain_summary.json): run `l2b retrain` first")


@torch.no_grad()
def evaluate(run: str | Path, data_dir: str | Path, *, split: str = "test", device: str = "cpu") -> dict:
    """The retrained tree of ``run`` on ``split`` of ``data_dir``: the paper's metrics, over every sample once
    (ranks split the shards); writes ``run/eval.json`` and returns it, with the printed ``table``."""
    from l2b_fast.data.loader import sample_count_report
    from l2b_fast.train.checkpoints import read_checkpoint

    run, data_dir = Path(run), Path(data_dir)
    folder = trained_run(run)
    config = json.loads((folder / "config.json").read_text())
    check_data(config, data_dir, (split,))
    context = distributed.setup(device)
    data = dataset(config)
    size = config["retrain"]["size"]
    net = ToInputSize(model_spec(config, data.tasks, size).treenet(Tree.load(folder / "tree.json")))
    try:
        net.load_state_dict(read_checkpoint(folder / "checkpoints" / "last.pt", "cpu")["model"])
    except RuntimeError as error:  # weights of another tree, model or width
        raise ValueError(f"{folder}/checkpoints/last.pt does not fit the tree and model of {folder}/config.json ({str(error).splitlines()[0]})") from None
    net.to(context.device).eval()
    metrics = data.metrics()
    loader = _eval_loader(config, data_dir, split, size)
    for batch in loader:
        inputs, targets, masks = (*batch, None)[:3]
        outputs = net(inputs.to(context.device))
        targets = {task: value.to(context.device) for task, value in targets.items()}
        masks = None if masks is None else {task: value.to(context.device) for task, value in masks.items()}
        task_targets, task_masks = data.task_targets(targets, masks)
        metrics.update(outputs, task_targets, task_masks)
    metrics.all_reduce()
    counts = sample_count_report(loader, metrics.samples)
    parameters = parameter_count(net)
    result = {
        "tasks": metrics.compute(),
        "parameters": parameters,
        "split": split,
        "samples": metrics.samples,
        "manifest_samples": counts["manifest_samples"],
        "missing_samples": counts["missing_samples"],
        "skipped_samples": counts["skipped_samples"],
        "shard_errors": counts["shard_errors"],
        "summary": metrics.summary(),
        "metrics": metrics.describe(),
        "data": str(data_dir),
        "model": str(folder),
    }
    table = datasets.format_table(data, result["summary"], parameters, ours_label=f"ours ({config['name']}, {split}, {metrics.samples} samples)")
    if context.is_main:
        (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    return {**result, "table": table}
