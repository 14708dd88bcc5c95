"""The synthetic experiment (paper Sec. 4.1): data, presets and a short search that must find the groups."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import bent_square_toml
from l2b_fast import config as configs
from l2b_fast import pipeline
from l2b_fast.datasets.synthetic import RECIPE, outcomes
from l2b_fast.datasets.synthetic import tasks as synthetic
from l2b_fast.nn import TreeNet, parameter_count
from l2b_fast.tree import Tree

SHORT = bent_square_toml(
    tasks=3,
    samples=2000,
    hidden=32,
    validation=0.0,
    search={
        "epochs": 30,
        "batch_size": 100,
        "warmup_epochs": 3,
        "lr_weights": 3e-3,
        "lr_logits": 0.2,
        "tau": '{ kind = "inverse_sqrt", tau0 = 20.0, min = 0.1 }',
        "log_every": 20,
    },
)


def test_activations():
    x = torch.tensor([-2.0, 0.0, 1.5])
    torch.testing.assert_close(synthetic.ACTIVATIONS["bent"](x), (torch.sqrt(x * x + 1) - 1) / 2 + x)
    torch.testing.assert_close(
        synthetic.ACTIVATIONS["sinc"](x), torch.tensor([math.sin(-2.0) / -2.0, 1.0, math.sin(1.5) / 1.5])
    )


def test_task_names_and_shapes():
    groups = [synthetic.TaskGroup("bent", 2), synthetic.TaskGroup("sin", 3, multiplier=2.0)]
    assert synthetic.task_names(groups) == ["bent-0", "bent-1", "sin_x2-0", "sin_x2-1", "sin_x2-2"]
    inputs, targets = synthetic.make_tasks(groups, 50, standardise=False, seed=1)
    assert inputs.shape == (50, 200) and all(t.shape == (50, 100) for t in targets.values())
    again = synthetic.make_tasks(groups, 50, standardise=False, seed=1)[1]
    assert all(torch.equal(targets[k], again[k]) for k in targets)  # reproducible from the seed
    assert targets["sin_x2-0"].abs().max() <= 2.0  # multiplier 2 times sin
    standardised = synthetic.make_tasks(groups, 50, seed=1)[1]
    torch.testing.assert_close(standardised["bent-0"].mean(0), torch.zeros(100), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown activation"):
        synthetic.make_tasks([synthetic.TaskGroup("relu")], 10)


def test_tasks_are_drawn_in_float64_and_cast():
    groups = [synthetic.TaskGroup("square", 2)]
    inputs, targets = synthetic.make_tasks(groups, 40, seed=3, dtype=torch.float64)
    inputs32, targets32 = synthetic.make_tasks(groups, 40, seed=3)
    assert inputs.dtype == targets["square-0"].dtype == torch.float64 and inputs32.dtype == torch.float32
    assert torch.equal(inputs.float(), inputs32) and torch.equal(targets["square-1"].float(), targets32["square-1"])
    with pytest.raises(TypeError, match="dtype"):
        synthetic.make_tasks(groups, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="phi"):
        synthetic.make_tasks(groups, 4, phi=0.0)


def test_learning_report_names_the_tasks_that_did_not_learn():
    final = {"loss": 1.4, "a-0": 0.1, "a-1": 0.2, "b-0": 0.9, "val_a-0": 0.2, "val_a-1": 0.3, "val_b-0": 0.95}
    report = outcomes.learning_report(final, ["a-0", "a-1", "b-0"], 0.5)
    assert report["task_losses_split"] == "validation" and report["task_losses"] == {
        "a-0": 0.2,
        "a-1": 0.3,
        "b-0": 0.95,
    }
    assert report["group_losses"] == pytest.approx({"a": 0.25, "b": 0.95})
    assert (
        not report["all_tasks_learned"]
        and report["tasks_not_learned"] == ["b-0"]
        and report["learned_threshold"] == 0.5
    )
    training_only = outcomes.learning_report({"a-0": 0.1, "b-0": 0.4}, ["a-0", "b-0"], 0.5)
    assert training_only["task_losses_split"] == "training" and training_only["all_tasks_learned"]
    assert outcomes.learning_report({"a-0": float("nan")}, ["a-0"], 0.5)["tasks_not_learned"] == [
        "a-0"
    ]  # NaN never "learned"


def test_baseline_trees_have_the_searched_node_widths():
    tasks = ["a-0", "a-1", "b-0"]
    shared, alone = pipeline.baseline_trees(tasks, 4).values()
    assert shared.widths == [1, 1, 1, 1, 3] and shared.parents[-1] == [0, 0, 0]
    assert alone.widths == [3, 3, 3, 3, 3] and all(layer == [0, 1, 2] for layer in alone.parents[1:])
    blocks = synthetic.blocks(len(tasks), input_dim=6, hidden=5, output_dim=4, fc_blocks=4)
    shared_net, alone_net = TreeNet(shared, blocks), TreeNet(alone, blocks)
    trunk = (6 * 5 + 5) + 2 * (5 * 5 + 5) + (5 * 4 + 4)
    assert parameter_count(shared_net) == trunk + 3 * 4 and parameter_count(alone_net) == 3 * trunk + 3 * 4


def test_presets_load_and_name_their_tasks():
    assert {"synthetic-a", "synthetic-b", "synthetic-c"} <= set(configs.preset_names())
    expected_groups = {
        "synthetic-a": {"bent", "square", "sinc"},
        "synthetic-b": {"sin_x1", "sin_x2", "sin_x3"},
        "synthetic-c": {"cos", "sinc", "square"},
    }
    for name, groups in expected_groups.items():
        config = configs.load_config(preset=name)
        names = synthetic.task_names(RECIPE.groups(config))
        assert len(names) == 15 and {n.rsplit("-", 1)[0] for n in names} == groups
        assert config["description"].startswith(f"paper Fig. 3({name[-1]})") and config["expected"] == name[-1]
        assert config["model"]["dtype"] == "float64" and 0 < config["learned_threshold"] < 1
    assert set(configs.preset_descriptions()) == set(configs.preset_names())
    with pytest.raises(ValueError, match="unknown preset"):
        configs.load_config(preset="synthetic-z")


def test_expected_outcome_checks():
    tasks = [f"{g}-{s}" for g in ("bent", "square", "sinc") for s in range(2)]
    grouped = Tree(tasks, [[0, 0], [0, 1, 1], [0, 0, 1, 1, 2, 2]])
    assert outcomes.check_outcome(grouped, "a")
    assert not outcomes.check_outcome(Tree(tasks, [[0, 0], [0, 1, 1], [0, 1, 1, 1, 2, 2]]), "a")
    assert outcomes.check_outcome(Tree(tasks, [[0], [0], [0] * 6]), "b")
    assert not outcomes.check_outcome(grouped, "b")
    c_tasks = [f"{g}-{s}" for g in ("cos", "sinc", "square") for s in range(2)]
    assert outcomes.check_outcome(Tree(c_tasks, [[0, 0], [0, 1], [0, 0, 0, 0, 1, 1]]), "c")
    assert not outcomes.check_outcome(
        Tree(c_tasks, [[0, 0], [0, 0], [0, 0, 0, 0, 1, 1]]), "c"
    )  # split only at the leaf


# Few inputs and outputs, so that square (an even function: no first-order signal) is learnable in seconds.
TINY_LEARNABLE = bent_square_toml(
    tasks=2,
    samples=1000,
    hidden=48,
    validation=0.2,
    search={
        "epochs": 20,
        "batch_size": 50,
        "warmup_epochs": 2,
        "lr_weights": 3e-3,
        "lr_logits": 0.1,
        "weight_decay_weights": 1e-4,
        "tau": '{ kind = "inverse_sqrt", tau0 = 10.0 }',
        "log_every": 20,
    },
).replace("[model]", 'input_dim = 16\noutput_dim = 4\n[model]\ndtype = "float64"')


def test_every_task_learns_on_a_tiny_config(tmp_path):
    """Square and bent both end far below the mean predictor's loss (1 on z-scored targets), and the
    summary says so; the tree groups them apart."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_LEARNABLE)
    summary = pipeline.search(configs.load_config(path=path), tmp_path / "run", seed=0, progress=False)
    losses = summary["task_losses"]
    assert summary["task_losses_split"] == "validation" and set(losses) == {"bent-0", "bent-1", "square-0", "square-1"}
    assert max(losses.values()) < 0.5, losses
    assert summary["all_tasks_learned"] and summary["tasks_not_learned"] == [] and summary["learned_threshold"] == 0.5
    assert summary["numerics"]["dtype"] == "float64" and summary["outcome_holds"] is True
    with open(tmp_path / "run" / "epochs.csv") as handle:
        first_epoch = next(csv.DictReader(handle))
    assert float(first_epoch["val_loss.square-0"]) > 2 * losses["square-0"]  # it learned during the run


def test_config_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY_LEARNABLE.replace('dtype = "float64"', 'dtype = "float16"'))
    with pytest.raises(ValueError, match="dtype"):
        configs.load_config(path=path)
    path.write_text(TINY_LEARNABLE.replace('expected = "a"', 'expected = "a"\nlearned_threshold = -1'))
    with pytest.raises(ValueError, match="learned_threshold"):
        configs.load_config(path=path)


def test_short_search_groups_two_task_families(tmp_path):
    """bent vs square: after a short search every family has its own leaf branch (~10 s on 2 cores)."""
    path = tmp_path / "short.toml"
    path.write_text(SHORT)
    summary = pipeline.search(configs.load_config(path=path), tmp_path / "run", seed=0, progress=False)
    tree = Tree.load(tmp_path / "run" / "tree.json")
    leaves = {task.rsplit("-", 1)[0]: set() for task in tree.tasks}
    for task, parent in zip(tree.tasks, tree.parents[-1]):
        leaves[task.rsplit("-", 1)[0]].add(parent)
    assert leaves["bent"].isdisjoint(leaves["square"]) and all(len(v) == 1 for v in leaves.values()), tree
    assert summary["outcome_holds"] is True
    assert summary["tree_parameters"] < summary["supernet_parameters"]
