"""Fake (meta) kernels and autograd shared by the ``cpp`` and ``triton`` custom-op namespaces.

Both namespaces expose the same three operators (schemas in csrc/ops.cpp):
``sample_branches`` (returns ``(soft, index)``), ``straight_through_branch`` and ``branch_backward``.
"""

from __future__ import annotations

import torch


def _fake_sample_branches(logits, tau, noise, seed):
    soft = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return soft, logits.new_empty((logits.shape[1],), dtype=torch.int64)


def children_strides(parents: torch.Tensor) -> tuple[int, ...]:
    """Strides of the ``[J, *S]`` children: the parents' layout with rows N = numel / I apart (with one
    parent, ``parents.stride(0)`` can be anything; children rows must not overlap)."""
    return (parents[0].numel(), *parents.stride()[1:])


def _fake_straight_through_branch(parents, logits, index, soft, tau):
    return parents.new_empty_strided((index.shape[0], *parents.shape[1:]), children_strides(parents))


def _fake_branch_backward(grad_out, parents, index, soft, tau, need_grad_parents=True, need_grad_logits=True):
    grad_parents = torch.empty_like(parents) if need_grad_parents else parents.new_empty((0,))
    grad_logits = (
        torch.empty_like(soft, memory_format=torch.contiguous_format) if need_grad_logits else soft.new_empty((0,))
    )
    return grad_parents, grad_logits


def softmax_backward(soft: torch.Tensor, grad_soft: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Gradient of the logits through soft = softmax_i((logits + noise) / tau)."""
    return soft * (grad_soft - (soft * grad_soft).sum(dim=0, keepdim=True)) / tau


def register(namespace: str) -> None:
    """Register fakes and autograd for ``namespace``'s three operators."""
    ops = getattr(torch.ops, namespace)
    backward_op = ops.branch_backward

    def sample_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[0], inputs[1])

    def sample_backward(ctx, grad_soft, grad_index):
        soft, tau = ctx.saved_tensors
        return softmax_backward(soft, grad_soft, tau).to(soft.dtype), None, None, None

    def branch_setup_context(ctx, inputs, output):
        parents, _logits, index, soft, tau = inputs
        ctx.save_for_backward(parents, index, soft, tau)

    def branch_backward(ctx, grad_out):
        parents, index, soft, tau = ctx.saved_tensors
        # Only what autograd needs: frozen (detached) logits skip the I x J dot products entirely,
        # a parents tensor that needs no gradient (the network input) skips the segment sum.
        needs_parents, needs_logits = ctx.needs_input_grad[:2]
        grad_parents, grad_logits = backward_op(grad_out, parents, index, soft, tau, needs_parents, needs_logits)
        return (grad_parents if needs_parents else None, grad_logits if needs_logits else None, None, None, None)

    qualified = f"{namespace}::"
    torch.library.register_fake(qualified + "sample_branches")(_fake_sample_branches)
    torch.library.register_fake(qualified + "straight_through_branch")(_fake_straight_through_branch)
    torch.library.register_fake(qualified + "branch_backward")(_fake_branch_backward)
    torch.library.register_autograd(qualified + "sample_branches", sample_backward, setup_context=sample_setup_context)
    torch.library.register_autograd(
        qualified + "straight_through_branch", branch_backward, setup_context=branch_setup_context
    )


class CustomOpBackend:
    """A backend made of one namespace's operators: sample under no_grad, then the straight-through op."""

    def __init__(self, namespace: str):
        self.ops = getattr(torch.ops, namespace)

    def sample_branches(self, logits, tau, noise, seed):
        soft, index = self.ops.sample_branches(logits, tau, noise, seed)
        return index, soft

    def branch(self, parents, logits, tau, noise, seed):
        with torch.no_grad():
            soft, index = self.ops.sample_branches(logits.detach(), tau, noise, seed)
        return self.ops.straight_through_branch(parents, logits, index, soft, tau)
