"""Search -> derive -> prune -> retrain from a config (a preset or a user's TOML file).

Outputs of ``search`` in ``out``: ``tree.json`` (pruned derived tree), ``tree.png``/``tree.svg``,
``probabilities.png``/``.svg`` (branching probabilities over training), ``log.csv``, ``epochs.csv``,
``checkpoints/last.pt`` and ``summary.json`` (losses, per-task validation losses and whether every task
learned, parameter counts, timing, numerics, the expected-outcome check). ``retrain`` trains the derived
tree from scratch beside two baselines of the same node widths (all tasks sharing every layer, every task
alone) and writes ``retrain_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from importlib import resources
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from l2b_fast import synthetic, viz
from l2b_fast.nn import TreeNet, TreeSupernet, parameter_count
from l2b_fast.train import TrainConfig, Trainer
from l2b_fast.tree import Tree, derive
from l2b_fast.viz import task_group

DEFAULT_LEARNED_THRESHOLD = 0.5  # a task learned when its final loss on z-scored targets is below this
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("l2b_fast.presets").iterdir() if p.name.endswith(".toml"))


def preset_descriptions() -> dict[str, str]:
    """``{preset: its one-line description}`` (the ``description`` key of each preset)."""
    return {name: load_config(preset=name).get("description", "") for name in preset_names()}


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    return (resources.files("l2b_fast.presets") / f"{name}.toml").read_text()


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """A preset by name, or a TOML file (e.g. an edited copy of a preset), with ``overrides`` (``KEY=VALUE``,
    :func:`apply_overrides`) applied before it is checked."""
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
    for section in ("data", "model", "search"):
        if section not in config:
            raise ValueError(f"{source}: missing [{section}] section")
    apply_overrides(config, overrides)
    config.setdefault("name", Path(source).stem)
    if is_streaming(config):  # CelebA / Taskonomy shards: l2b_fast.pipeline
        from l2b_fast import pipeline

        pipeline.check_config(config, source)
        return config
    if config["data"].get("kind") != "synthetic":
        raise ValueError(f"{source}: data kind {config['data'].get('kind')!r} is not supported (supported: synthetic, celeba, taskonomy)")
    dtype = config["model"].get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"{source}: [model] dtype {dtype!r} is not one of {sorted(DTYPES)}")
    threshold = config.get("learned_threshold", DEFAULT_LEARNED_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"{source}: learned_threshold must be a positive number, got {threshold!r}")
    return config


STREAMING_KINDS = ("celeba", "taskonomy")


def is_streaming(config: dict) -> bool:
    """True for a config of shard data (run by :mod:`l2b_fast.pipeline`), False for the synthetic experiment."""
    return config.get("data", {}).get("kind") in STREAMING_KINDS


def apply_overrides(config: dict, assignments: Sequence[str]) -> dict:
    """Sets each ``"dotted.key=VALUE"`` in ``config`` (in place; returned). The key must exist already (a typo
    is a ValueError naming it); VALUE is read as a TOML value (``3``, ``1e-4``, ``true``, ``[64, 64]``,
    ``{kind = "constant"}``, ``"text"``), a bare word that is not one as a string (``--set model.branching=stage``)."""
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
                raise ValueError(f"--set {key}: unknown key ({'.'.join(parents[: depth + 1])} is not a table of the config)")
        if not isinstance(table, dict) or leaf not in table:
            known = ", ".join(sorted(k for k in table if not isinstance(table[k], dict))) if isinstance(table, dict) else ""
            raise ValueError(f"--set {key}: unknown key" + (f"; keys here: {known}" if known else ""))
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table[leaf] = value
    return config


def model_dtype(config: dict) -> torch.dtype:
    return DTYPES[config["model"].get("dtype", "float32")]


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
        input_dim=data.get("input_dim", 200),
        output_dim=data.get("output_dim", 100),
        b_var=data.get("b_var", 10.0),
        delta_var=data.get("delta_var", 2.0),
        phi=data.get("phi"),
        standardise=data.get("standardise", True),
        seed=seed,
        dtype=model_dtype(config),
    )
    return synthetic.split(inputs, targets, data.get("validation_fraction", 0.1))


def build_blocks(config: dict, tasks: list[str]):
    model, data = config["model"], config["data"]
    return synthetic.blocks(
        len(tasks), input_dim=data.get("input_dim", 200), hidden=model.get("hidden", 100), output_dim=data.get("output_dim", 100),
        fc_blocks=model.get("fc_blocks", 4), nodes=model.get("nodes", 3),
    )


def train_config(section: dict, seed: int, progress: bool) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(section) - fields
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(fields)}")
    return TrainConfig(**{**section, "seed": seed, "progress": progress})


def mse_losses(tasks: list[str]) -> dict:
    return {task: nn.functional.mse_loss for task in tasks}


def numerics() -> dict:
    """What decides the last bits of a run on this CPU (recorded in the summaries)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def learning_report(final: dict[str, float], tasks: list[str], threshold: float) -> dict:
    """Per-task final losses (validation when there is a validation split) and whether each task learned:
    its loss on z-scored targets below ``threshold`` (predicting the mean scores 1)."""
    split = "validation" if all(f"val_{task}" in final for task in tasks) else "training"
    losses = {task: final[f"val_{task}"] if split == "validation" else final[task] for task in tasks}
    not_learned = [task for task in tasks if not losses[task] < threshold]
    return {
        "task_losses_split": split,
        "task_losses": losses,
        "group_losses": _group_means(losses),
        "learned_threshold": threshold,
        "all_tasks_learned": not not_learned,
        "tasks_not_learned": not_learned,
    }


def _group_means(losses: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for task, value in losses.items():
        groups.setdefault(task_group(task), []).append(value)
    return {group: sum(values) / len(values) for group, values in groups.items()}


def search(config: dict, out: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Trains the supernet, derives and prunes the tree, writes the outputs; returns the summary."""
    out = Path(out)
    train, val = build_data(config, seed)
    tasks = list(train.targets)
    blocks = build_blocks(config, tasks)
    torch.manual_seed(seed)
    supernet = TreeSupernet(blocks, tasks).to(model_dtype(config))
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
        **learning_report(final, tasks, config.get("learned_threshold", DEFAULT_LEARNED_THRESHOLD)),
        "supernet_parameters": parameter_count(supernet),
        "tree_parameters": parameter_count(TreeNet(tree, blocks)),
        "probabilities": [p.tolist() for p in supernet.probabilities()],
        "expected": config.get("expected"),
        "outcome_holds": check_outcome(tree, config["expected"]) if config.get("expected") else None,
        "numerics": {"dtype": str(model_dtype(config)).removeprefix("torch."), **numerics()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    viz.draw_search_pictures(tree.to_dict(), out, config["name"])
    return summary


RETRAIN_MODELS = ("learned_tree", "all_shared", "independent")
RETRAIN_DESCRIPTIONS = {
    "learned_tree": "the searched tree",
    "all_shared": "all tasks share every layer",
    "independent": "every task alone",
}


def baseline_trees(tasks: list[str], fc_layers: int) -> dict[str, Tree]:
    """The two trees a learned tree is compared with, over the same node widths: every task on one
    shared trunk (one node per layer), and every task alone (one path per task)."""
    return {"all_shared": Tree.all_shared(tasks, fc_layers), "independent": Tree.independent(tasks, fc_layers)}


def retrain(
    config: dict, tree: Tree, out: str | Path, *, seed: int = 0, resume: bool = False, progress: bool = True, device: str = "cpu",
    baselines: bool = True,
) -> dict:
    """Trains the derived tree from scratch (fresh initialisation) and reports its final losses, beside
    the same training of the two baselines (``baselines=True``): ``out`` holds the tree's logs,
    ``out/baselines/<name>/`` each baseline's, ``out/retrain_summary.json`` all three."""
    out = Path(out)
    train, val = build_data(config, seed)
    if list(train.targets) != tree.tasks:
        raise ValueError(f"the tree's tasks {tree.tasks} do not match the config's tasks {list(train.targets)}")
    models = {"learned_tree": (tree, out)}
    if baselines:
        for name, baseline in baseline_trees(tree.tasks, len(tree.parents) - 1).items():
            models[name] = (baseline, out / "baselines" / name)
    section = config.get("retrain", config["search"])
    section = {k: v for k, v in section.items() if k not in ("lr_logits", "weight_decay_logits", "tau", "warmup_epochs")}
    threshold = config.get("learned_threshold", DEFAULT_LEARNED_THRESHOLD)
    results = {}
    for name, (model_tree, model_out) in models.items():
        torch.manual_seed(seed + 1)
        net = TreeNet(model_tree, build_blocks(config, tree.tasks)).to(model_dtype(config))
        trainer = Trainer(net, mse_losses(tree.tasks), train, train_config(section, seed, progress), model_out, val_data=val, device=device)
        started = time.time()
        # a baseline the killed run had not reached yet starts afresh; the learned tree must resume
        final = trainer.fit(resume=resume and (name == "learned_tree" or (model_out / "checkpoints" / "last.pt").is_file()))
        results[name] = {
            "description": RETRAIN_DESCRIPTIONS[name],
            "tree": model_tree.to_dict(),
            "parameters": parameter_count(net),
            "seconds": round(time.time() - started, 1),
            "final": final,
            **learning_report(final, tree.tasks, threshold),
        }
    learned = results["learned_tree"]
    summary = {
        "name": config["name"],
        "seed": seed,
        "seconds": learned["seconds"],
        "final": learned["final"],
        "parameters": learned["parameters"],
        "models": results,
        "numerics": {"dtype": str(model_dtype(config)).removeprefix("torch."), **numerics()},
    }
    (out / "retrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def retrain_table(summary: dict) -> str:
    """The retrained models side by side: parameters, mean final loss, per-group means, seconds."""
    models = summary["models"]
    groups = list(next(iter(models.values()))["group_losses"])
    split = next(iter(models.values()))["task_losses_split"]
    header = ["model", "parameters", f"{split} loss (mean)", *groups, "all learned", "seconds"]
    rows = [header]
    for name, result in models.items():
        losses = result["task_losses"]
        rows.append([
            f"{name} ({result['description']})", f"{result['parameters']:,}", f"{sum(losses.values()) / len(losses):.4f}",
            *(f"{result['group_losses'][g]:.4f}" for g in groups), "yes" if result["all_tasks_learned"] else "no", f"{result['seconds']:g}",
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))) for row in rows) + "\n"


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
