"""Bad input raises ValueError naming the problem, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import backend_cases
from l2b_fast import ops

ALL_BACKENDS = backend_cases(include_ref=True)


def good(device="cpu"):
    return torch.randn(3, 4, 5, device=device), torch.randn(3, 2, device=device)


@pytest.mark.parametrize("device, backend", ALL_BACKENDS)
@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan, "1.0", None, True])
def test_bad_tau(device, backend, tau):
    y, logits = good(device)
    with pytest.raises(ValueError, match="tau"):
        ops.branch(y, logits, tau, backend=backend)
    with pytest.raises(ValueError, match="tau"):
        ops.sample_branches(logits, tau, backend=backend)


@pytest.mark.parametrize("device, backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "logits, message",
    [
        (torch.randn(3), "2-D"),
        (torch.randn(3, 2, 1), "2-D"),
        (torch.randn(4, 2), "4 rows but there are 3 parents"),
        (torch.randn(3, 0), "at least one"),
        (torch.randint(0, 3, (3, 2)), "float"),
        ("logits", "tensor"),
    ],
)
def test_bad_logits(device, backend, logits, message):
    y, _ = good(device)
    if isinstance(logits, torch.Tensor):
        logits = logits.to(device)
    with pytest.raises(ValueError, match=message):
        ops.branch(y, logits, 1.0, backend=backend)


@pytest.mark.parametrize("backend", [case.values[1] for case in ALL_BACKENDS if case.values[0] == "cpu"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits(backend, bad):
    y, logits = good()
    logits[1, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.branch(y, logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.sample_branches(logits, 1.0, backend=backend)


@pytest.mark.parametrize("backend", [case.values[1] for case in ALL_BACKENDS if case.values[0] == "cpu"])
def test_bad_parents(backend):
    _, logits = good()
    a, b = torch.randn(4, 5), torch.randn(4, 6)
    with pytest.raises(ValueError, match="share one shape"):
        ops.branch([a, b, a], logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.branch([a, a.double(), a], logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="empty sequence"):
        ops.branch([], logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="not a tensor"):
        ops.branch([a, "b", a], logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="float"):
        ops.branch(torch.ones(3, 4, dtype=torch.int32), logits, 1.0, backend=backend)
    with pytest.raises(ValueError, match="I >= 1"):
        ops.branch(torch.ones(0, 4), logits[:0], 1.0, backend=backend)


@pytest.mark.parametrize("backend", [case.values[1] for case in ALL_BACKENDS if case.values[0] == "cpu"])
def test_bad_noise_and_generator(backend):
    y, logits = good()
    with pytest.raises(ValueError, match="noise shape"):
        ops.branch(y, logits, 1.0, noise=torch.randn(2, 3), backend=backend)
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.branch(y, logits, 1.0, noise=torch.full((3, 2), math.nan), backend=backend)
    with pytest.raises(ValueError, match="generator"):
        ops.branch(y, logits, 1.0, generator=123, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    y, logits = good()
    with pytest.raises(ValueError, match="device"):
        ops.branch(y, logits.cuda(), 1.0)
    with pytest.raises(ValueError, match="share one device"):
        ops.branch([y[0], y[1].cuda()], logits, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_non_finite_logits_cuda_async_check():
    """On CUDA the check is a device-side assert: it fires without a host sync, at the next sync point."""
    import subprocess
    import sys

    script = (
        "import torch, l2b_fast\n"
        "logits = torch.randn(3, 2, device='cuda'); logits[0, 0] = float('nan')\n"
        "l2b_fast.ops.sample_branches(logits, 1.0)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    # The device-side assert prints its message from the GPU (stdout or stderr, by runtime version).
    assert "NaN or inf" in result.stdout + result.stderr or "device-side assert" in result.stderr


def test_cpp_op_checks_direct_callers():
    """torch.ops.l2b_fast itself rejects bad input with ValueError (C++ TORCH_CHECK_VALUE)."""
    from l2b_fast import _extension

    if not _extension.loaded():
        pytest.skip("compiled extension not loaded")
    logits, one = torch.randn(3, 2), torch.tensor(1.0)
    with pytest.raises(ValueError, match="tau"):
        torch.ops.l2b_fast.sample_branches(logits, torch.tensor(0.0), torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match="tau must be a one-element floating tensor"):
        torch.ops.l2b_fast.sample_branches(logits, torch.ones(2), torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match="tau"):
        torch.ops.l2b_fast.branch_backward(
            torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 2]), torch.rand(3, 2), torch.tensor(-1.0)
        )
    with pytest.raises(ValueError, match="exactly one"):
        torch.ops.l2b_fast.sample_branches(logits, one, None, None)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.l2b_fast.straight_through_branch(
            torch.randn(3, 4), logits, torch.tensor([0, 3]), torch.rand(3, 2), one
        )
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.l2b_fast.sample_branches(torch.full((3, 2), math.nan), one, None, torch.tensor([1]))
