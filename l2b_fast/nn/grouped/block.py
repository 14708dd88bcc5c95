"""One branching block's children run grouped: route, then one launch per layer for all J children."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from l2b_fast import ops
from l2b_fast.nn.branching import Branching
from l2b_fast.nn.grouped import routing
from l2b_fast.nn.grouped.layers import Step, plan_steps
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked, to_children

ROUTINGS = ("auto", "host", "gather")


class GroupedBlock:
    """The grouped execution of one block's nodes (a strategy object: it holds no parameters).

    Two ways to start a block (``routing``):

    - ``"host"``: the sampled index is read on the host and the first layer reads each distinct parent
      once with its children's weights concatenated (:mod:`l2b_fast.nn.grouped.routing`): no gathered copy.
    - ``"gather"``: the children's inputs are gathered by the branching op through the device-side index
      (no host synchronisation: CUDA, CUDA graphs, ``torch.compile``), then stacked in channels.

    ``"auto"`` takes ``host`` for CPU tensors in eager mode when the first layer can be routed
    (Conv with ``groups=1`` and zero padding, Linear, BasicBlock), ``gather`` otherwise.
    """

    def __init__(self, nodes: Sequence[nn.Module], block: int):
        self.block = block
        self.children = len(nodes)
        self.steps: list[Step] = plan_steps(nodes, block)
        self.routing = "auto"

    def uses_host_routing(self, parents: torch.Tensor) -> bool:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        routable = bool(self.steps) and self.steps[0].routable
        if self.routing == "host":
            if not routable:
                raise ValueError(f"block {self.block}: host routing needs a first layer that reads the parents directly (Conv with groups=1, Linear, BasicBlock)")
            return True
        return self.routing == "auto" and routable and parents.device.type == "cpu" and not torch.compiler.is_compiling()

    def __call__(self, branching: Branching, parents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``parents`` ``[I, *S]`` -> the J children's outputs ``[J, *S']``, as the per-child execution."""
        if self.uses_host_routing(parents):
            stacked, order = self._start_from_parents(branching, parents, generator)
            rest = self.steps[1:]
        else:
            stacked, order, rest = Stacked(branching(parents, generator=generator), CHILDREN, self.children), range(self.children), self.steps
        for step in rest:
            stacked = step(stacked, order)
        return self._children_outputs(stacked, order)

    def _start_from_parents(self, branching: Branching, parents: torch.Tensor, generator) -> tuple[Stacked, list[int]]:
        mode = branching.mode if branching.training else "eval"
        soft = None
        if mode == "eval":  # as ops.branch(training=False): argmax, no noise
            index = branching.logits.detach().argmax(dim=0)
        else:
            logits = branching.logits if mode == "search" else branching.logits.detach()
            index, soft = ops.sample_branches(logits, branching.tau, generator=generator, backend=branching.backend)
        order, groups = routing.group_positions(index.tolist())
        first = self.steps[0]
        if soft is not None and soft.requires_grad:
            positions = torch.empty(self.children, dtype=torch.int64)
            positions[torch.tensor(order)] = torch.arange(self.children)
            phantom = routing.route(parents, soft, groups, first.routed_layout, positions.to(parents.device))
            routed = routing.RoutedInput(parents.detach(), phantom, groups, self.children)
        else:
            routed = routing.RoutedInput(parents, None, groups, self.children)
        return first.routed(routed, order), order

    def _children_outputs(self, stacked: Stacked, order: Sequence[int]) -> torch.Tensor:
        """``[J, *S']`` in child order (positions put back in the same copy that un-stacks the channels)."""
        positions = None
        if list(order) != list(range(self.children)):
            positions = torch.empty(self.children, dtype=torch.int64)
            positions[torch.tensor(list(order))] = torch.arange(self.children)
            positions = positions.to(stacked.tensor.device)
        if stacked.layout == CHANNELS:
            return to_children(stacked.tensor, self.children, positions)
        return stacked.tensor if positions is None else stacked.tensor.index_select(0, positions)
