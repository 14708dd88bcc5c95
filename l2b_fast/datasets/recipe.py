"""A dataset recipe: everything the one pipeline (:mod:`l2b_fast.pipeline`) and the command line need to know about
one kind of data, registered once (:func:`l2b_fast.datasets.register`).

A recipe names its data kind (``[data] kind`` in a config) and gives: its tasks, losses and metrics (a
:class:`~l2b_fast.datasets.base.MultiTaskDataset`), its model families (config ``[model] family`` -> a
:class:`~l2b_fast.nn.spec.ModelSpec`), its data sources (shards it reads, or tensors it makes), the extra lines of
its reports and its outcome checks, and its ``l2b data`` commands (converters, synthetic generators). The pipeline
and the command line call these and never name a data set.

Two bases cover the built-in recipes: :class:`ShardRecipe` (webdataset shards on disk; with no ``--data``, small
synthetic shards generated into the run folder) and :class:`Recipe` itself for data made in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from l2b_fast.datasets.base import MultiTaskDataset

__all__ = ["DataCommand", "DataSource", "Recipe", "ShardRecipe", "ShardSource", "ToInputSize"]


@dataclasses.dataclass(frozen=True)
class DataCommand:
    """An ``l2b data NAME`` command: ``add_arguments(parser)`` declares its options, ``run(args)`` writes the shards
    and returns their manifest."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


class DataSource:
    """Where a run's batches come from. ``description`` is stored as the ``data`` of the run's summaries."""

    description: str | None = None

    def train(self, section: Mapping, seed: int, world_size: int) -> Callable[..., Iterable]:
        """A per-epoch factory ``data(epoch)`` of this rank's training batches."""
        raise NotImplementedError

    def evaluation(self, split: str, section: Mapping) -> Iterable | None:
        """This rank's batches of ``split`` (every sample on exactly one rank), or None without that split."""
        raise NotImplementedError


class Recipe:
    """The base of every dataset recipe (see the module docstring). Subclasses set :attr:`name`, :attr:`description`
    and :attr:`model_families` and implement :meth:`dataset` and :meth:`data`."""

    name: str
    description: str = ""
    #: ``[model] family`` -> a function ``(tasks=, input_size=, **options) -> ModelSpec``.
    model_families: Mapping[str, Callable] = {}
    #: Keys of ``[search]``/``[retrain]`` that shape the data, not the trainer.
    data_keys: tuple[str, ...] = ("batch_size",)
    #: Keys of ``[search]``/``[retrain]`` every config must set.
    required_keys: tuple[str, ...] = ("batch_size", "epochs")
    #: Keys of ``[model]`` the pipeline reads itself; the rest are the family's options.
    model_keys: tuple[str, ...] = ("family", "execution")
    #: Whether runs read shards (``--data DIR``); False: the recipe makes its data from the config.
    reads_shards: bool = False
    data_commands: tuple[DataCommand, ...] = ()

    # -------------------------------------------------------------------------------------- config
    def check_config(self, config: Mapping, source: str) -> None:
        """ValueError (one line, naming ``source``) for settings of this recipe that cannot run."""
        family = config["model"].get("family")
        if family not in self.model_families:
            raise ValueError(f"{source}: [model] family {family!r} is not one of {sorted(self.model_families)}")
        self.dataset(config)  # unknown [dataset] options fail here

    # -------------------------------------------------------------------------------------- tasks, models
    def dataset(self, config: Mapping) -> MultiTaskDataset:
        """The tasks, losses and metrics of a config."""
        raise NotImplementedError

    def model_spec(self, config: Mapping, section: Mapping):
        """The config's model at the stage ``section`` (``[search]`` or ``[retrain]``) trains it."""
        model = config["model"]
        options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items() if k not in self.model_keys}
        return self.model_families[model["family"]](
            tasks=self.dataset(config).tasks, **self.model_size(section), **options
        )

    def model_size(self, section: Mapping) -> dict:
        """Keyword arguments a stage's settings give the model family (the input size of image models)."""
        return {}

    def supernet(self, config: Mapping, spec) -> nn.Module:
        return spec.supernet(execution=config["model"].get("execution", "auto"))

    def treenet(self, config: Mapping, spec, tree) -> nn.Module:
        return spec.treenet(tree)

    def wrap(self, net: nn.Module) -> nn.Module:
        """The module the trainer calls (e.g. resizing dense predictions to the targets' size); default ``net``."""
        return net

    # -------------------------------------------------------------------------------------- data
    def check_data(self, config: Mapping, data_dir: str | Path | None, splits: tuple[str, ...]) -> None:
        """ValueError unless ``data_dir`` can serve ``splits`` (before anything is written)."""
        if data_dir is not None:
            raise ValueError(f"--data is for shard data; {config['name']} makes its own data")

    def data(
        self, config: Mapping, data_dir: Path | None, out: Path | None, seed: int, splits: tuple[str, ...] = ("train",)
    ) -> DataSource:
        """The run's data source: ``data_dir``'s shards (checked to hold ``splits``), or data the recipe makes (into
        ``out`` if it writes any)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- reports
    def search_report(self, config: Mapping, tree, final: Mapping) -> dict:
        """Extra keys of a search's ``summary.json`` (e.g. whether an expected outcome holds)."""
        return {}

    def retrain_report(self, config: Mapping, tree, final: Mapping) -> dict:
        """Extra keys of each retrained model's entry in ``retrain_summary.json``."""
        return {}

    def report_lines(self, summary: Mapping) -> list[str]:
        """Extra lines ``l2b search`` prints after the tree."""
        return []

    def retrain_lines(self, summary: Mapping) -> list[str]:
        """Extra lines ``l2b retrain`` prints."""
        return []


class ToInputSize(nn.Module):
    """Runs ``net`` and resizes every dense prediction (``[B, C, H, W]``) whose side differs from the input's to
    the input's (bilinear): a model whose output stride does not divide the image size (e.g. the Taskonomy
    ResNet's 8 at 36 x 36) still predicts at the targets' resolution. Other outputs pass unchanged. ``tasks``
    and the sampling ``seed=`` / ``generator=`` of a supernet pass through."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.tasks = net.tasks

    def forward(
        self, inputs: torch.Tensor, *, seed: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict:
        options = {name: value for name, value in (("seed", seed), ("generator", generator)) if value is not None}
        outputs = self.net(inputs, **options)
        size = inputs.shape[-2:]
        return {
            task: F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            if out.dim() == 4 and out.shape[-2:] != size
            else out
            for task, out in outputs.items()
        }


def _size(size):
    return tuple(size) if isinstance(size, list) else size


class ShardSource(DataSource):
    """Batches streamed from webdataset shards through a :class:`ShardRecipe`'s loaders."""

    def __init__(self, recipe: ShardRecipe, config: Mapping, data_dir: Path, manifest: Mapping):
        self.recipe, self.config, self.data_dir, self.manifest = recipe, config, Path(data_dir), manifest
        self.description = str(data_dir)

    def _urls(self, split: str) -> list[str]:
        from l2b_fast.data.shards import shard_paths

        return shard_paths(self.data_dir, split)

    def _workers(self) -> int:
        return int(self.config["data"].get("num_workers", 0))

    def train(self, section: Mapping, seed: int, world_size: int):
        batch_size = section["batch_size"]
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split over {world_size} ranks")
        epoch_samples = section.get("epoch_samples") or self.manifest["splits"]["train"]["total"]
        if epoch_samples < batch_size:
            raise ValueError(
                f"an epoch of {epoch_samples} samples holds no batch of {batch_size}: "
                "lower batch_size (--set search.batch_size=N) or add data"
            )
        urls, size, workers = self._urls("train"), _size(section["size"]), self._workers()

        def epoch_loader(epoch: int):  # seeded from the epoch: exact resume
            return self.recipe.train_loader(
                urls,
                batch_size=batch_size // world_size,
                size=size,
                seed=seed + epoch,
                epoch_samples=epoch_samples,
                num_workers=workers,
            )

        return epoch_loader

    def evaluation(self, split: str, section: Mapping):
        entry = self.manifest["splits"].get(split)
        if entry is None or entry["total"] == 0:
            return None
        batch_size = int(self.config["data"].get("eval_batch_size", 16))
        return self.recipe.eval_loader(
            self._urls(split), batch_size=batch_size, size=_size(section["size"]), num_workers=self._workers()
        )


class ShardRecipe(Recipe):
    """A recipe whose runs stream webdataset shards (``l2b data ...``). Subclasses give :meth:`train_loader`,
    :meth:`eval_loader` and :meth:`generate` (small synthetic shards for a run without ``--data``)."""

    data_keys = ("size", "batch_size", "epoch_samples")
    required_keys = ("size", "batch_size", "epochs")
    reads_shards = True
    #: The :class:`MultiTaskDataset` dataclass of the shards (its name is the manifests' ``dataset``).
    dataset_class: type[MultiTaskDataset]

    def dataset(self, config: Mapping) -> MultiTaskDataset:
        """The dataset class built with the config's ``[dataset]`` options; ValueError naming the valid ones."""
        options = config.get("dataset", {})
        try:
            return self.dataset_class(**options)
        except TypeError as error:  # an unknown option
            fields = ", ".join(self.dataset_class.__dataclass_fields__)
            raise ValueError(f"{self.name}: {error}; options: {fields}") from error

    def train_loader(self, urls, *, batch_size, size, seed, epoch_samples, num_workers) -> Iterable:
        raise NotImplementedError

    def eval_loader(self, urls, *, batch_size, size, num_workers) -> Iterable:
        raise NotImplementedError

    def generate(self, out_dir, n: int, size: int, *, seed: int, samples_per_shard: int, overwrite: bool) -> dict:
        raise NotImplementedError

    def model_size(self, section: Mapping) -> dict:
        return {"input_size": _size(section["size"])}

    def wrap(self, net: nn.Module) -> nn.Module:
        return ToInputSize(net)

    def check_data(self, config: Mapping, data_dir, splits: tuple[str, ...]) -> dict | None:
        """The manifest of ``data_dir`` if it holds non-empty ``splits`` of this data set; else ValueError."""
        from l2b_fast.data.shards import read_manifest

        if data_dir is None:
            return None
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data {data_dir}: no such directory")
        manifest = read_manifest(data_dir)
        try:
            self.dataset(config).check_manifest(manifest)
        except ValueError as error:
            raise ValueError(
                f"--data {data_dir}: {error} (preset {config.get('name')} needs {self.name} shards)"
            ) from None
        for split in splits:
            entry = manifest["splits"].get(split)
            if entry is None or entry["total"] == 0:
                totals = ", ".join(f"{name} {e['total']}" for name, e in manifest["splits"].items()) or "none"
                raise ValueError(f"--data {data_dir}: the {split!r} split is empty or missing (splits: {totals})")
        return manifest

    def data(
        self, config: Mapping, data_dir: Path | None, out: Path | None, seed: int, splits: tuple[str, ...] = ("train",)
    ) -> ShardSource:
        if data_dir is None:
            data_dir = self._synthetic_shards(config, Path(out) / "synthetic-data", seed)
        return ShardSource(self, config, Path(data_dir), self.check_data(config, data_dir, splits))

    def _synthetic_shards(self, config: Mapping, out_dir: Path, seed: int) -> Path:
        """Small synthetic shards (the config's ``[synthetic]`` section), written by rank 0 while the other ranks wait;
        an existing complete set is reused (resume)."""
        from l2b_fast.train import distributed

        section = config.get("synthetic", {})
        if distributed.is_main_process() and not (out_dir / "manifest.json").is_file():
            samples = int(section.get("samples", 200))
            self.generate(
                out_dir,
                samples,
                int(section.get("size", 64)),
                seed=seed,
                samples_per_shard=max(1, samples // 8),
                overwrite=True,
            )
        distributed.barrier()
        return out_dir
