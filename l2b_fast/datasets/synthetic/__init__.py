"""The paper's controlled synthetic experiment (Sec. 4.1, Fig. 3) as a dataset recipe: the tasks and their
generator (:mod:`.tasks`), losses and metrics (:mod:`.dataset`), the fully-connected model, and the checks of the
expected tree and of every task learning (:mod:`.outcomes`). Its data is made in memory from the config and seed."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from l2b_fast.data.tensors import TensorTaskData
from l2b_fast.datasets.recipe import DataSource, Recipe
from l2b_fast.datasets.synthetic import outcomes
from l2b_fast.datasets.synthetic.dataset import SyntheticMetrics, SyntheticTasks
from l2b_fast.datasets.synthetic.tasks import TaskGroup, blocks, make_tasks, task_names
from l2b_fast.nn.spec import ModelSpec

__all__ = ["RECIPE", "SyntheticMetrics", "SyntheticRecipe", "SyntheticTasks", "TaskGroup", "TensorSource"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TensorSource(DataSource):
    """Batches of in-memory splits (one process): ``{"train": TensorTaskData, "val": ..., "test": ...}``."""

    def __init__(self, splits: Mapping[str, TensorTaskData | None]):
        self.splits = {name: data for name, data in splits.items() if data is not None and len(data)}

    def train(self, section: Mapping, seed: int, world_size: int):
        if world_size != 1:
            raise ValueError("data made in memory trains in one process: run without torchrun")
        return self.splits["train"].loader(section["batch_size"], seed)

    def evaluation(self, split: str, section: Mapping):
        data = self.splits.get(split)
        return None if data is None else list(data.batches(section["batch_size"]))


def numerics() -> dict:
    """What decides the last bits of a run on this CPU (recorded in the summaries)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


class SyntheticRecipe(Recipe):
    name = "synthetic"
    description = "the paper's controlled synthetic experiment (Sec. 4.1, Fig. 3)"
    model_keys = ("dtype", "fc_blocks", "nodes", "hidden", "execution")

    def check_config(self, config: Mapping, source: str) -> None:
        dtype = config["model"].get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"{source}: [model] dtype {dtype!r} is not one of {sorted(DTYPES)}")
        unknown = sorted(set(config["model"]) - set(self.model_keys))
        if unknown:
            raise ValueError(f"{source}: unknown [model] settings {unknown}; known: {sorted(self.model_keys)}")
        threshold = config.get("learned_threshold", outcomes.DEFAULT_LEARNED_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"{source}: learned_threshold must be a positive number, got {threshold!r}")
        if config.get("expected") not in (None, "a", "b", "c"):
            raise ValueError(f"{source}: expected must be a, b or c, got {config['expected']!r}")
        self.dataset(config)

    @staticmethod
    def groups(config: Mapping) -> list[TaskGroup]:
        try:
            return [TaskGroup(**group) for group in config["data"]["groups"]]
        except (TypeError, KeyError) as error:
            raise ValueError(f"[data] groups: {error}") from None

    @staticmethod
    def dtype(config: Mapping) -> torch.dtype:
        return DTYPES[config["model"].get("dtype", "float32")]

    def dataset(self, config: Mapping) -> SyntheticTasks:
        return SyntheticTasks(tuple(task_names(self.groups(config))), config["data"].get("output_dim", 100))

    def model_spec(self, config: Mapping, section: Mapping) -> ModelSpec:
        model, data = config["model"], config["data"]
        sizes = {
            "input_dim": data.get("input_dim", 200),
            "hidden": model.get("hidden", 100),
            "output_dim": data.get("output_dim", 100),
            "fc_blocks": model.get("fc_blocks", 4),
            "nodes": model.get("nodes", 3),
        }
        tasks = self.dataset(config).tasks
        return ModelSpec("synthetic_fc", tuple(blocks(len(tasks), **sizes)), tasks, None, (sizes["input_dim"],), sizes)

    def supernet(self, config: Mapping, spec: ModelSpec):
        return spec.supernet(execution=config["model"].get("execution", "auto")).to(self.dtype(config))

    def treenet(self, config: Mapping, spec: ModelSpec, tree):
        return spec.treenet(tree).to(self.dtype(config))

    def data(self, config: Mapping, data_dir, out, seed: int, splits: tuple[str, ...] = ("train",)) -> TensorSource:
        self.check_data(config, data_dir, ())
        data = config["data"]
        samples = data.get("samples", 8000)
        n_val = int(round(samples * data.get("validation_fraction", 0.1)))
        test_samples = int(data.get("test_samples", max(n_val, 1)))
        inputs, targets, test = make_tasks(
            self.groups(config),
            samples,
            input_dim=data.get("input_dim", 200),
            output_dim=data.get("output_dim", 100),
            b_var=data.get("b_var", 10.0),
            delta_var=data.get("delta_var", 2.0),
            phi=data.get("phi"),
            standardise=data.get("standardise", True),
            seed=seed,
            dtype=self.dtype(config),
            test_samples=test_samples,
        )
        train = TensorTaskData(inputs[n_val:], {t: v[n_val:] for t, v in targets.items()})
        val = TensorTaskData(inputs[:n_val], {t: v[:n_val] for t, v in targets.items()}) if n_val else None
        return TensorSource({"train": train, "val": val, "test": test})

    def _threshold(self, config: Mapping) -> float:
        return config.get("learned_threshold", outcomes.DEFAULT_LEARNED_THRESHOLD)

    def search_report(self, config: Mapping, tree, final: Mapping) -> dict:
        expected = config.get("expected")
        return {
            **outcomes.learning_report(dict(final), list(tree.tasks), self._threshold(config)),
            "expected": expected,
            "outcome_holds": outcomes.check_outcome(tree, expected) if expected else None,
            "numerics": {"dtype": str(self.dtype(config)).removeprefix("torch."), **numerics()},
        }

    def retrain_report(self, config: Mapping, tree, final: Mapping) -> dict:
        return outcomes.learning_report(dict(final), list(tree.tasks), self._threshold(config))

    def report_lines(self, summary: Mapping) -> list[str]:
        lines = [outcomes.learning_line(summary)]
        if summary.get("outcome_holds") is not None:
            verdict = "holds" if summary["outcome_holds"] else "does NOT hold"
            lines.append(f"expected outcome ({summary['expected']}) {verdict}")
        return lines

    def retrain_lines(self, summary: Mapping) -> list[str]:
        return [retrain_table(summary)]


def retrain_table(summary: Mapping) -> str:
    """The retrained models side by side: parameters, mean final loss, per-group means, seconds."""
    models = summary["models"]
    groups = list(next(iter(models.values()))["group_losses"])
    split = next(iter(models.values()))["task_losses_split"]
    header = ["model", "parameters", f"{split} loss (mean)", *groups, "all learned", "seconds"]
    rows = [header]
    for name, result in models.items():
        losses = result["task_losses"]
        rows.append(
            [
                f"{name} ({result['description']})",
                f"{result['parameters']:,}",
                f"{sum(losses.values()) / len(losses):.4f}",
                *(f"{result['group_losses'][g]:.4f}" for g in groups),
                "yes" if result["all_tasks_learned"] else "no",
                f"{result['seconds']:g}",
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(lines)


RECIPE = SyntheticRecipe()
