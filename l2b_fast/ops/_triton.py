"""The ``triton`` backend: the Triton kernels of ``l2b_fast.triton`` as ``torch.ops.l2b_fast_triton`` ops.

Same three operators and semantics as the C++ schemas (csrc/ops.cpp), defined with
``torch.library.custom_op`` so they trace under ``torch.compile`` and pass ``opcheck``.
Imported lazily: only when the ``triton`` backend is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2b_fast.ops import _registration
from l2b_fast.triton import branch as _branch_kernels
from l2b_fast.triton import sample_branches as _sample_kernels


@torch.library.custom_op("l2b_fast_triton::sample_branches", mutates_args=())
def _sample_branches_op(
    logits: Tensor, tau: Tensor, noise: Tensor | None, seed: Tensor | None
) -> tuple[Tensor, Tensor]:
    index, soft = _sample_kernels.sample_branches(logits, tau, noise, seed)
    return soft, index


@torch.library.custom_op("l2b_fast_triton::straight_through_branch", mutates_args=())
def _straight_through_branch_op(parents: Tensor, logits: Tensor, index: Tensor, soft: Tensor, tau: Tensor) -> Tensor:
    return _branch_kernels.gather_children(parents, index)


@torch.library.custom_op("l2b_fast_triton::branch_backward", mutates_args=())
def _branch_backward_op(
    grad_out: Tensor,
    parents: Tensor,
    index: Tensor,
    soft: Tensor,
    tau: Tensor,
    need_grad_parents: bool = True,
    need_grad_logits: bool = True,
) -> tuple[Tensor, Tensor]:
    return _branch_kernels.branch_backward(
        grad_out, parents, index, soft, tau, need_grad_parents=need_grad_parents, need_grad_logits=need_grad_logits
    )


_registration.register("l2b_fast_triton")
BACKEND = _registration.CustomOpBackend("l2b_fast_triton")
