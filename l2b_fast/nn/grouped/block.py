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

    ``"auto"`` takes ``host`` for CPU tensors in eager mode when the first layer can be routed (Conv with
    ``groups=1`` and zero padding, Linear, BasicBlock), no per-child input gradient is needed (one parent,
    or logits without gradient: frozen, eval) and the children share parents (at most J/2 distinct), and
    ``gather`` otherwise. Measured on a 2-core CPU: one grouped convolution over all J children is as fast
    as or faster than one convolution per distinct parent once most parents are distinct, and the
    per-child input gradients of a searched block cost host routing more than the gather's copy.
    """

    def __init__(self, nodes: Sequence[nn.Module], block: int):
        self.block = block
        self.children = len(nodes)
        self.steps: list[Step] = plan_steps(nodes, block)
        self.routing = "auto"

    def routable(self) -> bool:
        return bool(self.steps) and self.steps[0].routable

    def check_routing(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "host" and not self.routable():
            raise ValueError(f"block {self.block}: host routing needs a first layer that reads the parents directly (Conv with groups=1, Linear, BasicBlock)")

    def __call__(self, branching: Branching, parents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``parents`` ``[I, *S]`` -> the J children's outputs ``[J, *S']``, as the per-child execution."""
        self.check_routing()
        host_possible = parents.device.type == "cpu" and not torch.compiler.is_compiling() and self.routable()
        started = None
        if self.routing == "host" or (self.routing == "auto" and host_possible):
            started = self._start_on_host(branching, parents, generator, force=self.routing == "host")
        if started is None:  # gather through the branching op: device-side index, no host sync
            started = Stacked(branching(parents, generator=generator), CHILDREN, self.children), range(self.children), self.steps
        stacked, order, rest = started
        for step in rest:
            stacked = step(stacked, order)
        return self._children_outputs(stacked, order)

    def _start_on_host(self, branching: Branching, parents: torch.Tensor, generator, force: bool):
        """Sample (or argmax) with the index on the host; returns (stacked, order, remaining steps), or
        None, before drawing from ``generator``, where ``auto`` leaves a searched block to the gather."""
        mode = branching.mode if branching.training else "eval"
        parents_count = branching.logits.shape[0]
        # One parent: softmax over parents is constant, the logits' gradient exactly 0 without G.
        child_gradients = mode == "search" and branching.logits.requires_grad and parents_count > 1
        if child_gradients and not force:
            return None
        soft = None
        if mode == "eval":  # as ops.branch(training=False): argmax, no noise
            index = branching.logits.detach().argmax(dim=0)
        else:
            logits = branching.logits if mode == "search" else branching.logits.detach()
            index, soft = ops.sample_branches(logits, branching.tau, generator=generator, backend=branching.backend)
        order, groups = routing.group_positions(index.tolist())
        if not force and 2 * len(groups) > self.children:
            # Mostly distinct parents: one grouped launch beats one per parent. No logits gradient is
            # needed here, so the gather is a plain index_select (segment-sum backward).
            return Stacked(parents.index_select(0, index.to(parents.device)), CHILDREN, self.children), range(self.children), self.steps
        first = self.steps[0]
        if child_gradients:
            positions = torch.empty(self.children, dtype=torch.int64)
            positions[torch.tensor(order)] = torch.arange(self.children)
            phantom = routing.route(parents, soft, groups, first.routed_layout, positions.to(parents.device))
            routed = routing.RoutedInput(parents.detach(), phantom, groups, self.children)
        else:
            zero_gradient_to = soft if soft is not None and soft.requires_grad else None
            routed = routing.RoutedInput(parents, None, groups, self.children, zero_gradient_to)
        return first.routed(routed, order), order, self.steps[1:]

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
