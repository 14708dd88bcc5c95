"""Every backend against the float64 reference on fresh random data: forward and backward."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPE_TOLERANCES, backend_cases, gumbel
from l2b_fast import ops

SHAPES = [  # (parents I, children J, per-parent shape S)
    (1, 1, (3, 5)),
    (1, 4, (7,)),
    (4, 1, (2, 3, 5)),
    (3, 7, (3, 5, 7)),  # J > I, odd sizes
    (7, 3, (2, 9)),  # I > J
    (5, 5, (2, 4, 6, 6)),
]


def make_case(parents, children, shape, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn((parents, *shape), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    logits = torch.randn((parents, children), generator=generator, dtype=torch.float64).to(
        device=device, dtype=torch.float32
    )
    noise = gumbel((parents, children), generator).to(device=device, dtype=torch.float32)
    grad = torch.randn((children, *shape), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return y, logits, noise, grad


def run_branch(y, logits, noise, grad, tau, backend):
    y = y.detach().clone().requires_grad_(True)
    logits = logits.detach().clone().requires_grad_(True)
    out = ops.branch(y, logits, tau, noise=noise, backend=backend)
    out.backward(grad)
    return out.detach(), y.grad, logits.grad


def reference(y, logits, noise, grad, tau):
    """The float64 oracle on upcast copies of the same inputs."""
    return run_branch(y.double(), logits.double(), noise.double(), grad.double(), tau, "ref")


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("parents, children, shape", SHAPES)
def test_branch_matches_reference(device, backend, dtype, atol, rtol, parents, children, shape):
    y, logits, noise, grad = make_case(parents, children, shape, dtype, device, seed=parents * 100 + children)
    tau = 0.8
    out, grad_y, grad_logits = run_branch(y, logits, noise, grad, tau, backend)
    ref_out, ref_grad_y, ref_grad_logits = reference(y, logits, noise, grad, tau)
    assert out.dtype == dtype and out.shape == (children, *shape)
    index = ((logits + noise) / tau).argmax(0)
    torch.testing.assert_close(out, y[index], atol=0, rtol=0)  # forward is an exact copy
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_y.double(), ref_grad_y, atol=atol, rtol=rtol)
    assert grad_logits.dtype == logits.dtype
    # G sums N products: allow for the accumulation error of the input precision.
    scale = max(1.0, shape_numel(shape) ** 0.5)
    torch.testing.assert_close(
        grad_logits.double(), ref_grad_logits, atol=max(atol, 1e-6) * scale, rtol=max(rtol, 1e-5) * scale
    )


def shape_numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sample_branches_matches_reference(device, backend, dtype):
    generator = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(6, 9, generator=generator)).to(device=device, dtype=dtype)
    noise = gumbel((6, 9), generator, dtype=torch.float32).to(device)
    index, soft = ops.sample_branches(logits, 0.5, noise=noise, backend=backend)
    ref_index, ref_soft = ops.sample_branches(logits, 0.5, noise=noise, backend="ref")
    assert index.dtype == torch.int64 and index.shape == (9,)
    assert soft.dtype == dtype and soft.shape == (6, 9)
    torch.testing.assert_close(index, ref_index)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(soft.double(), ref_soft.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_seeded_noise_identical_across_backends(device, backend):
    """The same generator state gives the same parents on every backend (shared Philox stream)."""
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(2)).to(device)
    index, soft = ops.sample_branches(logits, 1.3, generator=torch.Generator(device).manual_seed(5), backend=backend)
    ref_index, ref_soft = ops.sample_branches(
        logits, 1.3, generator=torch.Generator(device).manual_seed(5), backend="ref"
    )
    torch.testing.assert_close(index, ref_index)
    torch.testing.assert_close(soft, ref_soft, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_parents(device, backend, dtype):
    """Parents laid out channels_last per parent: output keeps the layout, gradients stay exact."""
    generator = torch.Generator().manual_seed(4)
    members = [
        torch.randn(2, 3, 5, 4, generator=generator)
        .to(device=device, dtype=dtype)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(3)
    ]
    logits = torch.randn(3, 4, generator=generator).to(device)
    noise = gumbel((3, 4), generator, dtype=torch.float32).to(device)
    stacked = torch.stack(members)
    assert stacked[0].is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 2, 3, 5, 4, generator=generator).to(device=device, dtype=dtype)
    out, grad_y, grad_logits = run_branch(stacked, logits, noise, grad, 0.9, backend)
    ref_out, ref_grad_y, ref_grad_logits = reference(stacked, logits, noise, grad, 0.9)
    assert out.stride() == stacked.stride()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the segment sum is rounded to bf16
    torch.testing.assert_close(out.double(), ref_out)
    torch.testing.assert_close(grad_y.double(), ref_grad_y, atol=tol, rtol=tol)
    torch.testing.assert_close(grad_logits.double(), ref_grad_logits, atol=tol, rtol=tol)


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_sequence_of_parents_equals_stacked(device, backend):
    generator = torch.Generator().manual_seed(9)
    members = [torch.randn(3, 4, generator=generator).to(device) for _ in range(4)]
    logits = torch.randn(4, 6, generator=generator).to(device)
    noise = gumbel((4, 6), generator, dtype=torch.float32).to(device)
    from_list = ops.branch(members, logits, 1.0, noise=noise, backend=backend)
    from_tensor = ops.branch(torch.stack(members), logits, 1.0, noise=noise, backend=backend)
    torch.testing.assert_close(from_list, from_tensor, atol=0, rtol=0)
    assert from_list[2].shape == (3, 4)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_noncontiguous_grad_out(device, backend):
    """An upstream gradient in another layout (e.g. expanded) is laid out as the kernels need."""
    generator = torch.Generator().manual_seed(8)
    y = torch.randn(3, 4, 5, generator=generator).to(device)
    logits = torch.randn(3, 2, generator=generator).to(device)
    noise = gumbel((3, 2), generator, dtype=torch.float32).to(device)
    grad = torch.randn(5, 4, generator=generator).to(device).T.unsqueeze(0).expand(2, 4, 5)
    out, grad_y, grad_logits = run_branch(y, logits, noise, grad, 1.0, backend)
    ref_out, ref_grad_y, ref_grad_logits = reference(y, logits, noise, grad, 1.0)
    torch.testing.assert_close(grad_y.double(), ref_grad_y)
    torch.testing.assert_close(grad_logits.double(), ref_grad_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_eval_mode_routes_by_argmax_without_logits_gradient(device, backend):
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(4, 6, generator=generator).to(device).requires_grad_(True)
    logits = torch.randn(4, 5, generator=generator).to(device).requires_grad_(True)
    out = ops.branch(y, logits, 1.0, training=False, backend=backend)
    torch.testing.assert_close(out, y[logits.argmax(0)].detach())
    out.sum().backward()
    assert logits.grad is None
    counts = torch.bincount(logits.argmax(0), minlength=4).to(y.dtype)
    torch.testing.assert_close(y.grad, counts[:, None].expand(4, 6))


@pytest.mark.parametrize("device, backend", backend_cases())
def test_single_parent_with_arbitrary_leading_stride(device, backend):
    """With I = 1 the leading stride is arbitrary; the J children rows must still not overlap."""
    generator = torch.Generator().manual_seed(12)
    y = torch.randn(4, 1, 5, generator=generator).to(device).transpose(0, 1)  # [1, 4, 5], stride(0) = 5
    assert y.stride(0) != y[0].numel()
    logits = torch.randn(1, 3, generator=generator).to(device)
    noise = gumbel((1, 3), generator, dtype=torch.float32).to(device)
    grad = torch.randn(3, 4, 5, generator=generator).to(device)
    out, grad_y, grad_logits = run_branch(y, logits, noise, grad, 1.0, backend)
    torch.testing.assert_close(out, y.expand(3, 4, 5))
    torch.testing.assert_close(grad_y, grad.sum(0, keepdim=True))
    torch.testing.assert_close(grad_logits, torch.zeros_like(grad_logits))  # one parent: softmax is constant


@pytest.mark.parametrize("device, backend", [case for case in backend_cases() if case.values[1] == "triton"])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-10, 1e-10), (torch.bfloat16, 1.6e-2, 1.6e-2)])
def test_triton_backward_many_tiles_per_program(device, backend, dtype, atol, rtol):
    """Small tiles force the GPU-like launch: several tiles per program (the pipelined loop), several
    chunks (partials summed in order) and parent blocks; the interpreter's default is one tile."""
    from l2b_fast.ops import _triton  # noqa: F401  (defines torch.ops.l2b_fast_triton)
    from l2b_fast.triton import branch as triton_branch

    y, logits, noise, grad = make_case(5, 3, (7, 13), dtype, device, seed=21)
    tau = torch.tensor(0.7, dtype=torch.float64, device=device)
    soft, index = torch.ops.l2b_fast_triton.sample_branches(logits, tau, noise, None)
    grad_parents, grad_logits = triton_branch.branch_backward(
        grad, y, index, soft, tau, _block_n=16, _block_i=2, _num_chunks=2
    )
    _, ref_grad_y, ref_grad_logits = reference(y, logits, noise, grad, 0.7)
    torch.testing.assert_close(grad_parents.double(), ref_grad_y, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_logits.double(), ref_grad_logits, atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
