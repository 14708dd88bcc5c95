"""CelebA (paper Sec. 4.2): 40 binary attributes. Everything of this data set lives here: its tasks, losses and
metrics (:mod:`.dataset`), the converter of the raw release (:mod:`.convert`), the synthetic-face generator
(:mod:`.synthetic`), the loaders (:mod:`.loaders`) and the paper's two models (:mod:`.vgg`, :mod:`.deep_wide`)."""

from __future__ import annotations

from l2b_fast.datasets.celeba.dataset import ATTRIBUTES, PAPER_ROWS, CelebA, CelebAMetrics
from l2b_fast.datasets.celeba.deep_wide import celeba_deep_wide, celeba_deep_wide_spec
from l2b_fast.datasets.celeba.vgg import celeba_branch_vgg, celeba_branch_vgg_spec
from l2b_fast.datasets.commands import conversion_command, generator_command
from l2b_fast.datasets.recipe import ShardRecipe

__all__ = [
    "ATTRIBUTES",
    "PAPER_ROWS",
    "CelebA",
    "CelebAMetrics",
    "RECIPE",
    "celeba_branch_vgg",
    "celeba_branch_vgg_spec",
    "celeba_deep_wide",
    "celeba_deep_wide_spec",
]


def _convert(root, out, **options) -> dict:
    from l2b_fast.datasets.celeba import convert

    return convert.convert(root, out, **options)


def _conversion_options(parser) -> list[str]:
    parser.add_argument(
        "--no-verify",
        dest="verify_images",
        action="store_false",
        help="do not decode the images to check them (faster; only missing files are skipped)",
    )
    return ["verify_images"]


def _generate(out_dir, n, size, **options) -> dict:
    from l2b_fast.datasets.celeba import synthetic

    return synthetic.generate(out_dir, n, size, **options)


class CelebARecipe(ShardRecipe):
    name = "celeba"
    dataset_class = CelebA
    description = "CelebA, 40 binary attributes (paper Table 1)"
    model_families = {"celeba_branch_vgg": celeba_branch_vgg_spec, "celeba_deep_wide": celeba_deep_wide_spec}
    data_commands = (
        conversion_command(
            "celeba",
            "CelebA",
            "Convert the aligned CelebA release (flat, official Google-Drive or Kaggle layout) into shuffled "
            "train/val/test shards with a manifest, keeping each image's original JPEG bytes; missing or "
            "undecodable images are skipped and logged; --resume continues an interrupted conversion.",
            _convert,
            _conversion_options,
        ),
        generator_command(
            "synthetic-celeba", "images with 40 visually detectable, group-correlated binary attributes", _generate, 64
        ),
    )

    def train_loader(self, urls, *, batch_size, size, seed, epoch_samples, num_workers):
        from l2b_fast.datasets.celeba.loaders import celeba_loader

        return celeba_loader(
            urls,
            batch_size=batch_size,
            train=True,
            size=size,
            seed=seed,
            epoch_samples=epoch_samples,
            num_workers=num_workers,
        )

    def eval_loader(self, urls, *, batch_size, size, num_workers):
        from l2b_fast.datasets.celeba.loaders import celeba_loader

        return celeba_loader(urls, batch_size=batch_size, train=False, size=size, num_workers=num_workers)

    def generate(self, out_dir, n, size, **options) -> dict:
        return _generate(out_dir, n, size, **options)


RECIPE = CelebARecipe()
