"""The derived tree as a compact network that computes every shared node once."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from l2b_fast.nn.supernet import BlockSpec, TreeSupernet, make_heads
from l2b_fast.tree import Tree


class TreeNet(nn.Module):
    """Nodes of a (pruned) :class:`~l2b_fast.tree.Tree`, built with the blocks' node factories.

    ``forward`` walks the layers: node j of layer l runs once on the output of its parent, so a trunk
    shared by many tasks costs one evaluation. Node (l, j) is built as ``blocks[l].node(l, origin)`` with
    ``origin`` its supernet index, so a fresh TreeNet is the retrain-from-scratch network.
    """

    def __init__(
        self,
        tree: Tree,
        blocks: Sequence[BlockSpec],
        heads: Mapping[str, nn.Module] | Callable[[str], nn.Module] | None = None,
    ):
        super().__init__()
        if len(blocks) != len(tree.parents):
            raise ValueError(f"the tree has {len(tree.parents)} layers but {len(blocks)} blocks were given")
        self.tree = tree
        self.tasks = list(tree.tasks)
        self.nodes = nn.ModuleList(
            nn.ModuleList(blocks[layer].node(layer, tree.node_origin(layer, j)) for j in range(width))
            for layer, width in enumerate(tree.widths)
        )
        self.heads = make_heads(self.tasks, heads)

    @classmethod
    def from_supernet(cls, supernet: TreeSupernet, tree: Tree) -> TreeNet:
        """A TreeNet carrying the supernet's trained weights (for evaluation, and the equivalence test)."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.tree, net.tasks = tree, list(tree.tasks)
        net.nodes = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(supernet.nodes[layer][tree.node_origin(layer, j)]) for j in range(width))
            for layer, width in enumerate(tree.widths)
        )
        net.heads = copy.deepcopy(supernet.heads)
        return net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = [x]
        for layer, nodes in enumerate(self.nodes):
            outputs = [node(outputs[parent]) for node, parent in zip(nodes, self.tree.parents[layer])]
        return {task: self.heads[task](outputs[k]) for k, task in enumerate(self.tasks)}


def parameter_count(module: nn.Module, *, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
