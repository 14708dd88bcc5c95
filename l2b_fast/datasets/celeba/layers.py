"""Node and head factories shared by the CelebA models: plain picklable callables, no closures."""

from __future__ import annotations

import dataclasses

from torch import nn

from l2b_fast.datasets.celeba.dataset import ATTRIBUTES as CELEBA_ATTRIBUTES

# The aligned CelebA release's image size (height, width). The paper states only [-1, 1] normalisation and
# random flips for CelebA (no resize or crop), so the models are sized for the images as released.
CELEBA_INPUT_SIZE = (218, 178)

__all__ = ["CELEBA_ATTRIBUTES", "CELEBA_INPUT_SIZE", "BinaryHeads", "ConvStageNode", "LinearNode", "pooled_size"]


def pooled_size(size: tuple[int, int], pools: int) -> tuple[int, int]:
    """Spatial size after ``pools`` 2x2 max-pools (floor, as ``nn.MaxPool2d(2)``)."""
    return size[0] >> pools, size[1] >> pools


@dataclasses.dataclass(frozen=True)
class ConvStageNode:
    """``convs`` x (3x3 conv, BatchNorm, ReLU), the first from ``in_channels``, then a 2x2 max-pool."""

    in_channels: int
    out_channels: int
    convs: int

    def __call__(self, block: int, child: int) -> nn.Module:
        layers: list[nn.Module] = []
        for index in range(self.convs):
            layers += [
                nn.Conv2d(self.in_channels if index == 0 else self.out_channels, self.out_channels, 3, padding=1),
                nn.BatchNorm2d(self.out_channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class LinearNode:
    """A fully-connected layer + ReLU, flattening its ``[B, C, H, W]`` input first when ``flatten``."""

    in_features: int
    out_features: int
    flatten: bool = False

    def __call__(self, block: int, child: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()] if self.flatten else []
        return nn.Sequential(*layers, nn.Linear(self.in_features, self.out_features), nn.ReLU(inplace=True))


@dataclasses.dataclass(frozen=True)
class BinaryHeads:
    """Head factory of a binary attribute: one logit ``[B, 1]`` (binary cross-entropy).

    ``hidden=0``: a linear layer on the node's features; ``hidden > 0``: flatten, a fully-connected layer of
    ``hidden`` units + ReLU, then the logit (two fully-connected layers, as GNAS's Deep-Wide).
    """

    in_features: int
    hidden: int = 0

    def __call__(self, task: str) -> nn.Module:
        if self.hidden == 0:
            return nn.Linear(self.in_features, 1)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(self.in_features, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, 1)
        )
