"""The synthetic experiment (paper Sec. 4.1): data, presets and a short search that must find the groups."""

from __future__ import annotations

import math

import pytest
import torch

from l2b_fast import experiment, synthetic
from l2b_fast.tree import Tree
from conftest import bent_square_toml

SHORT = bent_square_toml(
    tasks=3, samples=2000, hidden=32, validation=0.0,
    search={"epochs": 30, "batch_size": 100, "warmup_epochs": 3, "lr_weights": 3e-3, "lr_logits": 0.2,
            "tau": '{ kind = "inverse_sqrt", tau0 = 20.0, min = 0.1 }', "log_every": 20},
)


def test_activations():
    x = torch.tensor([-2.0, 0.0, 1.5])
    torch.testing.assert_close(synthetic.ACTIVATIONS["bent"](x), (torch.sqrt(x * x + 1) - 1) / 2 + x)
    torch.testing.assert_close(synthetic.ACTIVATIONS["sinc"](x), torch.tensor([math.sin(-2.0) / -2.0, 1.0, math.sin(1.5) / 1.5]))


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


def test_presets_load_and_name_their_tasks():
    assert {"synthetic-a", "synthetic-b", "synthetic-c"} <= set(experiment.preset_names())
    expected_groups = {"synthetic-a": {"bent", "square", "sinc"}, "synthetic-b": {"sin_x1", "sin_x2", "sin_x3"}, "synthetic-c": {"cos", "sinc", "square"}}
    for name, groups in expected_groups.items():
        config = experiment.load_config(preset=name)
        names = synthetic.task_names(experiment._groups(config))
        assert len(names) == 15 and {n.rsplit("-", 1)[0] for n in names} == groups
    with pytest.raises(ValueError, match="unknown preset"):
        experiment.load_config(preset="synthetic-z")


def test_expected_outcome_checks():
    tasks = [f"{g}-{s}" for g in ("bent", "square", "sinc") for s in range(2)]
    grouped = Tree(tasks, [[0, 0], [0, 1, 1], [0, 0, 1, 1, 2, 2]])
    assert experiment.check_outcome(grouped, "a")
    assert not experiment.check_outcome(Tree(tasks, [[0, 0], [0, 1, 1], [0, 1, 1, 1, 2, 2]]), "a")
    assert experiment.check_outcome(Tree(tasks, [[0], [0], [0] * 6]), "b")
    assert not experiment.check_outcome(grouped, "b")
    c_tasks = [f"{g}-{s}" for g in ("cos", "sinc", "square") for s in range(2)]
    assert experiment.check_outcome(Tree(c_tasks, [[0, 0], [0, 1], [0, 0, 0, 0, 1, 1]]), "c")
    assert not experiment.check_outcome(Tree(c_tasks, [[0, 0], [0, 0], [0, 0, 0, 0, 1, 1]]), "c")  # split only at the leaf


def test_short_search_groups_two_task_families(tmp_path):
    """bent vs square: after a short search every family has its own leaf branch (~10 s on 2 cores)."""
    path = tmp_path / "short.toml"
    path.write_text(SHORT)
    summary = experiment.search(experiment.load_config(path=path), tmp_path / "run", seed=0, progress=False)
    tree = Tree.load(tmp_path / "run" / "tree.json")
    leaves = {task.rsplit("-", 1)[0]: set() for task in tree.tasks}
    for task, parent in zip(tree.tasks, tree.parents[-1]):
        leaves[task.rsplit("-", 1)[0]].add(parent)
    assert leaves["bent"].isdisjoint(leaves["square"]) and all(len(v) == 1 for v in leaves.values()), tree
    assert summary["outcome_holds"] is True
    assert summary["tree_parameters"] < summary["supernet_parameters"]
