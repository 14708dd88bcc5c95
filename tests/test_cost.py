"""The cost model of a budgeted search (l2b_fast.nn.cost): exact expectation, gradient, and the derived tree's size."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import bent_square_toml
from l2b_fast import config as configs
from l2b_fast import pipeline
from l2b_fast.nn import cost, parameter_count
from l2b_fast.nn.cost import module_flops
from l2b_fast.tree import Tree, derive

WIDTHS = (2, 3, 2, 3)  # block widths: input -> 2 -> 3 -> 2 -> 3 tasks


def random_probabilities(seed: int, widths=WIDTHS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = zip((1, *widths[:-1]), widths)
    return [torch.softmax(torch.randn(i, j, generator=generator, dtype=torch.float64), 0) for i, j in shapes]


def enumerated_cost(probabilities, costs, constant=0.0) -> float:
    """The expectation by brute force: every assignment of parents, its probability times its tree's exact cost."""
    choices = [list(itertools.product(range(p.shape[0]), repeat=p.shape[1])) for p in probabilities]
    total = 0.0
    for parents in itertools.product(*choices):
        chance = 1.0
        for p, picked in zip(probabilities, parents):
            chance *= float(torch.prod(p[list(picked), list(range(p.shape[1]))]))
        tree = Tree([f"t{k}" for k in range(probabilities[-1].shape[1])], [list(layer) for layer in parents])
        total += chance * cost.tree_cost(tree, costs, constant)
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_cost_equals_enumeration(seed):
    probabilities = random_probabilities(seed)
    costs = [[3, 5], [7, 11, 13], [17, 19], [1, 2, 4]]
    expected = cost.expected_cost(probabilities, costs, constant=100)
    assert expected.item() == pytest.approx(enumerated_cost(probabilities, costs, 100), rel=1e-12)


def test_independent_fallback_is_exact_next_to_the_task_layer_only(monkeypatch):
    probabilities = random_probabilities(2)
    costs = [[3, 5], [7, 11, 13], [17, 19], [1, 2, 4]]
    exact = cost.usage_probabilities(probabilities)
    monkeypatch.setattr(cost, "EXACT_STATES", 0)  # every layer pair "too wide": the independence formula
    independent = cost.usage_probabilities(probabilities)
    torch.testing.assert_close(independent[2], exact[2])  # the task layer's use is certain: both exact
    assert not torch.allclose(independent[0], exact[0])  # above it the children's use is correlated
    assert cost.expected_cost(probabilities, costs).item() != pytest.approx(enumerated_cost(probabilities, costs))


def test_expected_cost_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(3)
    shapes = list(zip((1, *WIDTHS[:-1]), WIDTHS))
    logits = [torch.randn(i, j, generator=generator, dtype=torch.float64, requires_grad=True) for i, j in shapes]
    costs = [[3, 5], [7, 11, 13], [17, 19], [1, 2, 4]]

    def expected(*tensors):
        return cost.expected_cost([torch.softmax(t, 0) for t in tensors], costs, 10)

    assert torch.autograd.gradcheck(expected, tuple(logits))
    for independent in (True, False):  # the fallback is differentiable too
        limit = 0 if independent else cost.EXACT_STATES
        original, cost.EXACT_STATES = cost.EXACT_STATES, limit
        try:
            assert torch.autograd.gradcheck(expected, tuple(logits))
        finally:
            cost.EXACT_STATES = original


SMALL = bent_square_toml(
    tasks=2, samples=200, hidden=8, validation=0.0, search={"epochs": 1, "batch_size": 50, "sampling": '"global"'}
)


def small_config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return configs.load_config(path=path)


def test_one_hot_probabilities_give_the_derived_trees_parameters_and_flops(tmp_path):
    config = small_config(tmp_path)
    recipe = pipeline.recipe_of(config)
    spec = recipe.model_spec(config, config["search"])
    torch.manual_seed(0)
    supernet = recipe.supernet(config, spec)
    sample = spec.example_input(1, dtype=recipe.dtype(config))
    parameters = cost.TreeCost.of_supernet("parameters", supernet)
    flops = cost.TreeCost.of_supernet("flops", supernet, sample)
    for trial in range(4):
        with torch.no_grad():
            for branching in supernet.branchings:
                branching.logits.normal_(generator=torch.Generator().manual_seed(trial), std=3.0)
        tree = derive(supernet).pruned()
        treenet = recipe.treenet(config, spec, tree)
        one_hot = [
            torch.nn.functional.one_hot(b.logits.argmax(0), b.logits.shape[0]).T.double() for b in supernet.branchings
        ]
        assert parameters.of_tree(tree) == parameter_count(treenet)
        assert cost.expected_cost(one_hot, parameters.costs, parameters.constant).item() == parameter_count(treenet)
        assert flops.of_tree(tree) == module_flops(treenet, sample)[0] > 0
        assert cost.expected_cost(one_hot, flops.costs, flops.constant).item() == module_flops(treenet, sample)[0]
    # the expected cost lies between the all-shared and independent trees' and reaches the supernet's logits
    expected = parameters.expected(supernet)
    expected.backward()
    assert all(b.logits.grad is not None and b.logits.grad.abs().sum() > 0 for b in supernet.branchings[1:])
    shared, alone = pipeline.baseline_trees(list(spec.tasks), len(spec.blocks) - 1).values()
    assert parameters.of_tree(shared) <= expected.item() <= parameter_count(supernet) - logits_count(supernet)
    with pytest.raises(ValueError, match="layer 0 of the tree uses node 3; the supernet's block has 2"):
        parameters.of_tree(alone)  # one path per task: wider than this supernet


def logits_count(supernet) -> int:
    return sum(b.logits.numel() for b in supernet.branchings)


def test_bad_input_is_named():
    probabilities = random_probabilities(0)
    with pytest.raises(ValueError, match="costs has 2 blocks"):
        cost.expected_cost(probabilities, [[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="block 1: 2 node costs for 3 nodes"):
        cost.expected_cost(probabilities, [[1, 2], [1, 2], [1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="cost kind"):
        cost.TreeCost("memory", [[1]], 0)
    with pytest.raises(ValueError, match="batch of one"):
        cost.node_flops(None, torch.zeros(2, 3))
