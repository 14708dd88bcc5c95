"""The reference itself: it is F.gumbel_softmax(hard=True) over all parents, and its Philox is Philox."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from l2b_fast import ops
from l2b_fast.ops import _philox


def test_reference_is_torch_gumbel_softmax_hard():
    """Given the noise F.gumbel_softmax draws, branch_ref has its forward value and its gradients."""
    torch.manual_seed(0)
    parents, children, tau = 4, 6, 0.7
    y = torch.randn(parents, 3, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(parents, children, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(children, 3, 5, dtype=torch.float64)

    torch.manual_seed(1234)
    weights = F.gumbel_softmax(logits.T, tau=tau, hard=True, dim=-1).T  # [I, J]
    expected = torch.einsum("ij,i...->j...", weights, y)
    expected_grads = torch.autograd.grad(expected, (y, logits), grad)

    torch.manual_seed(1234)  # replay the exact noise gumbel_softmax drew (same RNG calls, same shape)
    noise = -torch.empty_like(logits.T, memory_format=torch.legacy_contiguous_format).exponential_().log()
    out = ops.branch_ref(y, logits, tau, noise.T, None)
    grads = torch.autograd.grad(out, (y, logits), grad)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_logits_gradient_formula():
    """d/dlogits = soft * (G - <soft, G>) / tau with G[i, j] = <grad[j], parents[i]>."""
    generator = torch.Generator().manual_seed(5)
    y = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    logits = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    grad = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    (grad_logits,) = torch.autograd.grad(ops.branch_ref(y, logits, 0.5, noise, None), logits, grad)
    soft = torch.softmax((logits.detach() + noise) / 0.5, dim=0)
    dots = y @ grad.T
    torch.testing.assert_close(grad_logits, soft * (dots - (soft * dots).sum(0)) / 0.5)


def philox_python(seed: int, counter: int) -> int:
    """Philox4x32-10 (Salmon et al. 2011) with Python integers, first output word."""
    mask = 0xFFFFFFFF
    c = [counter & mask, 0, 0, 0]
    k = [seed & mask, (seed >> 32) & mask]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k[1]) & mask, p0 & mask]
        k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
    return c[0]


def test_philox_matches_python_integers():
    for seed in (0, 1, 123456789, 2**63 - 1, -1, -(2**63)):
        counters = torch.tensor([0, 1, 2, 77, 2**31 - 1, 2**32 - 1])
        got = _philox.philox_uint32(torch.tensor(seed), counters).tolist()
        assert got == [philox_python(seed % 2**64, int(c)) for c in counters]


def test_philox_known_answer():
    """Random123's published known-answer vector for philox4x32-10, key 0 and counter 0."""
    assert philox_python(0, 0) == 0x6627E8D5
    assert _philox.philox_uint32(torch.tensor(0), torch.tensor([0])).item() == 0x6627E8D5


def test_gumbel_noise_is_finite_and_gumbel_distributed():
    noise = _philox.gumbel_noise(torch.tensor(42), 200, 500)
    assert torch.isfinite(noise).all() and noise.abs().max() < 17
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance = pi^2 / 6; 1e5 samples -> std errors ~0.004.
    assert abs(noise.mean().item() - 0.5772) < 0.02
    assert abs(noise.var().item() - 1.6449) < 0.04
