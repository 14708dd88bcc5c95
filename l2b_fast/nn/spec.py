"""A model of the zoo as data: its blocks, tasks, heads and input, from which supernets and trees are built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from l2b_fast.nn.supernet import BlockSpec, TreeSupernet
from l2b_fast.nn.treenet import TreeNet
from l2b_fast.tree import Tree


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the supernet of a model and, after the search, its derived tree.

    ``blocks`` and ``heads`` are plain module-level callables (no lambdas or closures), so a spec pickles
    and ``TreeNet(tree, spec.blocks, spec.heads)`` rebuilds any derived tree with fresh weights.

    Attributes:
        name: the model family, e.g. ``"celeba_branch_vgg"``.
        blocks: the branching blocks, input side first (the last has one child per task).
        tasks: task names, in the order of the last block's children.
        heads: ``task -> module`` applied after the last block.
        input_shape: ``(channels, height, width)`` of one input image the model was sized for.
        config: the arguments that built the spec (for benchmark and result tags).
    """

    name: str
    blocks: tuple[BlockSpec, ...]
    tasks: tuple[str, ...]
    heads: Callable[[str], nn.Module]
    input_shape: tuple[int, int, int]
    config: Mapping[str, object]

    def supernet(self, *, tau: float = 1.0, backend: str | None = None, execution: str = "auto") -> TreeSupernet:
        """A fresh ``TreeSupernet``; ``net.model_spec`` points back to this spec (for retraining)."""
        net = TreeSupernet(self.blocks, self.tasks, self.heads, tau=tau, backend=backend, execution=execution)
        net.model_spec = self
        return net

    def treenet(self, tree: Tree) -> TreeNet:
        """The derived (usually pruned) tree with fresh weights: the retrain-from-scratch network."""
        return TreeNet(tree, self.blocks, self.heads)

    def example_input(self, batch: int, *, generator: torch.Generator | None = None, **tensor_options) -> torch.Tensor:
        """A random input batch of the model's size, in [-1, 1] like the normalised images."""
        uniform = torch.rand((batch, *self.input_shape), generator=generator)
        return (uniform * 2 - 1).to(**tensor_options)


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier: at least 1, rounded to the nearest integer."""
    return max(1, int(round(channels * width)))


def check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return float(width)


def check_input_size(input_size, smallest: int) -> tuple[int, int]:
    """``input_size`` as ``(height, width)``; both sides at least ``smallest`` pixels."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    try:
        height, width = (int(side) for side in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}") from None
    if min(height, width) < smallest:
        raise ValueError(
            f"input_size {(height, width)} is too small: this model needs at least {smallest} pixels per side"
        )
    return height, width


def check_children(children: int, what: str = "children") -> int:
    if isinstance(children, bool) or not isinstance(children, int) or children < 1:
        raise ValueError(f"{what} must be a positive int, got {children!r}")
    return children
