"""LearnToBranch-Deep-Wide (paper Sec. 4.2, Table 1): GNAS's Deep-Wide network as a tree, 40 CelebA attributes.

GNAS's Deep-Wide model has five convolutional layers and two fully-connected layers; the paper branches
"at the end of each convolutional layer" with {2, 4, 8, 16, 40} children, so the five convolutions are the
five blocks (the last, one node per attribute) and the two fully-connected layers are each attribute's
head. Choices made here, as the paper gives no layer widths:

- Every convolution: 3x3, 64 channels ("wide"), BatchNorm, ReLU, 2x2 max-pool.
- Head per attribute: flatten, fully-connected 64 units + ReLU, then one logit (binary cross-entropy).
- Input: the aligned CelebA images as released, 218 x 178 (see ``celeba_vgg``), so the first
  fully-connected layer sees 64 x 6 x 5 features.
"""

from __future__ import annotations

from collections.abc import Sequence

from l2b_fast.datasets.celeba.layers import (
    CELEBA_ATTRIBUTES,
    CELEBA_INPUT_SIZE,
    BinaryHeads,
    ConvStageNode,
    pooled_size,
)
from l2b_fast.nn import BlockSpec
from l2b_fast.nn.spec import ModelSpec, check_children, check_input_size, check_width, scaled

DEEP_WIDE_CHILDREN = (2, 4, 8, 16, 40)  # the paper's, per block
CONV_LAYERS = 5
CONV_CHANNELS = 64
FC_UNITS = 64


def celeba_deep_wide_spec(
    tasks: Sequence[str] = CELEBA_ATTRIBUTES,
    *,
    children: Sequence[int] = DEEP_WIDE_CHILDREN,
    width: float = 1.0,
    input_size: int | tuple[int, int] = CELEBA_INPUT_SIZE,
) -> ModelSpec:
    """The model as a :class:`ModelSpec`; see the module docstring for the layout.

    Args:
        tasks: attribute names (default the 40 CelebA attributes in the standard order).
        children: children of the five blocks; the last entry is replaced by ``len(tasks)``.
        width: multiplier of the 64 convolution channels and the 64 fully-connected units.
        input_size: ``(height, width)`` of the input images (default 218 x 178).
    """
    width = check_width(width)
    tasks = tuple(tasks)
    children = [check_children(c) for c in children]
    if len(children) != CONV_LAYERS:
        raise ValueError(f"children needs {CONV_LAYERS} entries (one per convolution), got {len(children)}")
    size = check_input_size(input_size, smallest=2**CONV_LAYERS)
    channels, units = scaled(CONV_CHANNELS, width), scaled(FC_UNITS, width)
    nodes = [ConvStageNode(3 if layer == 0 else channels, channels, 1) for layer in range(CONV_LAYERS)]
    counts = children[:-1] + [len(tasks)]
    blocks = tuple(BlockSpec(count, node) for count, node in zip(counts, nodes))
    height, width_px = pooled_size(size, CONV_LAYERS)
    heads = BinaryHeads(channels * height * width_px, hidden=units)
    config = {"tasks": len(tasks), "children": counts, "width": width, "input_size": list(size)}
    return ModelSpec("celeba_deep_wide", blocks, tasks, heads, (3, *size), config)


def celeba_deep_wide(
    tasks: Sequence[str] = CELEBA_ATTRIBUTES,
    *,
    execution: str = "auto",
    tau: float = 1.0,
    backend: str | None = None,
    **spec_options,
):
    """The LearnToBranch-Deep-Wide supernet (a ``TreeSupernet``); options as :func:`celeba_deep_wide_spec`."""
    return celeba_deep_wide_spec(tasks, **spec_options).supernet(tau=tau, backend=backend, execution=execution)
