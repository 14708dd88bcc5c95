"""One branching block's children run grouped: route, then one launch per layer for all J children."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from l2b_fast.nn.branching import Branching
from l2b_fast.nn.grouped import indexed, routing
from l2b_fast.nn.grouped.layers import Step, plan_steps
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked, to_children

ROUTINGS = ("auto", "host", "gather")
CONV_BACKENDS = ("cudnn", "triton")  # the first convolution of a gathered block (see GroupedBlock)
CPU_GROUPING_MAX_ELEMENTS = 131072  # per-child input elements up to which execution="auto" groups on CPU


def check_conv_backend(conv_backend: str) -> None:
    if conv_backend not in CONV_BACKENDS:
        raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {conv_backend!r}")


def positions_of(order: Sequence[int], device: torch.device) -> torch.Tensor:
    """``positions[j]``: where child j sits, for ``order[k]`` = the child at position k."""
    positions = torch.empty(len(order), dtype=torch.int64)
    positions[torch.tensor(list(order))] = torch.arange(len(order))
    return positions.to(device)


class GroupedBlock:
    """The grouped execution of one block's nodes (a strategy object: it holds no parameters).

    Two ways to start a block (``routing``):

    - ``"host"``: the sampled index is read on the host and the first layer reads each distinct parent
      once with its children's weights concatenated (:mod:`l2b_fast.nn.grouped.routing`): no gathered copy.
    - ``"gather"``: the children's inputs are gathered by the branching op through the device-side index
      (no host synchronisation: CUDA, CUDA graphs, ``torch.compile``), then stacked in channels.

    Under ``torch.compile`` a block always gathers (``host`` needs the index on the host, which would break
    the graph). ``"auto"`` takes ``host`` for blocks with one parent (CPU tensors, eager mode, a first layer that
    can be routed: Conv with ``groups=1`` and zero padding, Linear, BasicBlock): all children read the
    one parent through one layer with concatenated weights, and since the logits' gradient of a single
    parent is exactly 0, no per-child input gradient is computed. Everything else takes ``gather``:
    measured on a 2-core CPU (``benchmarks/grouped_block_benchmark.py``), one grouped convolution over
    all J children was as fast as or faster than one convolution per distinct parent, and in search mode
    the per-child input gradients cost host routing more than the gather's copy.

    ``conv_backend`` (gathered blocks whose first layer is a Conv2d with groups=1 and zero padding, or a
    BasicBlock): ``"cudnn"`` (default) gathers and stacks the children, then runs one ``groups=J`` convolution;
    ``"triton"`` runs the Triton implicit-GEMM convolution that reads the parents through the sampled
    index (:mod:`l2b_fast.nn.grouped.indexed`: no gathered copy, no re-stack; a BasicBlock's conv1 and
    1x1 downsample both read through it, an identity shortcut still gathers). CUDA tensors only (CPU
    under ``TRITON_INTERPRET=1``, for tests); fp64 and other first layers keep the cudnn path. Not a
    default anywhere until a GPU has measured it.
    """

    def __init__(self, nodes: Sequence[nn.Module], block: int, *, automatic: bool = False, conv_backend: str = "cudnn"):
        self.block = block
        self.automatic = automatic  # chosen by execution="auto": may leave large CPU blocks per child
        self.children = len(nodes)
        self.steps: list[Step] = plan_steps(nodes, block)
        self.routing = "auto"
        self.conv_backend = conv_backend

    def worth_grouping(self, parents: torch.Tensor) -> bool:
        """False where ``auto`` should run this block per child: on CPU, children whose inputs exceed
        :data:`CPU_GROUPING_MAX_ELEMENTS`. Measured on a 2-core Xeon (benchmarks/grouped_block_benchmark.py):
        grouping won 1.2-1.9x on the late CelebA-VGG blocks (8K-32K elements per child), tied at 16x16
        (131K) and lost 5-25% on ResNet blocks at 32x32 (524K) and VGG's first block (196K in, 2.1M out),
        where per-op overhead is already amortised and the J-fold stacked activations fall out of cache."""
        return not self.automatic or parents.device.type != "cpu" or parents[0].numel() <= CPU_GROUPING_MAX_ELEMENTS

    def routable(self) -> bool:
        return bool(self.steps) and self.steps[0].routable

    def check_routing(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        check_conv_backend(self.conv_backend)
        if self.routing == "host" and not self.routable():
            raise ValueError(f"block {self.block}: host routing needs a first layer that reads the parents directly (Conv with groups=1, Linear, BasicBlock)")

    def __call__(self, branching: Branching, parents: torch.Tensor, generator: torch.Generator | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
        """``parents`` ``[I, *S]`` -> the J children's outputs ``[J, *S']``, as the per-child execution
        (sampling from ``generator`` or the int64 ``seed`` tensor, as :meth:`Branching.forward`)."""
        self.check_routing()
        # Host routing groups the children by their sampled parent in Python (a sort of index.tolist()):
        # data-dependent control flow that would break a compiled graph, so compiled code always gathers
        # (the same values: both routings give the per-child results).
        host = not torch.compiler.is_compiling() and (self.routing == "host" or (
            self.routing == "auto" and branching.logits.shape[0] == 1 and self.routable() and parents.device.type == "cpu"
        ))
        started = None
        if not host and self.conv_backend == "triton" and self.steps:  # the first conv reads through the index
            started = indexed.start_block(self.steps[0], self.block, branching, parents, generator, seed)
        if host:
            stacked, order = self._start_on_host(branching, parents, generator, seed)
            rest = self.steps[1:]
        elif started is not None:
            stacked, order, rest = started, range(self.children), self.steps[1:]
        else:  # gather through the branching op: device-side index, no host sync
            stacked, order, rest = Stacked(branching(parents, generator=generator, seed=seed), CHILDREN, self.children), range(self.children), self.steps
        for step in rest:
            stacked = step(stacked, order)
        return self._children_outputs(stacked, order)

    def _start_on_host(self, branching: Branching, parents: torch.Tensor, generator, seed) -> tuple[Stacked, list[int]]:
        """Sample (or argmax) with the index on the host and run the first layer from the parents."""
        # One parent: softmax over parents is constant, the logits' gradient exactly 0 without G.
        child_gradients = branching.active_mode == "search" and branching.logits.requires_grad and branching.logits.shape[0] > 1
        index, soft = branching.draw(generator, seed=seed)  # eval: as ops.branch(training=False), argmax, no soft
        order, groups = routing.group_positions(index.tolist())
        first = self.steps[0]
        if child_gradients:
            phantom = routing.route(parents, soft, groups, first.routed_layout, positions_of(order, parents.device))
            routed = routing.RoutedInput(parents.detach(), phantom, groups, self.children)
        else:
            zero_gradient_to = soft if soft is not None and soft.requires_grad else None
            routed = routing.RoutedInput(parents, None, groups, self.children, zero_gradient_to)
        return first.routed(routed, order), order

    def _children_outputs(self, stacked: Stacked, order: Sequence[int]) -> torch.Tensor:
        """``[J, *S']`` in child order (positions put back in the same copy that un-stacks the channels)."""
        positions = None if list(order) == list(range(self.children)) else positions_of(order, stacked.tensor.device)
        if stacked.layout == CHANNELS:
            return to_children(stacked.tensor, self.children, positions)
        return stacked.tensor if positions is None else stacked.tensor.index_select(0, positions)
