"""Search -> derive -> retrain (with baselines) -> evaluate, for any dataset recipe (:mod:`l2b_fast.datasets`).

A config (a preset or a user's TOML file, :mod:`l2b_fast.config`) names the data kind, whose recipe gives the tasks,
losses, metrics, model and data source; training is the one :class:`~l2b_fast.train.Trainer` (one process, or many
under ``torchrun``). Nothing here names a data set.

Outputs: ``search`` writes ``OUT/tree.json`` (derived, pruned), ``tree.png/.svg``, ``probabilities.png/.svg``,
``log.csv``, ``epochs.csv``, ``checkpoints/last.pt`` and ``summary.json``; ``retrain`` writes the same logs and
checkpoint for the tree trained from scratch, ``tree.json`` and ``config.json`` (so the folder alone can be
evaluated), each baseline's run under ``baselines/<name>/``, and ``retrain_summary.json``; ``evaluate`` writes
``RUN/eval.json``. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from l2b_fast import config as configs
from l2b_fast import datasets, viz
from l2b_fast.nn import parameter_count
from l2b_fast.nn.cost import TreeCost, module_flops
from l2b_fast.train import Trainer, distributed
from l2b_fast.tree import Tree, derive

RETRAIN_DESCRIPTIONS = {
    "learned_tree": "the searched tree",
    "all_shared": "all tasks share every layer",
    "independent": "every task alone",
}


def recipe_of(config: Mapping) -> datasets.Recipe:
    return datasets.recipe(config["data"]["kind"])


def baseline_trees(tasks: list[str], layers: int) -> dict[str, Tree]:
    """The two trees a learned tree is compared with, over the same node widths: every task on one
    shared trunk (one node per layer), and every task alone (one path per task)."""
    return {"all_shared": Tree.all_shared(tasks, layers), "independent": Tree.independent(tasks, layers)}


class _StepCounter:
    """Counts the optimizer steps this process ran (a resumed run's earlier steps are not timed)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, trainer: Trainer) -> None:
        self.steps += 1


def _timing(trainer: Trainer, section: Mapping, steps: int, seconds: float) -> dict:
    images = steps * section["batch_size"] * trainer.config.accumulation
    result = {
        "seconds": round(seconds, 2),
        "images": images,
        "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
    }
    if trainer.device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 3)
    return result


def _environment(context: distributed.DistContext) -> dict:
    device = context.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "world_size": context.world_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _train(config, recipe, net, source, section, out, *, seed, resume, progress, context) -> tuple[dict, dict]:
    """Trains ``net`` on ``source`` with ``section``'s settings; returns the last epoch's means and the timing."""
    trainer = Trainer(
        recipe.wrap(net),
        recipe.dataset(config),
        source.train(section, seed, context.world_size),
        configs.train_config(section, recipe, seed=seed, progress=progress),
        out,
        val_data=source.evaluation("val", section),
        context=context,
    )
    counter, started = _StepCounter(), time.perf_counter()
    final = trainer.fit(resume=resume, on_step=counter)
    return final, _timing(trainer, section, counter.steps, time.perf_counter() - started)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def search(
    config: Mapping,
    out: str | Path,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Trains the supernet, derives and prunes the tree, writes the outputs; returns the summary.

    ``data_dir``: the shards of a shard recipe (None: small synthetic shards made in ``out/synthetic-data``); a
    recipe that makes its data in memory takes None."""
    out = Path(out)
    recipe = recipe_of(config)
    context = distributed.setup(device)
    source = recipe.data(config, None if data_dir is None else Path(data_dir), out, seed)
    section = config["search"]
    spec = recipe.model_spec(config, section)
    torch.manual_seed(seed)
    supernet = recipe.supernet(config, spec)
    final, timing = _train(
        config, recipe, supernet, source, section, out, seed=seed, resume=resume, progress=progress, context=context
    )
    tree = derive(supernet).pruned()
    treenet = recipe.treenet(config, spec, tree)
    sample = spec.example_input(1, dtype=next(treenet.parameters()).dtype)
    tree_parameters, tree_flops = parameter_count(treenet), module_flops(treenet, sample)[0]
    budget = budget_report(section, supernet, sample, tree_parameters, tree_flops)
    summary = {
        "name": config["name"],
        "seed": seed,
        "data": source.description,
        "final": final,
        "timing": timing,
        "seconds": timing["seconds"],
        "supernet_parameters": parameter_count(supernet),
        "tree_parameters": tree_parameters,
        "tree_flops": tree_flops,
        **({"budget": budget} if budget else {}),
        "probabilities": [p.tolist() for p in supernet.probabilities()],
        "environment": _environment(context),
        **recipe.search_report(config, tree, final),
    }
    if context.is_main:
        tree.save(out / "tree.json")
        _write_json(out / "summary.json", summary)
        viz.draw_search_pictures(tree.to_dict(), out, config["name"])
    distributed.barrier()
    return summary


def budget_report(section: Mapping, supernet, sample, tree_parameters: int, tree_flops: int) -> dict | None:
    """The ``budget`` entry of ``summary.json`` (None without a budget): per budget set, its value, the derived
    tree's, the expected value under the final probabilities, whether the tree meets it and by how much it is over;
    ``met``: all are met."""
    trees = {"parameters": tree_parameters, "flops": tree_flops}
    report = {}
    for kind, tree_value in trees.items():
        limit = section.get(f"budget_{kind}")
        if limit is None:
            continue
        parameter = next(supernet.parameters())
        with torch.no_grad():
            cost = TreeCost.of_supernet(kind, supernet, sample.to(parameter.device))
            expected = cost.expected(supernet).item()
        report[kind] = {
            "budget": limit,
            "tree": tree_value,
            "expected": round(expected, 1),
            "met": tree_value <= limit,
            "over_by": max(0, tree_value - limit),
        }
    if not report:
        return None
    return {"met": all(entry["met"] for entry in report.values()), **report}


def budget_lines(summary: Mapping) -> list[str]:
    """The printed lines of a search's budget: met, or by how much the derived tree is over."""
    lines = []
    for kind, entry in summary.get("budget", {}).items():
        if kind == "met":
            continue
        unit = "parameters" if kind == "parameters" else "FLOPs per sample"
        state = (
            "met"
            if entry["met"]
            else f"NOT met: over by {entry['over_by']:,} ({100 * entry['over_by'] / entry['budget']:.1f}%)"
        )
        lines.append(f"budget {entry['budget']:,} {unit}: derived tree {entry['tree']:,}, {state}")
    return lines


def retrain(
    config: Mapping,
    tree: Tree,
    out: str | Path,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    baselines: bool | None = None,
) -> dict:
    """Trains the derived tree from scratch and, with ``baselines`` (default: ``[retrain] baselines``, true unless
    the config says otherwise), the two baselines of the same node widths (all tasks sharing every layer; every task
    alone) with the same settings; writes and returns ``retrain_summary.json``."""
    out = Path(out)
    recipe = recipe_of(config)
    context = distributed.setup(device)
    source = recipe.data(config, None if data_dir is None else Path(data_dir), out.parent, seed)
    section = config.get("retrain") or config["search"]
    tasks = list(recipe.dataset(config).tasks)
    if list(tree.tasks) != tasks:
        raise ValueError(f"the tree's tasks {list(tree.tasks)} do not match the config's {tasks}")
    if baselines is None:
        baselines = bool(section.get("baselines", True))
    models = {"learned_tree": (tree, out)}
    if baselines:
        for name, baseline in baseline_trees(tasks, len(tree.parents) - 1).items():
            models[name] = (baseline, out / "baselines" / name)
    spec = recipe.model_spec(config, section)
    results = {}
    for name, (model_tree, model_out) in models.items():
        torch.manual_seed(seed + 1)
        net = recipe.treenet(config, spec, model_tree)
        # a baseline the killed run had not reached yet starts afresh; the learned tree must resume
        resume_this = resume and (name == "learned_tree" or (model_out / "checkpoints" / "last.pt").is_file())
        final, timing = _train(
            config,
            recipe,
            net,
            source,
            section,
            model_out,
            seed=seed,
            resume=resume_this,
            progress=progress,
            context=context,
        )
        results[name] = {
            "description": RETRAIN_DESCRIPTIONS[name],
            "tree": model_tree.to_dict(),
            "parameters": parameter_count(net),
            "seconds": timing["seconds"],
            "timing": timing,
            "final": final,
            **recipe.retrain_report(config, model_tree, final),
        }
        if name == "learned_tree" and context.is_main:  # the folder alone can be evaluated
            tree.save(out / "tree.json")
            _write_json(out / "config.json", config)
    learned = results["learned_tree"]
    summary = {
        "name": config["name"],
        "seed": seed,
        "data": source.description,
        "final": learned["final"],
        "timing": learned["timing"],
        "seconds": learned["seconds"],
        "parameters": learned["parameters"],
        "models": results,
        "environment": _environment(context),
    }
    if context.is_main:
        _write_json(out / "retrain_summary.json", summary)
    distributed.barrier()
    return summary


def trained_run(run: str | Path) -> Path:
    """The folder holding a retrained tree: ``run`` itself, or ``run/retrain`` (a search folder); else ValueError."""
    run = Path(run)
    needed = ("tree.json", "config.json", "checkpoints/last.pt", "retrain_summary.json")
    for folder in (run / "retrain", run):
        if all((folder / name).is_file() for name in needed):
            return folder
    raise ValueError(
        f"{run} holds no retrained tree ({', '.join(needed)} in {run} or {run}/retrain): run `l2b retrain` first"
    )


def recorded_data(folder: str | Path) -> Path | None:
    """The shard directory a search or retrain in ``folder`` used, from its summary (None: data made in memory)."""
    folder = Path(folder)
    for summary in (folder / "summary.json", folder / "retrain_summary.json", folder.parent / "summary.json"):
        if summary.is_file():
            data = json.loads(summary.read_text()).get("data")
            return None if data is None else Path(data)
    raise ValueError(f"no summary.json in {folder} names the data: give --data DIR")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """The retrained tree of a run folder, rebuilt as the trainer ran it: ``net`` is ``recipe.wrap(TreeNet)``
    with the checkpoint's weights, on the CPU, in eval mode."""

    folder: Path
    config: dict
    recipe: datasets.Recipe
    spec: object  # the ModelSpec at the [retrain] stage (input shape, tasks)
    tree: Tree
    net: torch.nn.Module


def load_trained(run: str | Path) -> TrainedModel:
    """The retrained tree of ``run`` (see :func:`trained_run`) with its weights; ValueError (one line) when the
    folder holds none or its checkpoint does not fit its tree and config."""
    from l2b_fast.train.checkpoints import read_checkpoint

    folder = trained_run(run)
    config = json.loads((folder / "config.json").read_text())
    recipe = recipe_of(config)
    section = config.get("retrain") or config["search"]
    spec = recipe.model_spec(config, section)
    tree = Tree.load(folder / "tree.json")
    net = recipe.wrap(recipe.treenet(config, spec, tree))
    try:
        net.load_state_dict(read_checkpoint(folder / "checkpoints" / "last.pt", "cpu")["model"])
    except RuntimeError as error:  # weights of another tree, model or width
        first = str(error).splitlines()[0]
        raise ValueError(
            f"{folder}/checkpoints/last.pt does not fit the tree and model of {folder}/config.json ({first})"
        ) from None
    return TrainedModel(folder, config, recipe, spec, tree, net.eval())


@torch.no_grad()
def evaluate(run: str | Path, data_dir: str | Path | None = None, *, split: str = "test", device: str = "cpu") -> dict:
    """The retrained tree of ``run`` on ``split``: the data set's metrics over every sample once (ranks split the
    shards); writes ``run/eval.json`` and returns it, with the printed ``table``. ``data_dir`` None: the data the run
    used."""
    from l2b_fast.data.loader import sample_count_report

    run = Path(run)
    folder = trained_run(run)
    config = json.loads((folder / "config.json").read_text())
    recipe = recipe_of(config)
    if data_dir is None:
        data_dir = recorded_data(folder)
    seed = json.loads((folder / "retrain_summary.json").read_text()).get("seed", 0)
    source = recipe.data(config, None if data_dir is None else Path(data_dir), None, seed, splits=(split,))
    context = distributed.setup(device)
    section = config.get("retrain") or config["search"]
    dataset = recipe.dataset(config)
    net = load_trained(folder).net
    net.to(context.device).eval()
    loader = source.evaluation(split, section)
    if loader is None:
        raise ValueError(f"the {split!r} split is empty or missing")
    metrics = dataset.metrics()
    for batch in loader:
        inputs, targets, masks = (*batch, None)[:3]
        outputs = net(inputs.to(context.device))
        targets = {task: value.to(context.device) for task, value in targets.items()}
        masks = None if masks is None else {task: value.to(context.device) for task, value in masks.items()}
        task_targets, task_masks = dataset.task_targets(targets, masks)
        metrics.update(outputs, task_targets, task_masks)
    metrics.all_reduce()
    counts = sample_count_report(loader, metrics.samples)
    parameters = parameter_count(net)
    result = {
        "tasks": metrics.compute(),
        "parameters": parameters,
        "split": split,
        "samples": metrics.samples,
        "labelled": metrics.labelled(),
        "manifest_samples": counts["manifest_samples"],
        "missing_samples": counts["missing_samples"],
        "skipped_samples": counts["skipped_samples"],
        "shard_errors": counts["shard_errors"],
        "summary": metrics.summary(),
        "metrics": metrics.describe(),
        "data": source.description,
        "model": str(folder),
    }
    label = f"ours ({config['name']}, {split}, {metrics.samples} samples)"
    table = datasets.format_table(dataset, result["summary"], parameters, ours_label=label)
    if context.is_main:
        _write_json(run / "eval.json", result)
    distributed.barrier()
    return {**result, "table": table}
