"""Grouped layers: each step runs the J children's copies of one layer as one launch.

A step holds the J structurally identical modules (child order) and stacks their parameters on the fly, so the
parameters, buffers and ``state_dict`` stay the per-child modules' own. :data:`GROUPED_STEPS` maps a node's module
type to its step; :func:`register_grouped_step` adds a user's layer type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2b_fast.nn.blocks import BasicBlock, Bias
from l2b_fast.nn.grouped.stacked import CHANNELS, CHILDREN, Stacked


class UnsupportedNodeError(ValueError):
    """A block's nodes cannot run grouped (an unsupported module, or children that differ in structure)."""


CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Parameter-free modules that act on every element on its own: the same module runs on the whole stack.
POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Softplus,
    nn.Dropout,
)
# Parameter-free modules that act on each [sample, channel] plane: any layout whose leading dims are
# (batch, channels) works, so children-major stacks run as a batch of J*B samples.
PER_CHANNEL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def stacked_parameter(modules: Sequence[nn.Module], name: str) -> torch.Tensor | None:
    """The children's parameter ``name`` concatenated along dim 0 in child order (None if absent)."""
    if getattr(modules[0], name) is None:
        return None
    return torch.cat([getattr(module, name) for module in modules])


def common_training_flag(modules: Sequence[nn.Module]) -> bool:
    training = modules[0].training
    if any(module.training != training for module in modules):
        raise ValueError(f"the children's {type(modules[0]).__name__} modules are not all in the same train/eval mode")
    return training


class Step:
    """One layer of every child: ``step(x)`` takes the J children's inputs stacked (:class:`Stacked`) and returns
    their outputs stacked. ``layout``: the stack layout it needs (None: any). ``where`` names the user's module
    (``block 2 node.0``) in errors.

    A subclass for a user's layer type is registered with :func:`register_grouped_step`; it reads the children's
    parameters from ``self.modules`` at every call (stacking them costs one copy; the modules keep their own)."""

    layout: str | None = None

    def __init__(self, modules: Sequence[nn.Module], where: str = "node"):
        self.modules = list(modules)
        self.where = where

    def __call__(self, x: Stacked) -> Stacked:
        raise NotImplementedError

    @classmethod
    def check(cls, modules: Sequence[nn.Module], where: str) -> None:
        """:class:`UnsupportedNodeError` for modules of this type that grouped execution cannot run (default: none)."""

    def describe(self) -> str:
        return f"{self.where} ({type(self.modules[0]).__name__})"


def reads_parents_directly(conv: nn.Module) -> bool:
    """A convolution the index-reading convolution can start a block with: groups=1, zero padding given as numbers
    (no separate padding pass on the input)."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class ConvStep(Step):
    layout = CHANNELS

    def _check(self, per_child_shape: Sequence[int]) -> None:
        conv = self.modules[0]
        expected = len(conv.kernel_size) + 2
        if len(per_child_shape) != expected:
            raise ValueError(
                f"{self.describe()}: grouped execution needs batched inputs: got {len(per_child_shape)}-D inputs "
                f"per child, expected {expected}-D"
            )
        if per_child_shape[1] != conv.in_channels:
            raise ValueError(
                f"{self.describe()}: expected {conv.in_channels} input channels, got {per_child_shape[1]} "
                f"(per-child input {list(per_child_shape)})"
            )

    def __call__(self, x):
        x = x.to(CHANNELS)
        self._check(x.per_child_shape())
        conv = self.modules[0]
        weight = stacked_parameter(self.modules, "weight")
        bias = stacked_parameter(self.modules, "bias")
        tensor, padding = x.tensor, conv.padding
        if conv.padding_mode != "zeros":  # pad per channel first, as nn.ConvNd does
            tensor = F.pad(tensor, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        convolution = CONVOLUTIONS[type(conv)]
        return x.with_tensor(
            convolution(tensor, weight, bias, conv.stride, padding, conv.dilation, conv.groups * x.children)
        )


class BatchNormStep(Step):
    """BatchNorm over the J*C stacked channels: per-child statistics, each child's running buffers
    updated exactly as its own module would. ``momentum=None`` (cumulative average, factor
    1/num_batches_tracked) is applied from the counters as tensors: no host read (nn.BatchNorm reads them)."""

    layout = CHANNELS

    def __call__(self, x):
        x = x.to(CHANNELS)
        modules = self.modules
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
        weight = stacked_parameter(modules, "weight")
        bias = stacked_parameter(modules, "bias")
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

    def __call__(self, x):
        x = x.to(CHILDREN)
        tensor = x.tensor
        in_features = self.modules[0].in_features
        if tensor.shape[-1] != in_features:
            raise ValueError(
                f"{self.describe()}: expected {in_features} input features, got {tensor.shape[-1]} (per-child "
                f"input {list(x.per_child_shape())})"
            )
        weight = torch.stack([module.weight for module in self.modules])  # [J, out, in]
        flat = tensor.reshape(x.children, -1, tensor.shape[-1])
        if self.modules[0].bias is None:
            out = torch.bmm(flat, weight.transpose(1, 2))
        else:
            bias = torch.stack([module.bias for module in self.modules]).unsqueeze(1)
            out = torch.baddbmm(bias, flat, weight.transpose(1, 2))
        return x.with_tensor(out.view(*tensor.shape[:-1], weight.shape[1]))


class ModuleStep(Step):
    """A parameter-free module (activation, pooling, dropout) run once on the whole stack."""

    @classmethod
    def check(cls, modules, where):
        if getattr(modules[0], "return_indices", False):
            raise UnsupportedNodeError(
                f"{where} ({type(modules[0]).__name__}) returns indices, which grouped execution does not support"
            )

    def __call__(self, x):
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

    def __call__(self, x):
        x = x.to(CHILDREN)
        flatten = self.modules[0]
        shift = lambda dim: dim + 1 if dim >= 0 else dim  # noqa: E731  per-child dim -> stacked dim
        return x.with_tensor(torch.flatten(x.tensor, shift(flatten.start_dim), shift(flatten.end_dim)))


class BasicBlockStep(Step):
    """:class:`~l2b_fast.nn.BasicBlock`: its convolutions and BatchNorms grouped, the shortcut too."""

    layout = CHANNELS

    def __init__(self, modules, where="node"):
        super().__init__(modules, where)
        part = lambda name: [getattr(block, name) for block in self.modules]  # noqa: E731
        self.conv1, self.bn1 = ConvStep(part("conv1"), f"{where}.conv1"), BatchNormStep(part("bn1"), f"{where}.bn1")
        self.conv2, self.bn2 = ConvStep(part("conv2"), f"{where}.conv2"), BatchNormStep(part("bn2"), f"{where}.bn2")
        self.downsample = None
        if self.modules[0].downsample is not None:
            shortcut = part("downsample")
            self.downsample = (
                ConvStep([s[0] for s in shortcut], f"{where}.downsample.0"),
                BatchNormStep([s[1] for s in shortcut], f"{where}.downsample.1"),
            )

    @classmethod
    def check(cls, modules, where):
        for name in ("conv1", "bn1", "conv2", "bn2"):
            _steps([getattr(m, name) for m in modules], f"{where}.{name}")  # hooks and kinds checked
        if modules[0].downsample is not None:
            _steps([m.downsample for m in modules], f"{where}.downsample")

    def finish(self, body: Stacked, shortcut: Stacked) -> Stacked:
        """Everything after conv1 (bn1, ReLU, conv2, bn2, + shortcut, ReLU): the same for every start
        (gathered, or read through the index: :mod:`l2b_fast.nn.grouped.indexed`)."""
        body = self.bn2(self.conv2(body.with_tensor(F.relu(self.bn1(body).tensor))))
        return body.with_tensor(F.relu(body.tensor + shortcut.tensor))

    def __call__(self, x):
        x = x.to(CHANNELS)
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return self.finish(self.conv1(x), shortcut)


class BiasStep(Step):
    """``x + bias`` with the bias over the last dim (:class:`l2b_fast.nn.Bias`, the task heads of the paper's
    synthetic experiment)."""

    layout = CHILDREN

    def __call__(self, x):
        x = x.to(CHILDREN)
        bias = torch.stack([module.bias for module in self.modules])  # [J, F]
        return x.with_tensor(x.tensor + bias.view(x.children, *[1] * (x.tensor.dim() - 2), -1))


#: A node's module type -> the :class:`Step` that runs the J children's modules of that type as one. Exact types
#: (a subclass is not its parent: its forward may differ); ``nn.Sequential`` is walked, each of its modules looked
#: up here. Add your own with :func:`register_grouped_step`.
GROUPED_STEPS: dict[type[nn.Module], type[Step]] = {
    **dict.fromkeys(CONVOLUTIONS, ConvStep),
    **dict.fromkeys(BATCH_NORMS, BatchNormStep),
    nn.Linear: LinearStep,
    nn.Flatten: FlattenStep,
    **dict.fromkeys(POINTWISE + PER_CHANNEL, ModuleStep),
    BasicBlock: BasicBlockStep,
    Bias: BiasStep,
}


def register_grouped_step(module_type: type[nn.Module], step: type[Step] | Callable[..., Step]) -> None:
    """Lets grouped execution run nodes holding ``module_type`` modules: ``step(modules, where)`` builds the
    :class:`Step` for the J children's modules of that type (child order), ``where`` naming them in errors.
    Replaces an earlier registration of the same type."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_grouped_step: module_type must be an nn.Module subclass, got {module_type!r}")
    if module_type is nn.Sequential:
        raise ValueError("register_grouped_step: nn.Sequential is walked module by module; register its modules' types")
    if not callable(step):
        raise TypeError(f"register_grouped_step: step must be a Step subclass or a callable, got {step!r}")
    GROUPED_STEPS[module_type] = step


def module_signature(module: nn.Module) -> list:
    """What must agree between children for them to run as one: types, hyper-parameters, tensor metadata."""
    signature = []
    for name, sub in module.named_modules():
        tensors = [
            (n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in sub._parameters.items() if p is not None
        ]
        tensors += [(n, None if b is None else (tuple(b.shape), b.dtype, b.device)) for n, b in sub._buffers.items()]
        signature.append((name, type(sub), sub.extra_repr(), tuple(tensors)))
    return signature


def _steps(modules: list[nn.Module], where: str) -> list[Step]:
    module = modules[0]
    kind = type(module)
    if module._forward_hooks or module._forward_pre_hooks:
        raise UnsupportedNodeError(
            f"{where} ({kind.__name__}) has forward hooks, which grouped execution would not call"
        )
    if kind is nn.Sequential:
        return [
            step for name in module._modules for step in _steps([m._modules[name] for m in modules], f"{where}.{name}")
        ]
    step = GROUPED_STEPS.get(kind)
    if step is None:
        raise UnsupportedNodeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which grouped execution does not support "
            "(l2b_fast.nn.grouped.register_grouped_step adds a layer type)"
        )
    getattr(step, "check", Step.check)(modules, where)
    return [step(modules, where)]


def plan_steps(nodes: Sequence[nn.Module], block: int) -> list[Step]:
    """The grouped steps of one block's nodes; raises :class:`UnsupportedNodeError` naming the module."""
    nodes = list(nodes)
    reference = module_signature(nodes[0])
    for child, node in enumerate(nodes[1:], start=1):
        if module_signature(node) != reference:
            raise UnsupportedNodeError(
                f"block {block}: child {child} differs in structure from child 0 (types, hyper-parameters or "
                "parameter shapes), so its children cannot run as one"
            )
    return _steps(nodes, f"block {block} node")
