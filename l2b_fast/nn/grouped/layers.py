"""Grouped layers: each step runs the J children's copies of one layer as one launch.

A step holds the J structurally identical modules (child order) and stacks their parameters on the fly
in the positions' order, so the parameters, buffers and ``state_dict`` stay the per-child modules' own.
Routed steps (:mod:`l2b_fast.nn.grouped.routing`) can also start a block from the parents directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2b_fast.nn.blocks import BasicBlock
from l2b_fast.nn.grouped import routing
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked


class UnsupportedNodeError(ValueError):
    """A block's nodes cannot run grouped (an unsupported module, or children that differ in structure)."""


CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Parameter-free modules that act on every element on its own: the same module runs on the whole stack.
POINTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Softplus, nn.Dropout,
)
# Parameter-free modules that act on each [sample, channel] plane: any layout whose leading dims are
# (batch, channels) works, so children-major stacks run as a batch of J*B samples.
PER_CHANNEL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def stacked_parameter(modules: Sequence[nn.Module], order: Sequence[int], name: str) -> torch.Tensor | None:
    """The children's parameter ``name`` concatenated along dim 0 in position order (None if absent)."""
    first = getattr(modules[order[0]], name)
    if first is None:
        return None
    return torch.cat([getattr(modules[j], name) for j in order])


def common_training_flag(modules: Sequence[nn.Module]) -> bool:
    training = modules[0].training
    if any(module.training != training for module in modules):
        raise ValueError(f"the children's {type(modules[0]).__name__} modules are not all in the same train/eval mode")
    return training


class Step:
    """One layer of every child. ``layout``: the stack layout it needs (None: any)."""

    layout: str | None = None
    routable = False  # can start a block from the parents (routing.RoutedInput)
    routed_layout: str | None = None  # the layout of the per-child input gradient when routed

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def __call__(self, x: Stacked, order: Sequence[int]) -> Stacked:
        raise NotImplementedError

    def routed(self, routed_input: routing.RoutedInput, order: Sequence[int]) -> Stacked:
        raise TypeError(f"{type(self).__name__} cannot start a block from the parents")


def reads_parents_directly(conv: nn.Module) -> bool:
    """A convolution a block can start with from the parents themselves (host routing, or the index-reading
    convolution): groups=1, zero padding given as numbers (no separate padding pass on the input)."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class ConvStep(Step):
    layout = CHANNELS
    routed_layout = CHANNELS

    def __init__(self, modules):
        super().__init__(modules)
        self.routable = reads_parents_directly(self.modules[0])

    def _check(self, per_child_dims: int) -> None:
        conv = self.modules[0]
        expected = len(conv.kernel_size) + 2
        if per_child_dims != expected:
            raise ValueError(f"grouped execution needs batched inputs: {type(conv).__name__} got {per_child_dims}-D inputs per child, expected {expected}-D")

    def __call__(self, x, order):
        x = x.to(CHANNELS)
        self._check(len(x.per_child_shape()))
        conv = self.modules[0]
        weight = stacked_parameter(self.modules, order, "weight")
        bias = stacked_parameter(self.modules, order, "bias")
        tensor, padding = x.tensor, conv.padding
        if conv.padding_mode != "zeros":  # pad per channel first, as nn.ConvNd does
            tensor = F.pad(tensor, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        convolution = CONVOLUTIONS[type(conv)]
        return x.with_tensor(convolution(tensor, weight, bias, conv.stride, padding, conv.dilation, conv.groups * x.children))

    def routed(self, routed_input, order):
        self._check(routed_input.parents.dim() - 1)
        conv = self.modules[0]
        weight = stacked_parameter(self.modules, order, "weight")
        bias = stacked_parameter(self.modules, order, "bias")
        geometry = routing.ConvGeometry(len(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
        out = routing.routed_conv(routed_input, weight, bias, geometry)
        return Stacked(out, CHANNELS, routed_input.children)


class BatchNormStep(Step):
    """BatchNorm over the J*C stacked channels: per-child statistics, each child's running buffers
    updated exactly as its own module would. ``momentum=None`` (cumulative average, factor
    1/num_batches_tracked) is applied from the counters as tensors: no host read (nn.BatchNorm reads them)."""

    layout = CHANNELS

    def __call__(self, x, order):
        x = x.to(CHANNELS)
        modules = [self.modules[j] for j in order]
        bn = modules[0]
        training = common_training_flag(modules)
        counting = training and bn.track_running_stats and bn.num_batches_tracked is not None
        if counting:
            with torch.no_grad():
                torch._foreach_add_([module.num_batches_tracked for module in modules], 1)
        bn_training = training or (bn.running_mean is None and bn.running_var is None)
        use_buffers = (not training or bn.track_running_stats) and bn.running_mean is not None
        mean = torch.cat([module.running_mean for module in modules]) if use_buffers else None
        var = torch.cat([module.running_var for module in modules]) if use_buffers else None
        weight = stacked_parameter(modules, range(len(modules)), "weight")
        bias = stacked_parameter(modules, range(len(modules)), "bias")
        cumulative = counting and bn.momentum is None and use_buffers
        # Cumulative averages are updated below; F.batch_norm leaves the buffers alone with momentum 0.
        momentum = 0.0 if bn.momentum is None else bn.momentum
        out = F.batch_norm(x.tensor, mean, var, weight, bias, bn_training, momentum, bn.eps)
        if cumulative:  # new tensors: F.batch_norm's backward saved the stacked ones
            mean, var = self._cumulative_average(x.tensor, modules, mean, var)
        if use_buffers and bn_training:  # the stacked copies were updated: hand them back, one launch
            with torch.no_grad():
                torch._foreach_copy_(
                    [module.running_mean for module in modules] + [module.running_var for module in modules],
                    [*mean.chunk(len(modules)), *var.chunk(len(modules))],
                )
        return x.with_tensor(out)

    @staticmethod
    @torch.no_grad()
    def _cumulative_average(tensor, modules, mean, var):
        dims = [0, *range(2, tensor.dim())]
        data = tensor.detach()
        counts = torch.stack([module.num_batches_tracked for module in modules])
        factor = (1.0 / counts.to(mean.dtype)).repeat_interleave(mean.shape[0] // len(modules))
        new_mean = (1 - factor) * mean + factor * data.mean(dims).to(mean.dtype)
        new_var = (1 - factor) * var + factor * data.var(dims, correction=1).to(var.dtype)
        return new_mean, new_var


class LinearStep(Step):
    """Linear over the last dim of each child: one batched matmul over the J children."""

    layout = CHILDREN
    routable = True
    routed_layout = CHILDREN

    def __call__(self, x, order):
        x = x.to(CHILDREN)
        tensor = x.tensor
        weight = torch.stack([self.modules[j].weight for j in order])  # [J, out, in]
        flat = tensor.reshape(x.children, -1, tensor.shape[-1])
        if self.modules[0].bias is None:
            out = torch.bmm(flat, weight.transpose(1, 2))
        else:
            bias = torch.stack([self.modules[j].bias for j in order]).unsqueeze(1)
            out = torch.baddbmm(bias, flat, weight.transpose(1, 2))
        return x.with_tensor(out.view(*tensor.shape[:-1], weight.shape[1]))

    def routed(self, routed_input, order):
        weight = stacked_parameter(self.modules, order, "weight")
        bias = stacked_parameter(self.modules, order, "bias")
        return Stacked(routing.routed_linear(routed_input, weight, bias), CHILDREN, routed_input.children)


class ModuleStep(Step):
    """A parameter-free module (activation, pooling, dropout) run once on the whole stack."""

    def __call__(self, x, order):
        module = self.modules[0]
        if isinstance(module, RANDOM):
            common_training_flag(self.modules)
        if isinstance(module, PER_CHANNEL) and x.layout == CHILDREN:
            tensor = x.tensor
            out = module(tensor.reshape(-1, *tensor.shape[2:]))  # [J*B, C, *sp]
            return x.with_tensor(out.view(*tensor.shape[:2], *out.shape[1:]))
        return x.with_tensor(module(x.tensor))


class FlattenStep(Step):
    layout = CHILDREN

    def __call__(self, x, order):
        x = x.to(CHILDREN)
        flatten = self.modules[0]
        shift = lambda dim: dim + 1 if dim >= 0 else dim  # noqa: E731  per-child dim -> stacked dim
        return x.with_tensor(torch.flatten(x.tensor, shift(flatten.start_dim), shift(flatten.end_dim)))


class BasicBlockStep(Step):
    """:class:`~l2b_fast.nn.BasicBlock`: its convolutions and BatchNorms grouped, the shortcut too."""

    layout = CHANNELS
    routed_layout = CHANNELS

    def __init__(self, modules):
        super().__init__(modules)
        part = lambda name: [getattr(block, name) for block in self.modules]  # noqa: E731
        self.conv1, self.bn1 = ConvStep(part("conv1")), BatchNormStep(part("bn1"))
        self.conv2, self.bn2 = ConvStep(part("conv2")), BatchNormStep(part("bn2"))
        self.downsample = None
        if self.modules[0].downsample is not None:
            shortcut = part("downsample")
            self.downsample = (ConvStep([s[0] for s in shortcut]), BatchNormStep([s[1] for s in shortcut]))
        self.routable = self.conv1.routable and (self.downsample is None or self.downsample[0].routable)

    def finish(self, body: Stacked, shortcut: Stacked, order) -> Stacked:
        """Everything after conv1 (bn1, ReLU, conv2, bn2, + shortcut, ReLU): the same for every start
        (gathered, host-routed, or read through the index: :mod:`l2b_fast.nn.grouped.indexed`)."""
        body = self.bn2(self.conv2(body.with_tensor(F.relu(self.bn1(body, order).tensor)), order), order)
        return body.with_tensor(F.relu(body.tensor + shortcut.tensor))

    def __call__(self, x, order):
        x = x.to(CHANNELS)
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x, order), order)
        return self.finish(self.conv1(x, order), shortcut, order)

    def routed(self, routed_input, order):
        if self.downsample is None:
            shortcut = Stacked(routing.routed_identity(routed_input), CHANNELS, routed_input.children)
        else:
            shortcut = self.downsample[1](self.downsample[0].routed(routed_input, order), order)
        return self.finish(self.conv1.routed(routed_input, order), shortcut, order)


class BiasStep(Step):
    """``x + bias`` with the bias over the last dim (:class:`l2b_fast.nn.Bias`, the task heads of the paper's synthetic experiment)."""

    layout = CHILDREN

    def __call__(self, x, order):
        x = x.to(CHILDREN)
        bias = torch.stack([self.modules[j].bias for j in order])  # [J, F]
        return x.with_tensor(x.tensor + bias.view(x.children, *[1] * (x.tensor.dim() - 2), -1))


def library_steps() -> dict[type, type[Step]]:
    """Steps for the library's modules outside ``l2b_fast.nn``, imported on first use (they import
    ``l2b_fast.nn`` themselves)."""
    from l2b_fast.nn.blocks import Bias

    return {Bias: BiasStep}


def module_signature(module: nn.Module) -> list:
    """What must agree between children for them to run as one: types, hyper-parameters, tensor metadata."""
    signature = []
    for name, sub in module.named_modules():
        tensors = [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in sub._parameters.items() if p is not None]
        tensors += [(n, None if b is None else (tuple(b.shape), b.dtype, b.device)) for n, b in sub._buffers.items()]
        signature.append((name, type(sub), sub.extra_repr(), tuple(tensors)))
    return signature


def _steps(modules: list[nn.Module], where: str) -> list[Step]:
    module = modules[0]
    kind = type(module)
    if module._forward_hooks or module._forward_pre_hooks:
        raise UnsupportedNodeError(f"{where} ({kind.__name__}) has forward hooks, which grouped execution would not call")
    if kind is nn.Sequential:
        return [step for name in module._modules for step in _steps([m._modules[name] for m in modules], f"{where}.{name}")]
    if kind in CONVOLUTIONS:
        return [ConvStep(modules)]
    if kind in BATCH_NORMS:
        return [BatchNormStep(modules)]
    if kind is nn.Linear:
        return [LinearStep(modules)]
    if kind is nn.Flatten:
        return [FlattenStep(modules)]
    if kind in POINTWISE or kind in PER_CHANNEL:
        if getattr(module, "return_indices", False):
            raise UnsupportedNodeError(f"{where} ({kind.__name__}) returns indices, which grouped execution does not support")
        return [ModuleStep(modules)]
    if kind is BasicBlock:
        for name in ("conv1", "bn1", "conv2", "bn2"):
            _steps([getattr(m, name) for m in modules], f"{where}.{name}")  # hooks and kinds checked
        if module.downsample is not None:
            _steps([m.downsample for m in modules], f"{where}.downsample")
        return [BasicBlockStep(modules)]
    step = library_steps().get(kind)
    if step is not None:
        return [step(modules)]
    raise UnsupportedNodeError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which grouped execution does not support")


def plan_steps(nodes: Sequence[nn.Module], block: int) -> list[Step]:
    """The grouped steps of one block's nodes; raises :class:`UnsupportedNodeError` naming the module."""
    nodes = list(nodes)
    reference = module_signature(nodes[0])
    for child, node in enumerate(nodes[1:], start=1):
        if module_signature(node) != reference:
            raise UnsupportedNodeError(f"block {block}: child {child} differs in structure from child 0 (types, hyper-parameters or parameter shapes), so its children cannot run as one")
    return _steps(nodes, f"block {block} node")
