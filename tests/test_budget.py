"""A budgeted search: the settings, the penalty the trainer adds, and what summary.json and `l2b search` report."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import bent_square_toml
from l2b_fast import cli, pipeline
from l2b_fast import config as configs
from l2b_fast.nn import BlockSpec, Branching, TreeNet, parameter_count
from l2b_fast.nn.cost import TreeCost
from l2b_fast.train import TrainConfig, Trainer
from l2b_fast.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

SEARCH = {
    "epochs": 6,
    "batch_size": 50,
    "warmup_epochs": 1,
    "lr_weights": 3e-3,
    "lr_logits": 0.2,
    "tau": '{ kind = "inverse_sqrt", tau0 = 20.0, min = 0.1 }',
    "sampling": '"global"',
    "log_every": 20,
}


def write_config(tmp_path, **search) -> str:
    path = tmp_path / "budget.toml"
    path.write_text(bent_square_toml(tasks=2, samples=600, hidden=16, validation=0.1, search={**SEARCH, **search}))
    return str(path)


def smallest_tree_parameters(config) -> int:
    """The all-shared tree's parameters: the least any derived tree of this supernet can have."""
    recipe = pipeline.recipe_of(config)
    spec = recipe.model_spec(config, config["search"])
    shared = Tree.all_shared(list(spec.tasks), len(spec.blocks) - 1)
    return parameter_count(TreeNet(shared, spec.blocks, spec.heads))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("search.budget_parameters=0", "budget_parameters must be a positive integer"),
        ("search.budget_flops=1.5", "budget_flops must be a positive integer"),
        ("search.budget_parameters=true", "budget_parameters must be a positive integer"),
        ("search.budget_weight=-1", "budget_weight must be a finite positive number"),
        ("search.budget_weight=nan", "budget_weight must be a finite positive number"),
        ("retrain.budget_parameters=100", "[retrain] budget_parameters: a budget steers the search"),
    ],
)
def test_bad_budget_settings_are_one_line_errors(setting, message):
    with pytest.raises(ValueError, match=r"^preset synthetic-c: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        configs.load_config(preset="synthetic-c", overrides=[setting])


def test_budget_settings_may_be_set_on_a_preset_without_them():
    config = configs.load_config(
        preset="synthetic-c", overrides=["search.budget_parameters=50000", "search.budget_weight=5"]
    )
    settings = configs.train_config(config["search"], pipeline.recipe_of(config), seed=0, progress=False)
    assert (settings.budget_parameters, settings.budget_flops, settings.budget_weight) == (50000, None, 5.0)


def test_penalty_is_the_weighted_relative_excess_and_waits_for_warmup(tmp_path):
    config = configs.load_config(path=write_config(tmp_path, budget_parameters=1000, budget_flops=2000))
    recipe = pipeline.recipe_of(config)
    spec = recipe.model_spec(config, config["search"])
    supernet = recipe.supernet(config, spec)
    settings = configs.train_config(config["search"], recipe, seed=0, progress=False)
    settings.budget_weight = 3.0
    source = recipe.data(config, None, tmp_path, 0)
    trainer = Trainer(supernet, recipe.dataset(config), source.train(config["search"], 0, 1), settings, tmp_path)
    inputs, targets = next(iter(source.train(config["search"], 0, 1)(0)))
    sample = inputs[:1]
    expected = {
        kind: TreeCost.of_supernet(kind, supernet, sample).expected(supernet) for kind in ("parameters", "flops")
    }
    want = 3.0 * (torch.relu(expected["parameters"] - 1000) / 1000 + torch.relu(expected["flops"] - 2000) / 2000)
    frozen_loss, _ = trainer._forward_losses(inputs, targets, None, frozen=True)
    assert trainer.budget_costs is None  # nothing measured, nothing added during warmup
    torch.manual_seed(0)
    search_loss, _ = trainer._forward_losses(inputs, targets, None, frozen=False)
    torch.testing.assert_close(trainer._budget_penalty(inputs), want)
    assert want > 0 and [cost.kind for cost, _ in trainer.budget_costs] == ["parameters", "flops"]
    assert search_loss.requires_grad
    # uniform logits are a stationary point of the expected cost (parents are interchangeable): move off it
    with torch.no_grad():
        for branching in supernet.branchings:
            branching.logits.normal_(generator=torch.Generator().manual_seed(1))
    trainer._budget_penalty(inputs).backward()  # the penalty reaches the logits (the first block's has one parent)
    assert all(branching.logits.grad.abs().sum() > 0 for branching in supernet.branchings[1:])


def linear_node(block: int, child: int) -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_a_budget_needs_a_tree_supernet_and_is_ignored_for_a_fixed_tree(tmp_path):
    class Routed(torch.nn.Module):  # searches (holds a Branching) but is no TreeSupernet
        tasks = ["a"]

        def __init__(self):
            super().__init__()
            self.branching = Branching(1, 1)

    losses = {"a": torch.nn.functional.mse_loss}
    with pytest.raises(ValueError, match="need a TreeSupernet; Routed holds none"):
        Trainer(Routed(), losses, [], TrainConfig(epochs=1, budget_parameters=10), tmp_path)
    tree = TreeNet(
        Tree(["a"], [[0]]), [BlockSpec(1, linear_node)]
    )  # retraining a fixed tree: the budget does not apply
    assert Trainer(tree, losses, [], TrainConfig(epochs=1, budget_parameters=10), tmp_path)._budget_net is None


def test_a_reachable_budget_is_met_and_reported(tmp_path, capsys):
    path = write_config(tmp_path)
    smallest = smallest_tree_parameters(configs.load_config(path=path))
    free = pipeline.search(configs.load_config(path=path), tmp_path / "free", seed=0, progress=False)
    assert "budget" not in free and free["tree_parameters"] > smallest  # this search alone keeps a wider tree
    run = tmp_path / "budgeted"
    sets = ["--set", f"search.budget_parameters={smallest}", "--set", "search.budget_weight=20"]
    assert cli.main(["search", "--config", path, "--out", str(run), "--quiet", *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    entry = summary["budget"]["parameters"]
    assert summary["budget"]["met"] and entry["met"] and entry["over_by"] == 0
    assert entry["tree"] == summary["tree_parameters"] <= smallest and entry["expected"] < free["tree_parameters"]
    assert summary["tree_flops"] > 0
    assert (
        f"budget {smallest:,} parameters: derived tree {summary['tree_parameters']:,}, met" in capsys.readouterr().out
    )


def test_an_unreachable_budget_says_by_how_much(tmp_path, capsys):
    run = tmp_path / "tight"
    sets = ["--set", "search.budget_flops=100", "--set", "search.epochs=2"]
    assert cli.main(["search", "--config", write_config(tmp_path), "--out", str(run), "--quiet", *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    entry = summary["budget"]["flops"]
    assert not summary["budget"]["met"] and "parameters" not in summary["budget"]
    assert entry["tree"] == summary["tree_flops"] and entry["over_by"] == summary["tree_flops"] - 100 > 0
    printed = capsys.readouterr().out
    assert (
        f"budget 100 FLOPs per sample: derived tree {entry['tree']:,}, NOT met: over by {entry['over_by']:,}" in printed
    )
