"""One branching block's children run grouped: gather (or read through the index), then one launch per layer for
all J children."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from l2b_fast.nn.branching import Branching
from l2b_fast.nn.grouped import indexed
from l2b_fast.nn.grouped.layers import Step, plan_steps
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked, to_children

CONV_BACKENDS = ("cudnn", "triton")  # the first convolution of a gathered block (see GroupedBlock)
CPU_GROUPING_MAX_ELEMENTS = 131072  # per-child input elements up to which execution="auto" groups on CPU


def check_conv_backend(conv_backend: str) -> None:
    if conv_backend not in CONV_BACKENDS:
        raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {conv_backend!r}")


class GroupedBlock:
    """The grouped execution of one block's nodes (a strategy object: it holds no parameters).

    The children's inputs are gathered by the branching op through the device-side index (no host
    synchronisation: CUDA, CUDA graphs, ``torch.compile``), then stacked in channels, and every layer runs once
    for all J children.

    ``conv_backend`` (blocks whose first layer is a Conv2d with groups=1 and zero padding, or a
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
        self.conv_backend = conv_backend

    def worth_grouping(self, parents: torch.Tensor) -> bool:
        """False where ``auto`` should run this block per child: on CPU, children whose inputs exceed
        :data:`CPU_GROUPING_MAX_ELEMENTS`. Measured on a 2-core Xeon (benchmarks/grouped_block_benchmark.py):
        grouping won 1.2-1.9x on the late CelebA-VGG blocks (8K-32K elements per child), tied at 16x16
        (131K) and lost 5-25% on ResNet blocks at 32x32 (524K) and VGG's first block (196K in, 2.1M out),
        where per-op overhead is already amortised and the J-fold stacked activations fall out of cache."""
        return not self.automatic or parents.device.type != "cpu" or parents[0].numel() <= CPU_GROUPING_MAX_ELEMENTS

    def check(self) -> None:
        check_conv_backend(self.conv_backend)

    def __call__(
        self,
        branching: Branching,
        parents: torch.Tensor,
        generator: torch.Generator | None = None,
        seed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``parents`` ``[I, *S]`` -> the J children's outputs ``[J, *S']``, as the per-child execution
        (sampling from ``generator`` or the int64 ``seed`` tensor, as :meth:`Branching.forward`)."""
        self.check()
        started = None
        if self.conv_backend == "triton" and self.steps:  # the first conv reads through the index
            started = indexed.start_block(self.steps[0], self.block, branching, parents, generator, seed)
        if started is not None:
            stacked, rest = started, self.steps[1:]
        else:  # gather through the branching op: device-side index, no host sync
            stacked, rest = (
                Stacked(branching(parents, generator=generator, seed=seed), CHILDREN, self.children),
                self.steps,
            )
        for step in rest:
            stacked = step(stacked)
        return self._children_outputs(stacked)

    def _children_outputs(self, stacked: Stacked) -> torch.Tensor:
        """``[J, *S']`` in child order."""
        if stacked.layout == CHANNELS:
            return to_children(stacked.tensor, self.children)
        return stacked.tensor
