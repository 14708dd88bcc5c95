"""The paper's Taskonomy model (Sec. 4.3): a dilated ResNet-34 tree with per-task ASPP heads.

Backbone as AdaShare's DeepLab-ResNet-34 (the paper follows AdaShare): stem conv7x7/2 (64) + BN + ReLU +
max-pool 3x3/2 (padding 1, ``ceil_mode``), then stages of 3, 4, 6, 3 basic blocks at 64, 128, 256, 512
channels with strides 1, 2, 1, 1 and dilations 1, 1, 2, 4: output stride 8 (a 128x128 input gives 16x16
features). Choices made here:

- The stem is a shared input layer: a first block with a single child (its 1 x 1 branching is trivial),
  as AdaShare shares its stem. Branching starts after the first residual block.
- ``branching="block"`` (the paper: "branch at the end of every ResNet block"): one branching block per
  residual block, 16 in all, ``children`` nodes each; ``branching="stage"`` (as LibMTL): one per stage, 4
  in all. The last block has one child per task.
- Heads: DeepLab-v2 ASPP as in AdaShare's code: per rate (6, 12, 18, 24) a 3x3 convolution of that
  dilation to 1024 channels, ReLU, dropout, 1x1 to 1024, ReLU, dropout, 1x1 to the task's channels; the
  four branches are summed, then upsampled bilinearly by the output stride (8), so inputs whose sides are
  multiples of 8 get predictions at their own resolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2b_fast.datasets.taskonomy.protocol import TASKS as TASKONOMY_TASKS
from l2b_fast.nn import BlockSpec
from l2b_fast.nn.blocks import BasicBlock
from l2b_fast.nn.spec import ModelSpec, check_children, check_input_size, check_width, scaled

# Output channels per task (segmentation: 17 classes, background and uncertain folded together).
TASK_CHANNELS = {"segment_semantic": 17, "normal": 3, "depth_zbuffer": 1, "keypoints2d": 1, "edge_texture": 1}

STAGE_BLOCKS = (3, 4, 6, 3)  # ResNet-34
STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)
OUTPUT_STRIDE = 8
ASPP_RATES = (6, 12, 18, 24)


def resnet_stem(out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


@dataclasses.dataclass(frozen=True)
class StemNode:
    """Node factory of the stem block (every child is the same layer: there is one)."""

    out_channels: int

    def __call__(self, block: int, child: int) -> nn.Module:
        return resnet_stem(self.out_channels)


@dataclasses.dataclass(frozen=True)
class ResidualNode:
    """Node factory: ``layers`` = one ``(in, out, stride, dilation)`` per basic block of the node."""

    layers: tuple[tuple[int, int, int, int], ...]

    def __call__(self, block: int, child: int) -> nn.Module:
        blocks = [
            BasicBlock(cin, cout, stride=stride, dilation=dilation) for cin, cout, stride, dilation in self.layers
        ]
        return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


class ASPPHead(nn.Module):
    """DeepLab-v2 atrous spatial pyramid pooling head: parallel dilated branches, summed, then upsampled."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden: int = 1024,
        rates: Sequence[int] = ASPP_RATES,
        dropout: float = 0.5,
        upsample: int = OUTPUT_STRIDE,
    ):
        super().__init__()
        if not rates:
            raise ValueError("ASPPHead needs at least one rate")
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, out_channels, 1),
            )
            for rate in rates
        )
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.upsample > 1:
            out = F.interpolate(out, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return out


@dataclasses.dataclass(frozen=True)
class ASPPHeads:
    """Head factory: ``task -> ASPPHead`` with that task's output channels."""

    in_channels: int
    out_channels: tuple[tuple[str, int], ...]
    hidden: int
    rates: tuple[int, ...]
    dropout: float

    def __call__(self, task: str) -> nn.Module:
        return ASPPHead(
            self.in_channels, dict(self.out_channels)[task], hidden=self.hidden, rates=self.rates, dropout=self.dropout
        )


def taskonomy_resnet34_spec(
    tasks: Sequence[str] = TASKONOMY_TASKS,
    *,
    children: int = 5,
    width: float = 1.0,
    branching: str = "block",
    input_size: int | tuple[int, int] = 128,
    out_channels: Mapping[str, int] | None = None,
    aspp_channels: int = 1024,
    aspp_rates: Sequence[int] = ASPP_RATES,
    dropout: float = 0.5,
) -> ModelSpec:
    """The model as a :class:`ModelSpec` (blocks, tasks, heads); see the module docstring for the layout.

    Args:
        tasks: Taskonomy task names (default the paper's five).
        children: child nodes of every branching block but the last (which has one per task).
        width: multiplier of every channel count (backbone and ASPP), for small test and CPU models.
        branching: ``"block"`` (after every residual block) or ``"stage"`` (after every stage).
        input_size: the image side (or ``(height, width)``) the model is used at: 128 for the search.
        out_channels: output channels of tasks other than the five known ones.
        aspp_channels, aspp_rates, dropout: the ASPP heads (AdaShare's 1024, rates 6/12/18/24, 0.5).
    """
    width = check_width(width)
    children = check_children(children)
    if branching not in ("block", "stage"):
        raise ValueError(f'branching must be "block" or "stage", got {branching!r}')
    tasks = tuple(tasks)
    channels_of = {**TASK_CHANNELS, **dict(out_channels or {})}
    unknown = [task for task in tasks if task not in channels_of]
    if unknown:
        raise ValueError(f"no output channels known for tasks {unknown}: give out_channels={{task: channels}}")
    height, width_px = check_input_size(input_size, smallest=OUTPUT_STRIDE)

    stem_channels = scaled(STAGE_CHANNELS[0], width)
    stages = []  # per stage, the (in, out, stride, dilation) of its basic blocks
    in_channels = stem_channels
    for blocks, channels, stride, dilation in zip(STAGE_BLOCKS, STAGE_CHANNELS, STAGE_STRIDES, STAGE_DILATIONS):
        channels = scaled(channels, width)
        stage = [(in_channels, channels, stride, dilation)] + [(channels, channels, 1, dilation)] * (blocks - 1)
        stages.append(stage)
        in_channels = channels
    if branching == "block":
        nodes = [ResidualNode((layer,)) for stage in stages for layer in stage]
    else:
        nodes = [ResidualNode(tuple(stage)) for stage in stages]
    block_specs = [BlockSpec(1, StemNode(stem_channels))]
    block_specs += [BlockSpec(len(tasks) if b == len(nodes) - 1 else children, node) for b, node in enumerate(nodes)]
    heads = ASPPHeads(
        in_channels,
        tuple((task, channels_of[task]) for task in tasks),
        scaled(aspp_channels, width),
        tuple(aspp_rates),
        dropout,
    )
    config = {
        "tasks": list(tasks),
        "children": children,
        "width": width,
        "branching": branching,
        "input_size": [height, width_px],
        "aspp_channels": aspp_channels,
        "aspp_rates": list(aspp_rates),
        "dropout": dropout,
    }
    return ModelSpec("taskonomy_resnet34", tuple(block_specs), tasks, heads, (3, height, width_px), config)


def taskonomy_resnet34(
    tasks: Sequence[str] = TASKONOMY_TASKS,
    *,
    execution: str = "auto",
    tau: float = 1.0,
    backend: str | None = None,
    **spec_options,
):
    """The Taskonomy supernet (a ``TreeSupernet``); options as :func:`taskonomy_resnet34_spec`."""
    return taskonomy_resnet34_spec(tasks, **spec_options).supernet(tau=tau, backend=backend, execution=execution)
