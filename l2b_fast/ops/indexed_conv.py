"""The index-reading convolution: child j's 2-D convolution of ``parents[index[j]]``, all J children in one launch.

``indexed_conv2d`` reads the parents through the sampled index on the device (Triton kernels of
:mod:`l2b_fast.triton.indexed_conv`: no gathered copy, no re-stack in channels) and writes the channel-stacked output
a grouped block's following layers take. The backward gives what the gather's backward would, its straight-through
part riding on the input-gradient kernels: in frozen mode a parent-major kernel sums each parent's children's
transposed convolutions straight into ``grad_parents`` (no per-child dX); in search mode the child-major kernel
computes the I x J dot products in its epilogue (then the softmax backward to the logits) and writes dX only for
``branch_backward``'s segment sums; with one parent the logits' gradient is exactly 0 and no kernel runs for it.
``FUSED_BACKWARD = False`` selects the reference path: every child's dX, then ``branch_backward`` for all.
:func:`indexed_conv2d_ref` is the pure-PyTorch reference the tests hold it to.

The operator takes ``(parents, logits, index, soft, tau, weight, bias, stride, padding, dilation)``, like the
branching op ``straight_through_branch`` takes ``(parents, logits, index, soft, tau)``: the fused backward returns the
logits' gradient (the softmax backward applied), so the logits are the differentiable input and ``soft`` (sampled
without gradient) is data. Detached logits (``"frozen"`` mode) mean no I x J dot products at all.

Both directions are ``torch.library`` custom ops with fake kernels and registered autograd, as the branching ops:
opaque to ``torch.compile`` and checked by ``opcheck``. Importing this module does not import Triton; the kernels are
loaded on first use. :mod:`l2b_fast.nn.grouped.indexed` starts grouped blocks with it (``conv_backend="triton"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from l2b_fast import backends
from l2b_fast.ops import _validation
from l2b_fast.ops._registration import children_strides, softmax_backward

__all__ = [
    "FUSED_BACKWARD",
    "branch_backward_op",
    "branch_ops",
    "straight_through_branch_op",
    "SUPPORTED_DTYPES",
    "indexed_conv2d",
    "indexed_conv2d_ref",
    "unavailable_reason",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# True: the backward's straight-through part rides on the input-gradient kernels (frozen: the parent-major
# kernel writes grad_parents; search: the I x J dots in the child-major kernel's epilogue). False: each
# child's dX, then branch_backward, the reference the tests hold the fused paths to.
FUSED_BACKWARD = True
INSTALL_HINT = "pip install 'triton>=3.6,<3.10'"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton convolution cannot run on ``device`` tensors here, or None when it can."""
    if not backends.TRITON_INSTALLED:
        return f"it needs Triton ({INSTALL_HINT}); use conv_backend='cudnn'"
    if device.type == "cuda" or (device.type == "cpu" and backends.triton_interpreting()):
        return None
    return (
        "its kernels run on CUDA tensors (on CPU only through Triton's interpreter, TRITON_INTERPRET=1, for "
        f"tests), not {device.type}; use conv_backend='cudnn'"
    )


def _kernels():
    from l2b_fast.triton import indexed_conv

    return indexed_conv


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def check_inputs(parents: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes and devices of :func:`indexed_conv2d`; TypeError for what the kernels do not compute."""
    if parents.dim() != 5:
        raise ValueError(
            "indexed_conv2d: parents must be [I, B, C, H, W] (2-D convolution of batched inputs), got shape "
            f"{tuple(parents.shape)}"
        )
    if parents.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"indexed_conv2d: the Triton kernels take float16/bfloat16/float32 parents, got {parents.dtype}; use "
            "the cudnn path (conv_backend='cudnn') for it"
        )
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(
            f"indexed_conv2d: index must be a 1-D int64 tensor, got {index.dtype} of shape {tuple(index.shape)}"
        )
    if weight.dim() != 5:
        raise ValueError(f"indexed_conv2d: weight must be [J, Co, C, KH, KW], got shape {tuple(weight.shape)}")
    if weight.shape[0] != index.shape[0]:
        raise ValueError(f"indexed_conv2d: weight has {weight.shape[0]} children but index has {index.shape[0]}")
    if weight.shape[2] != parents.shape[2]:
        raise ValueError(
            f"indexed_conv2d: weight expects {weight.shape[2]} input channels per child (groups=1 only), parents "
            f"have {parents.shape[2]}"
        )
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"indexed_conv2d: bias must be [J, Co] = {tuple(weight.shape[:2])}, got {tuple(bias.shape)}")
    for name, tensor in (("index", index), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != parents.device:
            raise ValueError(f"indexed_conv2d: {name} is on {tensor.device} but parents are on {parents.device}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != parents.dtype:
            raise TypeError(f"indexed_conv2d: {name} is {tensor.dtype} but parents are {parents.dtype}")


def branch_ops(device: torch.device):
    """The fused branching operators of the backend the branching op would choose for ``device`` (the compiled
    ``cpp`` kernels where they run, else Triton's): its ``straight_through_branch`` and ``branch_backward``."""
    if backends.select(None, device) == "cpp":
        return torch.ops.l2b_fast  # registered (fakes and autograd) when l2b_fast.ops is imported
    from l2b_fast.ops import _triton  # noqa: F401  defines torch.ops.l2b_fast_triton

    return torch.ops.l2b_fast_triton


def branch_backward_op(device: torch.device):
    """The fused straight-through backward (segment sums; the I x J dot products when asked)."""
    return branch_ops(device).branch_backward


def straight_through_branch_op(device: torch.device):
    """The branching op for a sample already drawn: ``[J, *S]`` children, straight-through backward."""
    return branch_ops(device).straight_through_branch


def _geometry(stride, padding, dilation):
    return _kernels().Geometry(tuple(stride), tuple(padding), tuple(dilation))


@torch.library.custom_op("l2b_fast_triton::indexed_conv2d", mutates_args=())
def _indexed_conv2d_op(
    parents: Tensor, logits: Tensor, index: Tensor, soft: Tensor, tau: Tensor, weight: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:  # fmt: skip
    return _kernels().conv_forward(parents, index.contiguous(), weight, bias, _geometry(stride, padding, dilation))


@_indexed_conv2d_op.register_fake
def _(parents, logits, index, soft, tau, weight, bias, stride, padding, dilation):
    return _kernels().empty_output(parents, weight.shape, _geometry(stride, padding, dilation))


@torch.library.custom_op("l2b_fast_triton::indexed_conv2d_backward", mutates_args=())
def _indexed_conv2d_backward_op(
    grad_out: Tensor, parents: Tensor, index: Tensor, soft: Tensor, tau: Tensor, weight: Tensor,
    stride: list[int], padding: list[int], dilation: list[int],
    need_grad_parents: bool, need_grad_logits: bool, need_grad_weight: bool, need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_parents, grad_logits, grad_weight, grad_bias); one not needed comes back empty (shape [0])."""
    kernels, geometry, index = _kernels(), _geometry(stride, padding, dilation), index.contiguous()
    empty = lambda like: like.new_empty((0,))  # noqa: E731  one each: outputs must not alias
    grad_parents, grad_logits = empty(parents), empty(soft)
    if FUSED_BACKWARD and need_grad_logits and parents.shape[0] == 1:
        # One parent (a stem, a first block): each child's straight-through weight is a softmax over one logit,
        # 1 whatever the logits, so their gradient is exactly 0. No transposed convolution just for the dots;
        # the parents' gradient, if needed, comes from the parent-major kernel below.
        grad_logits, need_grad_logits = torch.zeros_like(soft, memory_format=torch.contiguous_format), False
    if not FUSED_BACKWARD and (need_grad_parents or need_grad_logits):  # the reference: dX, then branch_backward
        grad_children, _ = kernels.conv_input_grad(grad_out, weight, parents, geometry, children_strides(parents))
        grad_parents, grad_logits = branch_backward_op(parents.device)(
            grad_children, parents, index, soft, tau, need_grad_parents, need_grad_logits
        )
    elif need_grad_logits:  # search: the dots in the input gradient's epilogue; dX only for the segment sums
        grad_children, dots = kernels.conv_input_grad(
            grad_out, weight, parents, geometry, children_strides(parents), dots=True, write_children=need_grad_parents
        )
        if need_grad_parents:
            grad_parents, _ = branch_backward_op(parents.device)(grad_children, parents, index, soft, tau, True, False)
        # branch_backward's softmax backward, in float64 as its kernels compute it
        grad_logits = softmax_backward(soft.double(), dots, tau.double()).float().to(soft.dtype).contiguous()
    elif need_grad_parents:  # frozen: each parent sums its children's transposed convolutions, no dX at all
        grad_parents = kernels.conv_parents_grad(grad_out, weight, parents, index, geometry)
    grad_weight = (
        kernels.conv_weight_grad(grad_out, parents, index, weight.shape, geometry).to(weight.dtype)
        if need_grad_weight
        else empty(weight)
    )
    grad_bias = empty(weight)
    if need_grad_bias:  # fp32 sums, as the weight gradient
        grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).view(weight.shape[:2]).to(weight.dtype)
    return grad_parents, grad_logits, grad_weight, grad_bias


@_indexed_conv2d_backward_op.register_fake
def _(
    grad_out,
    parents,
    index,
    soft,
    tau,
    weight,
    stride,
    padding,
    dilation,
    need_grad_parents,
    need_grad_logits,
    need_grad_weight,
    need_grad_bias,
):
    return (
        torch.empty_like(parents) if need_grad_parents else parents.new_empty((0,)),
        torch.empty_like(soft, memory_format=torch.contiguous_format) if need_grad_logits else soft.new_empty((0,)),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty((0,)),
        weight.new_empty(weight.shape[:2]) if need_grad_bias else weight.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    parents, _logits, index, soft, tau, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(parents, index, soft, tau, weight)
    ctx.geometry = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    parents, index, soft, tau, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad  # parents, logits, index, soft, tau, weight, bias, ...
    need_bias = ctx.has_bias and needs[6]
    grad_parents, grad_logits, grad_weight, grad_bias = _indexed_conv2d_backward_op(
        grad_out, parents, index, soft, tau, weight, *ctx.geometry, needs[0], needs[1], needs[5], need_bias
    )
    return (
        grad_parents if needs[0] else None, grad_logits if needs[1] else None, None, None, None,
        grad_weight if needs[5] else None, grad_bias if need_bias else None, None, None, None,
    )  # fmt: skip


_indexed_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def indexed_conv2d(
    parents: Tensor, logits: Tensor, index: Tensor, soft: Tensor, tau, weight: Tensor, bias: Tensor | None = None,
    *, stride=1, padding=0, dilation=1,
) -> Tensor:  # fmt: skip
    """Child j's 2-D convolution of ``parents[index[j]]``, all J children in one launch, channel-stacked.

    Args:
        parents: ``[I, B, C, H, W]`` float16/bfloat16/float32 (each parent contiguous or channels_last).
        logits: ``[I, J]``: receive the straight-through gradient when they require grad (search mode);
            detached (frozen) or an eval-mode argmax route: no I x J dot products.
        index: int64 ``[J]`` on the parents' device, e.g. from :func:`l2b_fast.ops.sample_branches`; read
            on the device (values must lie in ``[0, I)``; not checked: that would synchronise).
        soft: ``[I, J]``, the sample's softmax weights (no gradient flows into it).
        tau: the temperature (number or one-element tensor).
        weight: ``[J, Co, C, KH, KW]``; bias: ``[J, Co]`` or None. Same dtype as the parents.
        stride, padding (zeros), dilation: ints or pairs.

    Returns:
        ``[B, J*Co, Ho, Wo]``, child j's output in channels ``[j*Co, (j+1)*Co)``: what the grouped path's
        ``groups=J`` convolution of the gathered, channel-stacked children gives.
    """
    parents = _validation.as_parents_tensor(parents)  # each parent one dense block, as branch_backward reads it
    check_inputs(parents, index, weight, bias)
    _validation.check_logits(logits, parents=parents.shape[0])
    if soft.shape != logits.shape:
        raise ValueError(
            f"indexed_conv2d: soft must be shaped like logits {tuple(logits.shape)}, got {tuple(soft.shape)}"
        )
    if logits.shape[1] != index.shape[0]:
        raise ValueError(f"indexed_conv2d: logits have {logits.shape[1]} children but index has {index.shape[0]}")
    reason = unavailable_reason(parents.device)
    if reason is not None:
        raise backends.BackendUnavailableError(f"indexed_conv2d: {reason}")
    tau = _validation.as_tau_tensor(tau, logits.device)
    geometry = [
        list(_pair(stride, "stride", 1)),
        list(_pair(padding, "padding", 0)),
        list(_pair(dilation, "dilation", 1)),
    ]
    return _indexed_conv2d_op(parents, logits, index, soft.detach(), tau, weight, bias, *geometry)


def indexed_conv2d_ref(
    parents: Tensor, logits: Tensor, index: Tensor, soft: Tensor, tau, weight: Tensor, bias: Tensor | None = None,
    *, stride=1, padding=0, dilation=1,
) -> Tensor:  # fmt: skip
    """Pure-PyTorch reference of :func:`indexed_conv2d`: gumbel-softmax weights over all parents (the
    branching op's oracle), the children stacked in channels, one ``groups=J`` ``F.conv2d``.

    The straight-through weights are ``hard + s - s.detach()`` with ``s = soft * e / sum_i(soft * e)``,
    ``e = exp((logits - logits.detach()) / tau)``: ``s`` has the value of ``soft`` and the softmax's
    gradient ``soft * (g - sum_i soft * g) / tau`` with respect to the logits, whatever noise drew it."""
    tau = _validation.as_tau_tensor(tau, logits.device).to(soft.dtype)
    scaled = soft.detach() * torch.exp((logits - logits.detach()) / tau)
    surrogate = scaled / scaled.sum(dim=0, keepdim=True)
    hard = F.one_hot(index, num_classes=parents.shape[0]).T.to(soft.dtype)
    weights = (hard + surrogate - surrogate.detach()).to(parents.dtype)
    children = torch.tensordot(weights.T, parents, dims=1)  # [J, B, C, H, W]
    num_children, batch, channels, height, width = children.shape
    stacked = children.transpose(0, 1).reshape(batch, num_children * channels, height, width)
    return F.conv2d(
        stacked, weight.flatten(0, 1), None if bias is None else bias.flatten(), _pair(stride, "stride", 1),
        _pair(padding, "padding", 0), _pair(dilation, "dilation", 1), num_children,
    )  # fmt: skip
