"""A grouped block's first convolution read through the sampled index: the ``conv_backend="triton"`` start.

The ``cudnn`` start of a gathered block copies the children's inputs twice (the branching op's gather ``[J, *S]``,
then the re-stack in channels) before one ``groups=J`` convolution. Here :func:`l2b_fast.ops.indexed_conv2d` reads
``parents[index[j]]`` in place instead. A residual :class:`~l2b_fast.nn.BasicBlock` starts the same way: its conv1
and its 1x1 downsample each read the parents through the one sample; an identity shortcut takes the children's
inputs from the library's straight-through branching op with that same sample (see :func:`start_block` for why the
gradients add up).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from l2b_fast import backends
from l2b_fast.nn.grouped.layers import BasicBlockStep, reads_parents_directly
from l2b_fast.nn.grouped.stacked import CHANNELS, Stacked, to_channels
from l2b_fast.ops import _validation
from l2b_fast.ops.indexed_conv import SUPPORTED_DTYPES, indexed_conv2d, straight_through_branch_op, unavailable_reason


def _indexable_conv(conv: nn.Module) -> bool:
    """One Conv2d the Triton convolution computes: one that could start a block from the parents."""
    return type(conv) is nn.Conv2d and reads_parents_directly(conv)


def indexable(step, parents: Tensor) -> bool:
    """A block whose first layer reads the parents through the index: a Conv2d per child, or a BasicBlock
    whose conv1 and 1x1 downsample (if any) are such convolutions; batched 2-D inputs (else the cudnn
    path runs; dtypes checked apart)."""
    if parents.dim() != 5:
        return False
    if isinstance(step, BasicBlockStep):
        shortcut = [] if step.downsample is None else [step.downsample[0].modules[0]]
        return all(_indexable_conv(conv) for conv in [step.conv1.modules[0], *shortcut])
    return _indexable_conv(step.modules[0])


def start_block(step, block: int, branching, parents: Tensor, generator, seed) -> Stacked | None:
    """The block's first convolution from the parents through the index, or None where it does not
    apply (the caller gathers instead). Samples exactly as the branching module does (same generator
    draw or seed, same index), so the result equals the gathered path's.

    For a BasicBlock this is the whole block: conv1 and a 1x1 downsample each read the parents through
    the index, an identity shortcut takes the children's inputs from the straight-through branching op
    with the same ``index`` and ``soft`` (no second draw), and the rest runs grouped as on the other
    paths. Each of those consumers turns its per-child input gradient ``g_c`` into the parents' and logits'
    gradients on its own (``branch_backward``'s computation, fused into the convolution's backward or not),
    and autograd adds what they return. That is exactly the gather's gradient for the summed
    ``g = sum_c g_c``: the parents' segment sums are linear in ``g``, and so is the logits' gradient
    (``G[i, j] = <g[j], parents[i]>``, then the softmax backward, linear in ``G``)."""
    reason = unavailable_reason(parents.device)
    if reason is not None:
        raise backends.BackendUnavailableError(f"block {block}: conv_backend='triton' cannot run: {reason}")
    if not indexable(step, parents):
        return None
    autocast = torch.is_autocast_enabled(parents.device.type)
    dtype = torch.get_autocast_dtype(parents.device.type) if autocast else parents.dtype
    if dtype not in SUPPORTED_DTYPES:
        return None
    parents = _validation.as_parents_tensor(parents)
    tau = _validation.as_tau_tensor(branching.tau_tensor, branching.logits.device)
    logits = branching.routed_logits()  # the logits get their gradient through the convolution's backward
    with torch.no_grad():  # the branching op samples without gradient too
        index, soft = branching.draw(generator, seed=seed)
    if soft is None:  # eval: as ops.branch(training=False), argmax, no noise, no logits gradient
        soft = torch.zeros_like(logits)
    # What F.conv2d does under autocast: compute in the autocast dtype (the shortcut keeps the parents' dtype).
    compute_parents = parents.to(dtype) if autocast else parents

    def convolution(modules: Sequence[nn.Module]) -> Stacked:
        conv = modules[0]
        weight, bias = stacked_conv_weights(modules)
        if autocast:
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = indexed_conv2d(
            compute_parents,
            logits,
            index,
            soft,
            tau,
            weight,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        return Stacked(out, CHANNELS, len(modules))

    if not isinstance(step, BasicBlockStep):
        return convolution(step.modules)
    if step.downsample is None:  # the children's inputs themselves, as the gathered path stacks them
        children = straight_through_branch_op(parents.device)(parents, logits, index, soft, tau)
        shortcut = Stacked(to_channels(children), CHANNELS, len(step.modules))
    else:
        shortcut = step.downsample[1](convolution(step.downsample[0].modules))
    return step.finish(convolution(step.conv1.modules), shortcut)


def stacked_conv_weights(modules: Sequence[nn.Module]) -> tuple[Tensor, Tensor | None]:
    """``[J, Co, C, KH, KW]`` weights and ``[J, Co]`` biases of the children's Conv2d modules."""
    weight = torch.stack([module.weight for module in modules])
    bias = None if modules[0].bias is None else torch.stack([module.bias for module in modules])
    return weight, bias
