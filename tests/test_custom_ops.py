"""The custom operators as PyTorch sees them: gradcheck, opcheck, torch.compile(fullgraph=True)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import backend_cases, gumbel
from l2b_fast import _extension, ops

NAMESPACES = {"cpp": "l2b_fast", "triton": "l2b_fast_triton"}


def namespace_ops(backend: str):
    if backend == "triton":
        from l2b_fast.ops import _triton  # noqa: F401  (defines the namespace)
    return getattr(torch.ops, NAMESPACES[backend])


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_gradcheck_soft_sample(device, backend):
    """soft is a true function of logits: its float64 derivatives match finite differences."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    noise = gumbel((4, 3), generator).to(device)
    assert torch.autograd.gradcheck(lambda x: ops.sample_branches(x, 0.7, noise=noise, backend=backend)[1], (logits,))


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_gradcheck_parents(device, backend):
    """out = parents[index] is linear in parents: the segment-sum gradient is exact (float64 gradcheck)."""
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64).to(device)
    noise = gumbel((3, 4), generator).to(device)
    assert torch.autograd.gradcheck(lambda p: ops.branch(p, logits, 0.5, noise=noise, backend=backend), (y,))


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_logits_gradient_is_the_relaxed_derivative(device, backend):
    """The straight-through logits gradient equals the exact (gradcheck-verified) derivative of the
    relaxed output sum_i soft[i, j] parents[i] at the same noise (the estimator's definition)."""
    generator = torch.Generator().manual_seed(2)
    y = torch.randn(4, 6, generator=generator, dtype=torch.float64).to(device)
    logits = torch.randn(4, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    noise = gumbel((4, 5), generator).to(device)
    grad = torch.randn(5, 6, generator=generator, dtype=torch.float64).to(device)

    def relaxed(x):
        soft = torch.softmax((x + noise) / 0.6, dim=0)
        return soft.T @ y

    assert torch.autograd.gradcheck(relaxed, (logits,))
    (expected,) = torch.autograd.grad(relaxed(logits), logits, grad)
    (got,) = torch.autograd.grad(ops.branch(y, logits, 0.6, noise=noise, backend=backend), logits, grad)
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not _extension.loaded(), reason="the compiled extension is not built")
def test_cpp_fakes_registered_on_import():
    """A fresh process that only imports l2b_fast traces torch.ops.l2b_fast under FakeTensorMode: the fake
    kernels are registered with the package, not by the cpp backend's first use (no import-order dependence)."""
    script = textwrap.dedent(
        """
        import torch
        import l2b_fast
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            parents, logits = torch.empty(3, 4, 5), torch.empty(3, 6)
            tau = torch.tensor(0.5, dtype=torch.float64)
            soft, index = torch.ops.l2b_fast.sample_branches(logits, tau, None, torch.tensor([1]))
            children = torch.ops.l2b_fast.straight_through_branch(parents, logits, index, soft, tau)
            grad_parents, grad_logits = torch.ops.l2b_fast.branch_backward(children, parents, index, soft, tau)
        assert tuple(children.shape) == (6, 4, 5), children.shape
        assert tuple(grad_logits.shape) == (3, 6), grad_logits.shape
        """
    )
    root = Path(__file__).resolve().parents[1]  # the tree under test, whatever the working directory
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("device, backend", backend_cases())
def test_opcheck(device, backend):
    namespace = namespace_ops(backend)
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(3, 4, 5, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
        logits = torch.randn(3, 6, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
        noise = gumbel((3, 6), generator, dtype=dtype).to(device)
        seed = torch.tensor([17], device=device)
        tau = torch.tensor(0.8, dtype=torch.float64, device=device)
        torch.library.opcheck(namespace.sample_branches, (logits, tau, noise, None))
        torch.library.opcheck(namespace.sample_branches, (logits, tau, None, seed))
        with torch.no_grad():
            soft, index = namespace.sample_branches(logits, tau, noise, None)
        torch.library.opcheck(namespace.straight_through_branch, (y, logits, index, soft, tau))
        grad = torch.randn(6, 4, 5, generator=generator).to(device=device, dtype=dtype)
        torch.library.opcheck(namespace.branch_backward, (grad, y.detach(), index, soft, tau))
        for need_grad_parents, need_grad_logits in ((True, False), (False, True)):
            torch.library.opcheck(
                namespace.branch_backward, (grad, y.detach(), index, soft, tau, need_grad_parents, need_grad_logits)
            )


@pytest.mark.parametrize("device, backend", backend_cases(include_ref=True))
def test_compile_fullgraph(device, backend):
    """A branching step compiles with fullgraph=True (no graph breaks) and matches eager."""
    if backend == "triton" and device == "cpu":
        pytest.skip("inductor does not run interpreted Triton kernels: the triton op is compiled on CUDA only")
    generator = torch.Generator().manual_seed(4)
    y = torch.randn(3, 4, 5, generator=generator).to(device)
    logits = torch.randn(3, 2, generator=generator).to(device)
    noise = gumbel((3, 2), generator, dtype=torch.float32).to(device)

    def step(parents, weights):
        children = ops.branch(parents.tanh(), weights, 0.5, noise=noise, backend=backend)
        return (children * children).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, dynamic=False)):
        parents, weights = y.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        loss = fn(parents, weights)
        loss.backward()
        results.append((loss.detach(), parents.grad, weights.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
