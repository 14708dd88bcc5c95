"""Taskonomy (paper Sec. 4.3): five dense tasks. Everything of this data set lives here: its tasks, losses and
metrics (:mod:`.dataset`), the converter of the raw release (:mod:`.convert`), the synthetic-scene generator
(:mod:`.synthetic`), the decoding/augmentation protocol and loaders (:mod:`.protocol`, :mod:`.loaders`) and the
paper's ResNet-34 model (:mod:`.resnet`)."""

from __future__ import annotations

from l2b_fast.datasets.commands import conversion_command, generator_command
from l2b_fast.datasets.recipe import ShardRecipe
from l2b_fast.datasets.taskonomy.dataset import (
    DEFAULT_CLASS_WEIGHTS,
    IGNORE_INDEX,
    PAPER_ROWS,
    SEGMENTATION_CLASSES,
    TASKS,
    Taskonomy,
    TaskonomyMetrics,
    class_weights_from_frequencies,
    load_class_weights,
    segmentation_pixel_counts,
)
from l2b_fast.datasets.taskonomy.resnet import ASPPHead, taskonomy_resnet34, taskonomy_resnet34_spec

__all__ = [
    "ASPPHead",
    "DEFAULT_CLASS_WEIGHTS",
    "IGNORE_INDEX",
    "PAPER_ROWS",
    "RECIPE",
    "SEGMENTATION_CLASSES",
    "TASKS",
    "Taskonomy",
    "TaskonomyMetrics",
    "class_weights_from_frequencies",
    "load_class_weights",
    "segmentation_pixel_counts",
    "taskonomy_resnet34",
    "taskonomy_resnet34_spec",
]


def _convert(root, out, **options) -> dict:
    from l2b_fast.datasets.taskonomy import convert

    return convert.convert(root, out, **options)


def _conversion_options(parser) -> list[str]:
    parser.add_argument("--split", default="tiny", choices=["tiny"], help="official split (default tiny)")
    parser.add_argument(
        "--size", type=int, default=256, choices=[256, 512], help="side of the stored images (512 -> 256 by nearest)"
    )
    return ["split", "size"]


def _generate(out_dir, n, size, **options) -> dict:
    from l2b_fast.datasets.taskonomy import synthetic

    return synthetic.generate(out_dir, n, size, **options)


class TaskonomyRecipe(ShardRecipe):
    name = "taskonomy"
    dataset_class = Taskonomy
    description = "Taskonomy, five dense tasks (paper Table 2)"
    model_families = {"taskonomy_resnet34": taskonomy_resnet34_spec}
    data_commands = (
        conversion_command(
            "taskonomy",
            "Taskonomy",
            "Convert a raw Taskonomy tree (any of the three layouts, either domain-name set) into shuffled shards "
            "with a manifest; missing or undecodable views are skipped and logged; --resume continues an "
            "interrupted conversion.",
            _convert,
            _conversion_options,
        ),
        generator_command(
            "synthetic-taskonomy", "scenes whose six Taskonomy modalities agree, in the raw encodings", _generate, 256
        ),
    )

    def train_loader(self, urls, *, batch_size, size, seed, epoch_samples, num_workers):
        from l2b_fast.datasets.taskonomy.loaders import taskonomy_train_loader

        return taskonomy_train_loader(
            urls, batch_size=batch_size, size=size, seed=seed, epoch_samples=epoch_samples, num_workers=num_workers
        )

    def eval_loader(self, urls, *, batch_size, size, num_workers):
        from l2b_fast.datasets.taskonomy.loaders import taskonomy_eval_loader

        return taskonomy_eval_loader(urls, batch_size=batch_size, size=size, num_workers=num_workers)

    def generate(self, out_dir, n, size, **options) -> dict:
        return _generate(out_dir, n, size, **options)


RECIPE = TaskonomyRecipe()
