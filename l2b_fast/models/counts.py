"""Parameter counts of a model's supernet and of its trees, beside the paper's numbers.

Counted by building each distinct node once on the ``meta`` device (shapes, no memory), so even the
all-separate Taskonomy tree (five whole networks) is counted instantly. The tests hold these counts to
``parameter_count`` of the real modules at small widths.

    python -m l2b_fast.models.counts        # the README table
"""

from __future__ import annotations

import functools

import torch

from l2b_fast.nn.spec import ModelSpec
from l2b_fast.tree import Tree

# (what, parameters) as printed in the paper: Table 1 (CelebA) and Table 2 (Taskonomy).
PAPER_PARAMETERS = {
    "celeba_branch_vgg": (("Branch-VGG (Lu et al., 2017)", 2.09e6), ("LearnToBranch-VGG", 1.94e6)),
    "celeba_deep_wide": (("GNAS-Deep-Wide (Huang et al., 2018)", 6.41e6), ("LearnToBranch-Deep-Wide", 6.33e6)),
    "taskonomy_resnet34": (
        ("LearnToBranch", 51e6),
        ("multi-task baseline (AdaShare)", 41e6),
        ("single-task (AdaShare)", 124e6),
    ),
}


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _node_parameters(spec: ModelSpec) -> callable:
    """``(layer, supernet index) -> parameters of that node``, each distinct node built once on meta."""

    @functools.cache
    def count(layer: int, origin: int) -> int:
        with torch.device("meta"):
            return _numel(spec.blocks[layer].node(layer, origin))

    return count


def head_parameters(spec: ModelSpec) -> int:
    with torch.device("meta"):
        return sum(_numel(spec.heads(task)) for task in spec.tasks)


def supernet_parameters(spec: ModelSpec) -> int:
    """Weights of the supernet (every node of every block and the heads), without the branching logits."""
    count = _node_parameters(spec)
    return sum(
        count(layer, j) for layer, block in enumerate(spec.blocks) for j in range(block.children)
    ) + head_parameters(spec)


def logits_parameters(spec: ModelSpec) -> int:
    widths = [1] + [block.children for block in spec.blocks]
    return sum(widths[b] * widths[b + 1] for b in range(len(spec.blocks)))


def tree_parameters(spec: ModelSpec, tree: Tree) -> int:
    """Parameters of ``TreeNet(tree, spec.blocks, spec.heads)``: every node of the tree once, plus the heads."""
    if len(tree.parents) != len(spec.blocks):
        raise ValueError(f"the tree has {len(tree.parents)} layers, the model {len(spec.blocks)} blocks")
    count = _node_parameters(spec)
    return sum(
        count(layer, tree.node_origin(layer, j)) for layer, width in enumerate(tree.widths) for j in range(width)
    ) + head_parameters(spec)


def all_shared_tree(spec: ModelSpec) -> Tree:
    """Every task shares every layer; only the task layer (one node per task) is separate."""
    layers = len(spec.blocks)
    return Tree(list(spec.tasks), [[0] for _ in range(layers - 1)] + [[0] * len(spec.tasks)])


def all_separate_tree(spec: ModelSpec) -> Tree:
    """Every task its own network: one node per task in every layer (the single-task baselines)."""
    tasks = len(spec.tasks)
    return Tree(list(spec.tasks), [[0] * tasks] + [list(range(tasks)) for _ in range(len(spec.blocks) - 1)])


def parameter_rows(specs: list[ModelSpec]) -> list[dict]:
    """One row per model: supernet, all-shared and all-separate tree parameters and the paper's numbers."""
    rows = []
    for spec in specs:
        rows.append(
            {
                "model": spec.name,
                "config": dict(spec.config),
                "supernet": supernet_parameters(spec),
                "heads": head_parameters(spec),
                "logits": logits_parameters(spec),
                "all_shared_tree": tree_parameters(spec, all_shared_tree(spec)),
                "all_separate_tree": tree_parameters(spec, all_separate_tree(spec)),
                "paper": [list(entry) for entry in PAPER_PARAMETERS.get(spec.name, ())],
            }
        )
    return rows


def default_specs() -> list[ModelSpec]:
    """The paper's three models at full size (Taskonomy with both branching granularities)."""
    from l2b_fast.models import celeba_branch_vgg_spec, celeba_deep_wide_spec, taskonomy_resnet34_spec

    return [
        taskonomy_resnet34_spec(),
        taskonomy_resnet34_spec(branching="stage"),
        celeba_branch_vgg_spec(),
        celeba_deep_wide_spec(),
    ]


def format_table(rows: list[dict]) -> str:
    def millions(n: float) -> str:
        return f"{n / 1e6:.2f}M"

    lines = [
        "| model | supernet | all-shared tree | all-separate tree | of which heads | paper |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        name = row["model"] + (f" ({row['config']['branching']} branching)" if "branching" in row["config"] else "")
        paper = "; ".join(f"{what} {millions(n)}" for what, n in row["paper"])
        lines.append(
            f"| {name} | {millions(row['supernet'])} | {millions(row['all_shared_tree'])} | "
            f"{millions(row['all_separate_tree'])} | {millions(row['heads'])} | {paper} |"
        )
    return "\n".join(lines)


def main() -> int:
    print(format_table(parameter_rows(default_specs())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
