"""LearnToBranch-VGG (paper Sec. 4.2, Table 1): a thin, truncated VGG-19 tree for the 40 CelebA attributes.

As Lu et al.'s Branch-VGG: the VGG-19 convolution stages (2, 2, 4, 4, 4 convolutions of 3x3, each stage
ending in a 2x2 max-pool) with 32 channels, then fully-connected layers of 64 units. The paper branches "at
the end of each resolution stage" with {3, 3, 5, 5, 10, 20, 30, 40} children: eight blocks, so the five
convolution stages and three fully-connected layers (fc6 on the flattened features, fc7, and the task
layer's fc8, one node per attribute). Choices made here, as the paper does not state them:

- Every convolution is followed by BatchNorm (VGG-19-BN style) and ReLU; fully-connected layers by ReLU.
- Heads: one linear logit per attribute on its 64-unit node (binary cross-entropy, "40 cross-entropy losses").
- Input: the aligned CelebA images as released, 218 x 178 (the paper mentions no resize or crop), so fc6
  sees 32 x 6 x 5 features. ``input_size`` sizes fc6 for other inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from l2b_fast.datasets.celeba.layers import (
    CELEBA_ATTRIBUTES,
    CELEBA_INPUT_SIZE,
    BinaryHeads,
    ConvStageNode,
    LinearNode,
    pooled_size,
)
from l2b_fast.nn import BlockSpec
from l2b_fast.nn.spec import ModelSpec, check_children, check_input_size, check_width, scaled

VGG19_STAGE_CONVS = (2, 2, 4, 4, 4)
VGG_CHILDREN = (3, 3, 5, 5, 10, 20, 30, 40)  # the paper's, per block
CONV_CHANNELS = 32
FC_UNITS = 64


def celeba_branch_vgg_spec(
    tasks: Sequence[str] = CELEBA_ATTRIBUTES,
    *,
    children: Sequence[int] = VGG_CHILDREN,
    width: float = 1.0,
    input_size: int | tuple[int, int] = CELEBA_INPUT_SIZE,
) -> ModelSpec:
    """The model as a :class:`ModelSpec`; see the module docstring for the layout.

    Args:
        tasks: attribute names (default the 40 CelebA attributes in the standard order).
        children: children of the eight blocks; the last entry is replaced by ``len(tasks)`` (one per task).
        width: multiplier of the 32 convolution channels and the 64 fully-connected units.
        input_size: ``(height, width)`` of the input images (default 218 x 178).
    """
    width = check_width(width)
    tasks = tuple(tasks)
    children = [check_children(c) for c in children]
    if len(children) != len(VGG19_STAGE_CONVS) + 3:
        raise ValueError(
            f"children needs {len(VGG19_STAGE_CONVS) + 3} entries (5 convolution stages, 3 fully-connected "
            f"layers), got {len(children)}"
        )
    size = check_input_size(input_size, smallest=2 ** len(VGG19_STAGE_CONVS))
    channels, units = scaled(CONV_CHANNELS, width), scaled(FC_UNITS, width)
    nodes = [
        ConvStageNode(3 if stage == 0 else channels, channels, convs) for stage, convs in enumerate(VGG19_STAGE_CONVS)
    ]
    height, width_px = pooled_size(size, len(VGG19_STAGE_CONVS))
    nodes += [
        LinearNode(channels * height * width_px, units, flatten=True),
        LinearNode(units, units),
        LinearNode(units, units),
    ]
    counts = children[:-1] + [len(tasks)]
    blocks = tuple(BlockSpec(count, node) for count, node in zip(counts, nodes))
    config = {"tasks": len(tasks), "children": counts, "width": width, "input_size": list(size)}
    return ModelSpec("celeba_branch_vgg", blocks, tasks, BinaryHeads(units), (3, *size), config)


def celeba_branch_vgg(
    tasks: Sequence[str] = CELEBA_ATTRIBUTES,
    *,
    execution: str = "auto",
    tau: float = 1.0,
    backend: str | None = None,
    **spec_options,
):
    """The LearnToBranch-VGG supernet (a ``TreeSupernet``); options as :func:`celeba_branch_vgg_spec`."""
    return celeba_branch_vgg_spec(tasks, **spec_options).supernet(tau=tau, backend=backend, execution=execution)
