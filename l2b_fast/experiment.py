"""Search -> derive -> prune -> retrain from a config (a preset or a user's TOML file).

Outputs of ``search`` in ``out``: ``tree.json`` (pruned derived tree), ``tree.png``/``tree.svg``,
``probabilities.png``/``.svg`` (branching probabilities over training), ``log.csv``, ``epochs.csv``,
``checkpoints/last.pt`` and ``summary.json`` (losses, parameter counts, timing, the expected-outcome check).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from l2b_fast import synthetic
from l2b_fast.nn import TreeNet, TreeSupernet, parameter_count
from l2b_fast.train import TrainConfig, Trainer
from l2b_fast.tree import Tree, derive
from l2b_fast.viz import task_group


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("l2b_fast.presets").iterdir() if p.name.endswith(".toml"))


def load_config(preset: str | None = None, path: str | Path | None = None) -> dict:
    """A preset by name, or a TOML file (e.g. an edited copy of a preset)."""
    if (preset is None) == (path is None):
        raise ValueError("give exactly one of a preset name or a config file")
    if preset is not None:
        if preset not in preset_names():
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(preset_names())}")
        text, source = (resources.files("l2b_fast.presets") / f"{preset}.toml").read_text(), f"preset {preset}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        text, source = path.read_text(), str(path)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: invalid TOML: {error}") from error
    for section in ("data", "model", "search"):
        if section not in config:
            raise ValueError(f"{source}: missing [{section}] section")
    if config["data"].get("kind") != "synthetic":
        raise ValueError(f"{source}: data kind {config['data'].get('kind')!r} is not supported (supported: synthetic)")
    config.setdefault("name", Path(source).stem)
    return config


def _groups(config: dict) -> list[synthetic.TaskGroup]:
    try:
        return [synthetic.TaskGroup(**group) for group in config["data"]["groups"]]
    except TypeError as error:
        raise ValueError(f"[data] groups: {error}") from error


def build_data(config: dict, seed: int):
    data = config["data"]
    inputs, targets = synthetic.make_tasks(
        _groups(config),
        data.get("samples", 8000),
        b_var=data.get("b_var", 10.0),
        delta_var=data.get("delta_var", 2.0),
        standardise=data.get("standardise", True),
        seed=seed,
    )
    return synthetic.split(inputs, targets, data.get("validation_fraction", 0.1))


def build_blocks(config: dict, tasks: list[str]):
    model = config["model"]
    return synthetic.blocks(len(tasks), hidden=model.get("hidden", 100), fc_blocks=model.get("fc_blocks", 4), nodes=model.get("nodes", 3))


def train_config(section: dict, seed: int, progress: bool) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(section) - fields
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(fields)}")
    return TrainConfig(**{**section, "seed": seed, "progress": progress})


def mse_losses(tasks: list[str]) -> dict:
    return {task: nn.functional.mse_loss for task in tasks}


def search(config: dict, out: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Trains the supernet, derives and prunes the tree, writes the outputs; returns the summary."""
    out = Path(out)
    train, val = build_data(config, seed)
    tasks = list(train.targets)
    blocks = build_blocks(config, tasks)
    torch.manual_seed(seed)
    supernet = TreeSupernet(blocks, tasks)
    trainer = Trainer(supernet, mse_losses(tasks), train, train_config(config["search"], seed, progress), out, val_data=val, device=device)
    started = time.time()
    final = trainer.fit(resume=resume)
    tree = derive(supernet).pruned()
    tree.save(out / "tree.json")
    summary = {
        "name": config["name"],
        "seed": seed,
        "seconds": round(time.time() - started, 1),
        "final": final,
        "supernet_parameters": parameter_count(supernet),
        "tree_parameters": parameter_count(TreeNet(tree, blocks)),
        "probabilities": [p.tolist() for p in supernet.probabilities()],
        "expected": config.get("expected"),
        "outcome_holds": check_outcome(tree, config["expected"]) if config.get("expected") else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _draw(tree, out, config["name"])
    return summary


def _draw(tree: Tree, out: Path, name: str) -> None:
    from l2b_fast import viz

    try:
        viz.draw_tree(tree.to_dict(), out / "tree", title=name)
        viz.draw_probability_heatmaps(out / "log.csv", out / "probabilities", title=f"{name}: branching probabilities", tasks=tree.tasks)
    except ImportError as error:  # matplotlib missing: the tree and logs are still written
        print(f"no pictures ({error}); tree.json and logs are written", file=sys.stderr)


def retrain(config: dict, tree: Tree, out: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Trains the derived tree from scratch (fresh initialisation) and reports test-time losses."""
    out = Path(out)
    train, val = build_data(config, seed)
    if list(train.targets) != tree.tasks:
        raise ValueError(f"the tree's tasks {tree.tasks} do not match the config's tasks {list(train.targets)}")
    torch.manual_seed(seed + 1)
    net = TreeNet(tree, build_blocks(config, tree.tasks))
    section = config.get("retrain", config["search"])
    section = {k: v for k, v in section.items() if k not in ("lr_logits", "weight_decay_logits", "tau", "warmup_epochs")}
    trainer = Trainer(net, mse_losses(tree.tasks), train, train_config(section, seed, progress), out, val_data=val, device=device)
    started = time.time()
    final = trainer.fit(resume=resume)
    summary = {"name": config["name"], "seed": seed, "seconds": round(time.time() - started, 1), "final": final, "parameters": parameter_count(net)}
    (out / "retrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------- expected outcomes
def _paths(tree: Tree) -> dict[str, tuple[int, ...]]:
    """Each task's ancestors in the fully-connected layers (layer 0 .. the last before the task layer)."""
    paths = {}
    for k, task in enumerate(tree.tasks):
        node, path = tree.parents[-1][k], []
        for layer in range(len(tree.parents) - 2, -1, -1):
            path.append(node)
            node = tree.parents[layer][node]
        paths[task] = tuple(reversed(path))
    return paths


def check_outcome(tree: Tree, expected: str) -> bool:
    """Paper Fig. 3: (a) each group has its own leaf branch; (b) every task shares every layer;
    (c) cos and sinc share a leaf, square has its own and splits from them before the leaf layer."""
    paths = _paths(tree)
    leaves: dict[str, set[int]] = {}
    for task, path in paths.items():
        leaves.setdefault(task_group(task), set()).add(path[-1])
    if expected == "a":
        return all(len(nodes) == 1 for nodes in leaves.values()) and len(set().union(*leaves.values())) == len(leaves)
    if expected == "b":
        return len(set(paths.values())) == 1
    if expected == "c":
        if not {"cos", "sinc", "square"} <= set(leaves) or any(len(leaves[g]) != 1 for g in ("cos", "sinc", "square")):
            return False
        if leaves["cos"] != leaves["sinc"] or leaves["square"] == leaves["cos"]:
            return False
        square = next(p for t, p in paths.items() if task_group(t) == "square")
        cos = next(p for t, p in paths.items() if task_group(t) == "cos")
        return len(square) >= 2 and square[-2] != cos[-2]
    raise ValueError(f"unknown expected outcome {expected!r} (a, b or c)")
