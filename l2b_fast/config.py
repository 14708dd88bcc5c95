"""Run configurations: the built-in presets, a user's TOML file, ``--set`` overrides, and the one check of a config.

A config has a ``[data]`` section whose ``kind`` names a dataset recipe (:mod:`l2b_fast.datasets`), a ``[model]``
section, and the ``[search]`` and ``[retrain]`` settings: the trainer's (:class:`~l2b_fast.train.TrainConfig`
fields) and those that shape the data (the recipe's ``data_keys``, e.g. ``batch_size``). :func:`load_config` checks
all of it, so a bad setting fails before a run writes anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import tomllib

from l2b_fast import datasets
from l2b_fast.train import TrainConfig

# [retrain] keys the pipeline reads itself (not trainer settings).
PIPELINE_KEYS = ("baselines",)
# [search] keys of a budgeted search (TrainConfig fields), not for a fixed tree's training.
BUDGET_KEYS = ("budget_parameters", "budget_flops", "budget_weight")
TRAINER_FIELDS = {field.name for field in dataclasses.fields(TrainConfig)} - {"seed", "progress"}


def preset_names() -> list[str]:
    files = resources.files("l2b_fast.presets").iterdir()
    return sorted(p.name.removesuffix(".toml") for p in files if p.name.endswith(".toml"))


def preset_descriptions() -> dict[str, str]:
    """``{preset: its one-line description}`` (the ``description`` key of each preset)."""
    return {name: load_config(preset=name).get("description", "") for name in preset_names()}


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return (resources.files("l2b_fast.presets") / f"{name}.toml").read_text()


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """A preset by name, or a TOML file (e.g. an edited copy of a preset), with ``overrides`` (``KEY=VALUE``,
    :func:`apply_overrides`) applied before it is checked (:func:`check_config`)."""
    if (preset is None) == (path is None):
        raise ValueError("give exactly one of a preset name or a config file")
    if preset is not None:
        text, source = preset_text(preset), f"preset {preset}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        text, source = path.read_text(), str(path)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: invalid TOML: {error}") from error
    apply_overrides(config, overrides)
    config.setdefault("name", Path(source).stem)
    check_config(config, source)
    return config


def check_config(config: Mapping, source: str) -> None:
    """ValueError (one line, naming ``source``) unless the config can run: its sections, its recipe's settings, and
    every ``[search]``/``[retrain]`` setting (keys, types and ranges of :class:`~l2b_fast.train.TrainConfig`)."""
    for section in ("data", "model", "search"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"{source}: missing [{section}] section")
    recipe = datasets.recipe(config["data"].get("kind"))
    for stage in ("search", "retrain"):
        settings = config.get(stage)
        if settings is None and stage == "retrain" and not recipe.reads_shards:
            continue  # retrain takes the search's settings
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: missing [{stage}] section")
        known = set(recipe.data_keys) | TRAINER_FIELDS | (set(PIPELINE_KEYS) if stage == "retrain" else set())
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{source}: unknown [{stage}] settings {unknown}; known: {sorted(known)}")
        budgets = sorted(key for key in settings if key in BUDGET_KEYS)
        if stage == "retrain" and budgets:
            raise ValueError(
                f"{source}: [retrain] {', '.join(budgets)}: a budget steers the search; set it in [search]"
            )
        missing = [key for key in recipe.required_keys if key not in settings]
        if missing:
            raise ValueError(f"{source}: [{stage}] needs {', '.join(missing)}")
        batch = settings["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{source}: [{stage}] batch_size must be a positive integer, got {batch!r}")
        try:
            train_config(settings, recipe, seed=0, progress=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: [{stage}] {error}") from None
    recipe.check_config(config, source)


def train_config(section: Mapping, recipe, *, seed: int, progress: bool) -> TrainConfig:
    """The trainer's settings of a ``[search]``/``[retrain]`` section (its data and pipeline keys left out)."""
    settings = {k: v for k, v in section.items() if k not in recipe.data_keys and k not in PIPELINE_KEYS}
    return TrainConfig(**settings, seed=seed, progress=progress)


def _settable(table_path: list[str], leaf: str) -> bool:
    """Whether ``leaf`` may be set in ``[search]``/``[retrain]`` although the file does not set it: a trainer setting,
    a data-shaping key of some recipe, or a pipeline key (the recipe's check decides whether it applies)."""
    if table_path not in (["search"], ["retrain"]):
        return False
    data_keys = {key for recipe in datasets.recipes() for key in recipe.data_keys}
    return leaf in TRAINER_FIELDS | data_keys | (set(PIPELINE_KEYS) if table_path == ["retrain"] else set())


def apply_overrides(config: dict, assignments: Sequence[str]) -> dict:
    """Sets each ``"dotted.key=VALUE"`` in ``config`` (in place; returned). The key must exist already, or be a
    trainer setting of ``[search]``/``[retrain]`` (a typo is a ValueError naming it); VALUE is read as a TOML
    value (``3``, ``1e-4``, ``true``, ``[64, 64]``, ``{kind = "constant"}``, ``"text"``), a bare word that is not
    one as a string (``--set model.branching=stage``)."""
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. search.epochs=3")
        *parents, leaf = key.split(".")
        table = config
        for depth, part in enumerate(parents):
            table = table.get(part) if isinstance(table, dict) else None
            if not isinstance(table, dict):
                where = ".".join(parents[: depth + 1])
                raise ValueError(f"--set {key}: unknown key ({where} is not a table of the config)")
        if not isinstance(table, dict) or (leaf not in table and not _settable(parents, leaf)):
            known = (
                ", ".join(sorted(k for k in table if not isinstance(table[k], dict))) if isinstance(table, dict) else ""
            )
            raise ValueError(f"--set {key}: unknown key" + (f"; keys here: {known}" if known else ""))
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table[leaf] = value
    return config
