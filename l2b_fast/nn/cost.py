"""The size of the derived tree as a function of the branching probabilities: the cost model of a budgeted search.

A node of the supernet costs its parameters (or its FLOPs per sample) in the derived tree when some task's path
passes through it. Every child picks its parent independently (softmax of its logits column), so the tasks' paths
form a random tree; :func:`expected_cost` is the expectation of its pruned size, differentiable in the probabilities.

Exactly: the set of used nodes of each layer is a random subset whose distribution follows from the layer below
(the task layer is always fully used): given the used children ``S``, the used parents are the parents ``S`` picked,
and ``P(used parents within A) = prod over j in S of sum over i in A of p[i, j]``; a Moebius inversion over subsets
gives ``P(used parents = A)``. This costs ``2**width`` states per layer, so a layer pair too wide for that
(:data:`EXACT_STATES`) falls back to treating the children's use as independent:
``P(parent used) = 1 - prod over children of (1 - P(child used) * p(child picks it))`` (exact next to the task layer,
an approximation above it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from l2b_fast.tree import Tree

# Largest (states of the child layer) x (subsets of the parent layer) x (children) handled exactly.
EXACT_STATES = 2**22
COST_KINDS = ("parameters", "flops")


def module_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def module_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, object]:
    """``(FLOPs, output)`` of one forward of ``module`` on ``x``, as :class:`FlopCounterMode` counts them (matrix
    products and convolutions: 2 per multiply-add; elementwise operations count 0)."""
    counter = FlopCounterMode(display=False)
    with counter:
        output = module(x)
    return int(counter.get_total_flops()), output


def node_parameters(supernet) -> list[list[int]]:
    """``[block][child]`` trainable parameters of every node of a ``TreeSupernet``."""
    return [[module_parameters(node) for node in nodes] for nodes in supernet.nodes]


def head_parameters(supernet) -> int:
    return module_parameters(supernet.heads)


def node_flops(supernet, sample: torch.Tensor) -> tuple[list[list[int]], int]:
    """``([block][child] FLOPs, heads' FLOPs)`` per sample: every node measured once on a batch of one at its
    block's input size (``sample``: one input, batch dimension first, e.g. ``spec.example_input(1)``); the
    block's input is the first node's output of the previous block (all nodes of a block share shapes)."""
    if sample.dim() < 1 or sample.shape[0] != 1:
        raise ValueError(f"node_flops needs a batch of one input, got shape {tuple(sample.shape)}")
    flops, x = [], sample
    for nodes in supernet.nodes:
        counts = [module_flops(node, x) for node in nodes]
        flops.append([count for count, _ in counts])
        x = counts[0][1]
    heads = sum(module_flops(head, x)[0] for head in supernet.heads.values())
    return flops, heads


def tree_cost(tree: Tree, costs: Sequence[Sequence[int]], constant: int = 0) -> int:
    """The exact cost of ``tree`` (pruned or not): every node with a task below it counted once, by its supernet
    index (``tree.node_origin``), plus ``constant`` (the heads)."""
    used = tree.used_nodes()
    if len(used) != len(costs):
        raise ValueError(f"the tree has {len(used)} layers, the supernet {len(costs)} blocks")
    for layer, flags in enumerate(used):
        origins = [tree.node_origin(layer, node) for node in range(len(flags))]
        if max(origins) >= len(costs[layer]):
            raise ValueError(
                f"layer {layer} of the tree uses node {max(origins)}; the supernet's block has {len(costs[layer])}"
            )
    return constant + sum(
        costs[layer][tree.node_origin(layer, node)]
        for layer, flags in enumerate(used)
        for node, flag in enumerate(flags)
        if flag
    )


def _subset_masks(width: int, like: torch.Tensor) -> torch.Tensor:
    """``[2**width, width]`` 0/1: row ``a`` holds the bits of ``a`` (bit k: node k)."""
    rows = torch.arange(2**width, device=like.device).unsqueeze(1)
    return ((rows >> torch.arange(width, device=like.device)) & 1).to(like.dtype)


def _moebius(within: torch.Tensor, width: int) -> torch.Tensor:
    """``P(set = A)`` from ``P(set within A)`` over the last dimension (subsets of ``width`` bits): the inverse of
    the subset sum, one difference per bit."""
    rows = within.shape[0]
    values = within.reshape(rows, *([2] * width))  # axis 1 + k holds bit width - 1 - k
    for axis in range(1, width + 1):
        without, with_bit = values.unbind(axis)
        values = torch.stack((without, with_bit - without), dim=axis)
    return values.reshape(rows, 2**width)


def usage_probabilities(probabilities: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``P(node used)`` per block (``[width]`` each, the task layer all ones) for the per-block parent
    distributions ``probabilities[b]`` ``[I, J]`` (columns sum to 1, as ``TreeSupernet.probabilities()``
    without the detach). Differentiable; float64 is advised (the exact path subtracts)."""
    if not probabilities:
        raise ValueError("usage_probabilities needs at least one block")
    last = probabilities[-1]
    used = [torch.ones(last.shape[1], dtype=last.dtype, device=last.device)]
    # the distribution of the used set of the current layer: rows of 0/1 masks and their probabilities
    masks, weights = torch.ones(1, last.shape[1], dtype=last.dtype, device=last.device), last.new_ones(1)
    for block in range(len(probabilities) - 1, 0, -1):
        picks = probabilities[block]  # [I, J]: parents of the previous layer x children of this one
        parents, children = picks.shape
        if masks is not None and masks.shape[0] * 2**parents * children <= EXACT_STATES:
            subsets = _subset_masks(parents, picks)
            within = subsets @ picks  # [2**I, J]: P(child j picks inside subset a)
            chosen = masks.unsqueeze(1)  # [R, 1, J]
            inside = (chosen * within.unsqueeze(0) + (1 - chosen)).prod(dim=2)  # [R, 2**I]
            weights = weights @ _moebius(inside, parents)
            masks = subsets
            used.append(weights @ subsets)
        else:  # too wide to enumerate: children's use taken as independent from here on
            masks = None
            used.append(1 - (1 - picks * used[-1].unsqueeze(0)).prod(dim=1))
    return used[::-1]


def expected_cost(
    probabilities: Sequence[torch.Tensor], costs: Sequence[Sequence[int] | torch.Tensor], constant: float = 0.0
) -> torch.Tensor:
    """The expected cost of the derived tree (a 0-d tensor, differentiable in ``probabilities``): the sum over
    nodes of ``P(node used) * costs[block][node]``, plus ``constant`` (the heads)."""
    if len(costs) != len(probabilities):
        raise ValueError(f"costs has {len(costs)} blocks, the probabilities {len(probabilities)}")
    total = probabilities[0].new_tensor(float(constant))
    for block, (used, cost) in enumerate(zip(usage_probabilities(probabilities), costs)):
        cost = torch.as_tensor(cost, dtype=used.dtype, device=used.device)
        if cost.shape != used.shape:
            raise ValueError(f"block {block}: {cost.numel()} node costs for {used.numel()} nodes")
        total = total + (used * cost).sum()
    return total


class TreeCost:
    """One cost (``"parameters"`` or ``"flops"`` per sample) of every supernet node, for the expected cost under
    the current logits and the exact cost of a derived tree."""

    def __init__(self, kind: str, costs: Sequence[Sequence[int]], constant: int):
        if kind not in COST_KINDS:
            raise ValueError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
        self.kind, self.costs, self.constant = kind, [list(map(int, block)) for block in costs], int(constant)

    @classmethod
    def of_supernet(cls, kind: str, supernet, sample: torch.Tensor | None = None) -> TreeCost:
        """Measured on a ``TreeSupernet``; FLOPs need ``sample``, one input with a batch dimension of one."""
        if kind == "flops":
            if sample is None:
                raise ValueError("a FLOPs cost needs a sample input (a batch of one)")
            return cls(kind, *node_flops(supernet, sample))
        return cls(kind, node_parameters(supernet), head_parameters(supernet))

    def expected(self, supernet) -> torch.Tensor:
        """The expected cost under the supernet's sampling distributions, differentiable in its logits (float64)."""
        probabilities = [torch.softmax(branching.logits.double(), dim=0) for branching in supernet.branchings]
        return expected_cost(probabilities, self.costs, self.constant)

    def of_tree(self, tree: Tree) -> int:
        return tree_cost(tree, self.costs, self.constant)
