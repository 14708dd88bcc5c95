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
        return Stacked(
            to_channels(self.tensor) if layout == CHANNELS else to_children(self.tensor, self.children),
            layout,
            self.children,
        )

    def with_tensor(self, tensor: torch.Tensor) -> Stacked:
        return Stacked(tensor, self.layout, self.children)


def _channels_layout_like(children_major: torch.Tensor) -> torch.memory_format:
    """channels_last for the stack where the children are channels_last (2-d, C > 1), else contiguous."""
    per_child = children_major[0]
    if per_child.dim() == 4 and per_child.shape[1] > 1 and per_child.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _children_major_like(channel_stacked: torch.Tensor, children: int) -> torch.Tensor:
    """An empty ``[J, B, C, *sp]`` whose children have the stack's layout (channels_last or contiguous)."""
    batch, jc, *spatial = channel_stacked.shape
    channels_last = (
        len(spatial) == 2 and jc // children > 1 and channel_stacked.is_contiguous(memory_format=torch.channels_last)
    )
    per_child = torch.empty(
        (batch, jc // children, *spatial),
        device="meta",
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    return torch.empty_strided(
        (children, *per_child.shape),
        (per_child.numel(), *per_child.stride()),
        dtype=channel_stacked.dtype,
        device=channel_stacked.device,
    )


class _ToChannels(torch.autograd.Function):
    """One copy each way; the backward writes the gradient straight into the children's layout (a
    reshape would copy twice where the layouts differ, e.g. channels_last)."""

    @staticmethod
    def forward(ctx, children_major):
        ctx.save_for_backward(torch.empty_like(children_major, device="meta"))
        j, b, c, *spatial = children_major.shape
        out = torch.empty(
            (b, j * c, *spatial),
            dtype=children_major.dtype,
            device=children_major.device,
            memory_format=_channels_layout_like(children_major),
        )
        out.view(b, j, c, *spatial).copy_(children_major.transpose(0, 1))
        return out

    @staticmethod
    def backward(ctx, grad):
        (like,) = ctx.saved_tensors
        j, b, c, *spatial = like.shape
        out = torch.empty_strided(like.shape, like.stride(), dtype=grad.dtype, device=grad.device)
        out.transpose(0, 1).copy_(grad.view(b, j, c, *spatial))
        return out


class _ToChildren(torch.autograd.Function):
    @staticmethod
    def forward(ctx, channel_stacked, children):
        ctx.save_for_backward(torch.empty_like(channel_stacked, device="meta"))
        ctx.children = children
        b, jc, *spatial = channel_stacked.shape
        out = _children_major_like(channel_stacked, children)
        out.copy_(channel_stacked.view(b, children, jc // children, *spatial).transpose(0, 1))
        return out

    @staticmethod
    def backward(ctx, grad):
        (like,) = ctx.saved_tensors
        b, jc, *spatial = like.shape
        out = torch.empty_strided(like.shape, like.stride(), dtype=grad.dtype, device=grad.device)
        out.view(b, ctx.children, jc // ctx.children, *spatial).transpose(0, 1).copy_(grad)
        return out, None


def to_channels(children_major: torch.Tensor) -> torch.Tensor:
    """``[J, B, C, *sp]`` -> ``[B, J*C, *sp]`` (one copy), channels_last kept where the children had it."""
    return _ToChannels.apply(children_major)


def to_children(channel_stacked: torch.Tensor, children: int) -> torch.Tensor:
    """``[B, J*C, *sp]`` -> ``[J, B, C, *sp]`` (one copy), each child's activation channels_last if the stack was."""
    return _ToChildren.apply(channel_stacked, children)
