"""The J children's activations held as one tensor, in one of two layouts.

- ``"channels"``: ``[B, J*C, *spatial]``, child k's channels at ``[k*C, (k+1)*C)``: convolutions with
  ``groups = J * groups`` and BatchNorm over ``J*C`` channels then act on every child at once (HFTA style).
- ``"children"``: ``[J, B, *S]``, the per-child stacking a branching block returns: Linear is one batched
  matmul over J, and it is the block's output format.

Position k holds child ``order[k]`` (children grouped by sampled parent on the host path; the identity on
the gather path); the block's output is put back into child order once, when leaving.
"""

from __future__ import annotations

import dataclasses

import torch

CHANNELS, CHILDREN = "channels", "children"


@dataclasses.dataclass(frozen=True)
class Stacked:
    tensor: torch.Tensor
    layout: str
    children: int

    def per_child_shape(self) -> tuple[int, ...]:
        """The shape one child's activation has on its own."""
        if self.layout == CHILDREN:
            return tuple(self.tensor.shape[1:])
        batch, channels, *spatial = self.tensor.shape
        return (batch, channels // self.children, *spatial)

    def to(self, layout: str) -> Stacked:
        if layout == self.layout:
            return self
        return Stacked(to_channels(self.tensor) if layout == CHANNELS else to_children(self.tensor, self.children), layout, self.children)

    def with_tensor(self, tensor: torch.Tensor) -> Stacked:
        return Stacked(tensor, self.layout, self.children)


def to_channels(children_major: torch.Tensor) -> torch.Tensor:
    """``[J, B, C, *sp]`` -> ``[B, J*C, *sp]`` (one copy), channels_last kept where the children had it."""
    j, b, c, *spatial = children_major.shape
    moved = children_major.transpose(0, 1)  # [B, J, C, *sp]
    if len(spatial) == 2 and children_major[0].is_contiguous(memory_format=torch.channels_last) and c > 1:
        out = torch.empty((b, j * c, *spatial), dtype=moved.dtype, device=moved.device, memory_format=torch.channels_last)
        out.view(b, j, c, *spatial).copy_(moved)  # channels_last [B, J*C, H, W] splits into [B, J, C, H, W]
        return out
    return moved.reshape(b, j * c, *spatial)


def to_children(channel_stacked: torch.Tensor, children: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, J*C, *sp]`` -> ``[J, B, C, *sp]`` (one copy), taking positions ``positions`` if given (the
    inverse of the children's order), each child's activation channels_last if the stack was."""
    b, jc, *spatial = channel_stacked.shape
    moved = channel_stacked.view(b, children, jc // children, *spatial).transpose(0, 1)  # [J, B, C, *sp]
    if positions is not None:
        moved = moved.index_select(0, positions)
    if len(spatial) == 2 and channel_stacked.is_contiguous(memory_format=torch.channels_last) and jc // children > 1:
        per_child = torch.empty((b, jc // children, *spatial), device=moved.device, memory_format=torch.channels_last)
        out = torch.empty_strided((children, *per_child.shape), (per_child.numel(), *per_child.stride()), dtype=moved.dtype, device=moved.device)
        out.copy_(moved)
        return out
    return moved.contiguous()
