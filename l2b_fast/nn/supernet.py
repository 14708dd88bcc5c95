"""The tree supernet of Learning to Branch: stacked branching blocks of arbitrary child nodes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from l2b_fast.nn.branching import Branching

NodeFactory = Callable[[int, int], nn.Module]  # (block index, child index) -> node


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One branching block: ``children`` child nodes built by ``node(block_index, child_index)``.

    The nodes of one block must map inputs of one shape to outputs of one shape (they are stacked).
    """

    children: int
    node: NodeFactory


def make_heads(tasks: Sequence[str], heads: Mapping[str, nn.Module] | Callable[[str], nn.Module] | None) -> nn.ModuleDict:
    if heads is None:
        return nn.ModuleDict({task: nn.Identity() for task in tasks})
    if callable(heads) and not isinstance(heads, Mapping):
        return nn.ModuleDict({task: heads(task) for task in tasks})
    missing = [task for task in tasks if task not in heads]
    if missing:
        raise ValueError(f"no head for tasks {missing}")
    return nn.ModuleDict({task: heads[task] for task in tasks})


def check_blocks(blocks: Sequence[BlockSpec], tasks: Sequence[str]) -> None:
    if not blocks:
        raise ValueError("a supernet needs at least one block")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be unique and non-empty, got {list(tasks)}")
    if blocks[-1].children != len(tasks):
        raise ValueError(f"the last block must have one child per task: {blocks[-1].children} children, {len(tasks)} tasks")
    for b, spec in enumerate(blocks):
        if spec.children < 1:
            raise ValueError(f"block {b} has {spec.children} children")


class TreeSupernet(nn.Module):
    """Every block samples each child's parent among the previous block's nodes; returns {task: output}.

    The first block's parent is the input itself (I = 1); the last block has one child per task, in the
    order of ``tasks``, followed by that task's head. All nodes of every block are computed (the logits'
    gradient needs every parent's output).

    Args:
        blocks: the blocks, input side first.
        tasks: task names (the last block's children, in order).
        heads: per-task modules after the last block (dict or factory ``task -> module``); default identity.
        tau, backend: initial temperature and op backend of every branching block.
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        tasks: Sequence[str],
        heads: Mapping[str, nn.Module] | Callable[[str], nn.Module] | None = None,
        *,
        tau: float = 1.0,
        backend: str | None = None,
    ):
        super().__init__()
        check_blocks(blocks, tasks)
        self.tasks = list(tasks)
        widths = [1] + [spec.children for spec in blocks]
        self.branchings = nn.ModuleList(Branching(widths[b], widths[b + 1], tau=tau, backend=backend) for b in range(len(blocks)))
        self.nodes = nn.ModuleList(nn.ModuleList(spec.node(b, j) for j in range(spec.children)) for b, spec in enumerate(blocks))
        self.heads = make_heads(self.tasks, heads)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        parents = x.unsqueeze(0)
        for branching, nodes in zip(self.branchings, self.nodes):
            inputs = branching(parents, generator=generator)
            parents = torch.stack([node(inputs[j]) for j, node in enumerate(nodes)])
        return {task: self.heads[task](parents[k]) for k, task in enumerate(self.tasks)}

    def set_tau(self, tau: float) -> None:
        for branching in self.branchings:
            branching.tau = tau

    def set_mode(self, mode: str) -> None:
        for branching in self.branchings:
            branching.mode = mode

    def logits_parameters(self) -> list[nn.Parameter]:
        return [branching.logits for branching in self.branchings]

    def weight_parameters(self) -> list[nn.Parameter]:
        logits = {id(p) for p in self.logits_parameters()}
        return [p for p in self.parameters() if id(p) not in logits]

    def probabilities(self) -> list[torch.Tensor]:
        return [branching.probabilities() for branching in self.branchings]

    def derived_parents(self) -> list[list[int]]:
        return [branching.derived_parents() for branching in self.branchings]
