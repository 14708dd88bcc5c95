"""Starting a block from its parents without a gathered copy of the children's inputs (host index).

The sampled index is on the host (CPU tensors), so children are grouped by parent: position order puts
the children of each parent next to each other, and the first layer reads each parent once with its
children's weights concatenated (one convolution or matmul per distinct parent instead of one per child).

Gradients, exactly those of the gather (straight-through gumbel-softmax, ``l2b_fast.ops.branch``):

- the parents get the segment sum of their children's input gradients, the first layer computing it
  directly (its input gradient through the concatenated weights) when the logits need no gradient;
- when they do (search mode), every child's own input gradient ``g[j]`` is needed for
  ``G[i, j] = <g[j], Y[i]>``. The first layer then returns the per-child gradients (one grouped
  transposed convolution / batched matmul) to a *phantom*: a zero-strided tensor of the stacked shape
  that :class:`_Route` returns and nothing reads. Autograd sums the phantom's gradients from every
  layer that reads the input (a BasicBlock's conv1, downsample or identity), and :class:`_Route`'s
  backward turns them into the parents' segment sums and ``G``, the gradient of ``soft``; the softmax
  backward of ``l2b_fast.ops.sample_branches`` takes it to the logits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN

Groups = tuple[tuple[int, int, int], ...]  # (parent, first position, end position)


@dataclasses.dataclass(frozen=True)
class RoutedInput:
    """The children's inputs, not materialised: child at position k reads ``parents[parent of k]``."""

    parents: torch.Tensor  # [I, *S]; detached when a phantom carries the gradient
    phantom: torch.Tensor | None  # search mode: receives the per-child input gradients
    groups: Groups
    children: int
    zero_gradient_to: torch.Tensor | None = None  # soft of a one-parent block: its gradient is exactly 0


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


def group_positions(index: list[int]) -> tuple[list[int], Groups]:
    """Position order (children sorted by parent, stable) and the runs of children sharing a parent."""
    order = sorted(range(len(index)), key=index.__getitem__)
    groups, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or index[order[k]] != index[order[start]]:
            groups.append((index[order[start]], start, k))
            start = k
    return order, tuple(groups)


def phantom_shape(parents: torch.Tensor, children: int, layout: str) -> tuple[int, ...]:
    if layout == CHILDREN:
        return (children, *parents.shape[1:])
    batch, channels, *spatial = parents.shape[1:]
    return (batch, children * channels, *spatial)


def per_child_view(grad: torch.Tensor, children: int, layout: str) -> tuple[torch.Tensor, int]:
    """The stacked gradient with an explicit child axis, and that axis: ``[B, J, C, *sp]`` or ``[J, *S]``."""
    if layout == CHILDREN:
        return grad, 0
    batch, jc, *spatial = grad.shape
    return grad.reshape(batch, children, jc // children, *spatial), 1


def segment_sum(per_child: torch.Tensor, axis: int, groups: Groups, parents: torch.Tensor) -> torch.Tensor:
    """dL/dparents[i] = sum of the input gradients of the children that read parent i."""
    out = torch.zeros_like(parents)
    for parent, start, end in groups:
        out[parent] = per_child.narrow(axis, start, end - start).sum(axis)
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Route(torch.autograd.Function):
    """parents, soft -> phantom; backward: segment sums to the parents, G = <g[j], Y[i]> to soft."""

    @staticmethod
    def forward(ctx, parents, soft, groups, layout, positions):
        ctx.groups, ctx.layout, ctx.children = groups, layout, soft.shape[1]
        ctx.save_for_backward(parents, positions)
        ctx.soft_dtype = soft.dtype
        # Never read: it only carries the per-child input gradients back here.
        return parents.new_zeros(()).expand(phantom_shape(parents, ctx.children, layout))

    @staticmethod
    def backward(ctx, grad):
        parents, positions = ctx.saved_tensors
        per_child, axis = per_child_view(grad, ctx.children, ctx.layout)
        grad_parents = grad_soft = None
        if ctx.needs_input_grad[0]:
            grad_parents = segment_sum(per_child, axis, ctx.groups, parents)
        if ctx.needs_input_grad[1]:
            acc = accumulation_dtype(parents.dtype)
            rows = parents.reshape(parents.shape[0], -1).to(acc)  # [I, N]
            if ctx.layout == CHILDREN:
                dots = rows @ per_child.reshape(ctx.children, -1).to(acc).T  # [I, J]
            else:  # per child [B, J, M] against parents [I, B, M]
                batch = per_child.shape[0]
                dots = torch.einsum("bjm,ibm->ij", per_child.reshape(batch, ctx.children, -1).to(acc), rows.view(rows.shape[0], batch, -1))
            grad_soft = dots.index_select(1, positions).to(ctx.soft_dtype)  # positions -> child order
        return grad_parents, grad_soft, None, None, None


def route(parents: torch.Tensor, soft: torch.Tensor, groups: Groups, layout: str, positions: torch.Tensor) -> torch.Tensor:
    """The phantom for a search-mode block whose first layer is routed (``positions[j]``: child j's position)."""
    return _Route.apply(parents, soft, groups, layout, positions)


class _ZeroGradientTo(torch.autograd.Function):
    """``weight`` unchanged; ``soft`` gets an exact zero gradient. With one parent, softmax over parents is
    constant, so the logits' gradient is 0 whatever G is: the block skips the per-child input gradients
    (and the dot products) and still hands the logits the zero gradient the gather would."""

    @staticmethod
    def forward(ctx, weight, soft):
        ctx.soft_shape, ctx.soft_dtype = soft.shape, soft.dtype
        return weight.view_as(weight)  # only read by the routed layers below, never modified in place

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.soft_shape, dtype=ctx.soft_dtype)


def tie_zero_gradient(weight: torch.Tensor, routed: RoutedInput) -> torch.Tensor:
    return weight if routed.zero_gradient_to is None else _ZeroGradientTo.apply(weight, routed.zero_gradient_to)


def amp_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype the first layer would run in on its own (None: autocast off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def amp_cast(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if tensor is None or dtype is None or tensor.dtype == torch.float64 or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _expanded_input(grad_out: torch.Tensor, shape) -> torch.Tensor:
    return grad_out.new_empty(1).expand(shape)  # sizes only: an input gradient does not read the input


class _RoutedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phantom, parents, weight, bias, groups, geometry, children):
        compute = amp_dtype(parents.device.type)
        with torch.autocast(parents.device.type, enabled=False):
            data, w, b = amp_cast(parents, compute), amp_cast(weight, compute), amp_cast(bias, compute)
            out_per_child = w.shape[0] // children
            convolution = (F.conv1d, F.conv2d, F.conv3d)[geometry.dims - 1]
            outs = [
                convolution(
                    data[parent], w[start * out_per_child : end * out_per_child],
                    None if b is None else b[start * out_per_child : end * out_per_child],
                    geometry.stride, geometry.padding, geometry.dilation,
                )
                for parent, start, end in groups
            ]
        ctx.save_for_backward(data, w)
        ctx.groups, ctx.geometry, ctx.children = groups, geometry, children
        ctx.has_bias, ctx.weight_dtype, ctx.parents_dtype = bias is not None, weight.dtype, parents.dtype
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @staticmethod
    def backward(ctx, grad_out):
        data, w = ctx.saved_tensors
        g = ctx.geometry
        need_phantom, need_parents, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_out = grad_out.to(w.dtype)
        per_child = w.shape[0] // ctx.children
        zeros = [0] * g.dims
        grad_phantom = grad_parents = grad_weight = grad_bias = None
        if need_phantom:  # every child's own input gradient: one grouped transposed convolution
            batch, _, *spatial = data.shape[1:]
            shape = (batch, ctx.children * w.shape[1], *spatial)
            grad_phantom = torch.ops.aten.convolution_backward(
                grad_out, _expanded_input(grad_out, shape), w, None, g.stride, g.padding, g.dilation, False, zeros,
                ctx.children, [True, False, False])[0].to(ctx.parents_dtype)
        if need_parents:
            grad_parents = torch.zeros_like(data)
        weights, biases = [], []
        for parent, start, end in ctx.groups:
            rows = slice(start * per_child, end * per_child)
            grad_input, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out[:, rows], data[parent], w[rows], [w[rows].shape[0]] if ctx.has_bias else None,
                g.stride, g.padding, g.dilation, False, zeros, 1, [need_parents, need_weight, need_bias and ctx.has_bias])
            if need_parents:
                grad_parents[parent] = grad_input
            weights.append(grad_w)
            biases.append(grad_b)
        if need_weight:
            grad_weight = torch.cat(weights).to(ctx.weight_dtype)
        if need_bias and ctx.has_bias:
            grad_bias = torch.cat(biases).to(ctx.weight_dtype)
        if grad_parents is not None:
            grad_parents = grad_parents.to(ctx.parents_dtype)
        return grad_phantom, grad_parents, grad_weight, grad_bias, None, None, None


def routed_conv(routed: RoutedInput, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry) -> torch.Tensor:
    """``[B, J*Cout, *sp']``: child at position k convolved with its own weight (rows ``k*Cout...``)."""
    weight = tie_zero_gradient(weight, routed)
    return _RoutedConv.apply(routed.phantom, routed.parents, weight, bias, routed.groups, geometry, routed.children)


class _RoutedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phantom, parents, weight, bias, groups, children):
        compute = amp_dtype(parents.device.type)
        with torch.autocast(parents.device.type, enabled=False):
            data, w, b = amp_cast(parents, compute), amp_cast(weight, compute), amp_cast(bias, compute)
            out_features = w.shape[0] // children
            outs = []
            for parent, start, end in groups:
                rows = slice(start * out_features, end * out_features)
                out = F.linear(data[parent], w[rows], None if b is None else b[rows])  # [*lead, k*out]
                outs.append(out.view(*out.shape[:-1], end - start, out_features).movedim(-2, 0))
        ctx.save_for_backward(data, w)
        ctx.groups, ctx.children = groups, children
        ctx.has_bias, ctx.weight_dtype, ctx.parents_dtype = bias is not None, weight.dtype, parents.dtype
        return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs)  # [J, *lead, out]

    @staticmethod
    def backward(ctx, grad_out):
        data, w = ctx.saved_tensors
        need_phantom, need_parents, need_weight, need_bias = ctx.needs_input_grad[:4]
        children = ctx.children
        out_features, in_features = w.shape[0] // children, w.shape[1]
        flat = grad_out.to(w.dtype).reshape(children, -1, out_features)  # [J, M, out]
        per_child_weight = w.view(children, out_features, in_features)
        grad_phantom = grad_parents = grad_weight = grad_bias = None
        if need_phantom:
            grad_phantom = torch.bmm(flat, per_child_weight).view(*grad_out.shape[:-1], in_features).to(ctx.parents_dtype)
        if need_parents:
            grad_parents = torch.zeros_like(data)
        weights = []
        for parent, start, end in ctx.groups:
            rows = slice(start * out_features, end * out_features)
            # [M, k*out]: the group's output gradient as one matrix, children side by side
            side_by_side = flat[start:end].transpose(0, 1).reshape(flat.shape[1], -1)
            if need_weight:
                weights.append(side_by_side.T @ data[parent].reshape(-1, in_features))
            if need_parents:
                grad_parents[parent] = (side_by_side @ w[rows]).view(data[parent].shape)
        if need_weight:
            grad_weight = torch.cat(weights).to(ctx.weight_dtype)
        if need_bias and ctx.has_bias:
            grad_bias = flat.sum(1).reshape(-1).to(ctx.weight_dtype)
        if grad_parents is not None:
            grad_parents = grad_parents.to(ctx.parents_dtype)
        return grad_phantom, grad_parents, grad_weight, grad_bias, None, None


def routed_linear(routed: RoutedInput, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[J, *lead, out]``: child at position k's Linear (rows ``k*out...`` of ``weight``)."""
    weight = tie_zero_gradient(weight, routed)
    return _RoutedLinear.apply(routed.phantom, routed.parents, weight, bias, routed.groups, routed.children)


class _RoutedIdentity(torch.autograd.Function):
    """The children's inputs stacked in channels (a residual shortcut needs them as they are)."""

    @staticmethod
    def forward(ctx, phantom, parents, groups, children):
        ctx.groups, ctx.children = groups, children
        ctx.save_for_backward(parents)
        batch, channels, *spatial = parents.shape[1:]
        parts = [parents[parent].unsqueeze(1).expand(batch, end - start, channels, *spatial) for parent, start, end in groups]
        return torch.cat(parts, 1).view(batch, children * channels, *spatial)

    @staticmethod
    def backward(ctx, grad):
        (parents,) = ctx.saved_tensors
        grad_parents = None
        if ctx.needs_input_grad[1]:
            per_child, axis = per_child_view(grad, ctx.children, CHANNELS)
            grad_parents = segment_sum(per_child, axis, ctx.groups, parents)
        return grad if ctx.needs_input_grad[0] else None, grad_parents, None, None


def routed_identity(routed: RoutedInput) -> torch.Tensor:
    return _RoutedIdentity.apply(routed.phantom, routed.parents, routed.groups, routed.children)
