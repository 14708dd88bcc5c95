"""Multi-task data sets: each one a recipe registered once (tasks, losses, metrics, data sources, models, report).

    from l2b_fast import datasets
    dataset = datasets.get("taskonomy")            # or "celeba"; options as keywords
    targets, masks = dataset.task_targets(batch_targets, batch_masks)
    losses = dataset.losses(outputs, targets, masks)          # {task: scalar}
    metrics = dataset.metrics(); metrics.update(outputs, targets, masks); metrics.compute()

    datasets.recipe("celeba")                      # what the pipeline and the CLI use (l2b_fast.datasets.recipe)
    datasets.register(MyRecipe())                  # a new data set: one recipe, one call

A data set's pieces live in its own folder (``l2b_fast/datasets/<name>/``); nothing outside it names the data set.
"""

from __future__ import annotations

from l2b_fast.datasets.base import Column, MetricAccumulator, MultiTaskDataset, PaperRow, TaskSpec, format_table
from l2b_fast.datasets.celeba import RECIPE as _CELEBA
from l2b_fast.datasets.celeba import CelebA
from l2b_fast.datasets.recipe import DataCommand, DataSource, Recipe, ShardRecipe
from l2b_fast.datasets.synthetic import RECIPE as _SYNTHETIC
from l2b_fast.datasets.synthetic import SyntheticTasks
from l2b_fast.datasets.taskonomy import RECIPE as _TASKONOMY
from l2b_fast.datasets.taskonomy import Taskonomy

__all__ = [
    "CelebA",
    "Column",
    "DataCommand",
    "DataSource",
    "MetricAccumulator",
    "MultiTaskDataset",
    "PaperRow",
    "Recipe",
    "ShardRecipe",
    "SyntheticTasks",
    "TaskSpec",
    "Taskonomy",
    "format_table",
    "get",
    "names",
    "recipe",
    "recipes",
    "register",
]

_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Makes ``recipe`` known to the pipeline and the command line under ``recipe.name`` (``[data] kind``)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register takes a Recipe, got {type(recipe).__name__}")
    if recipe.name in _RECIPES and _RECIPES[recipe.name] is not recipe:
        raise ValueError(f"a recipe named {recipe.name!r} is registered already")
    _RECIPES[recipe.name] = recipe
    return recipe


def recipe(kind: str) -> Recipe:
    """The recipe of the data kind ``kind``; ValueError naming the known ones."""
    if kind not in _RECIPES:
        raise ValueError(f"data kind {kind!r} is not one of {sorted(_RECIPES)}")
    return _RECIPES[kind]


def recipes() -> list[Recipe]:
    return [_RECIPES[name] for name in sorted(_RECIPES)]


def names() -> list[str]:
    """Names of the shard data sets (the ``dataset`` field of their shard manifests)."""
    return sorted(name for name, registered in _RECIPES.items() if isinstance(registered, ShardRecipe))


def get(name: str, **options) -> MultiTaskDataset:
    """The shard data set called ``name`` with ``options`` (its dataclass fields); ValueError for an unknown name."""
    if name not in names():
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(names())}")
    return _RECIPES[name].dataset({"dataset": options})


for _recipe in (_SYNTHETIC, _CELEBA, _TASKONOMY):
    register(_recipe)
