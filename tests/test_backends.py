"""Backend choice: explicit argument > L2B_BACKEND > best available > ref; fallbacks say so once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from l2b_fast import BackendUnavailableError, backends, ops


def test_explicit_unavailable_backend_raises():
    with pytest.raises(BackendUnavailableError, match="triton"):
        backends.select("triton", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.select("fortran", torch.device("cpu"))


def test_environment_variable_is_an_explicit_request(monkeypatch):
    monkeypatch.setenv("L2B_BACKEND", "ref")
    assert backends.select(None, torch.device("cpu")) == "ref"
    monkeypatch.setenv("L2B_BACKEND", "triton")
    if backends.unavailable_reason("triton", "meta") is not None:
        with pytest.raises(BackendUnavailableError, match="L2B_BACKEND=triton"):
            backends.select(None, torch.device("meta"))


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("L2B_BACKEND", "cpp")
    assert backends.select("ref", torch.device("cpu")) == "ref"


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpp" if backends.unavailable_reason("cpp", "cpu") is None else "ref"
    assert backends.select(None, torch.device("cpu")) == expected
    assert backends.select("auto", torch.device("cpu")) == expected


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment.pop("L2B_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=environment, timeout=300
    )


def test_without_extension_and_triton_the_package_works_and_says_so_once():
    """The package imports and computes with no compiled extension and no Triton, and warns once."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # make `import triton` fail as if not installed
        "import torch, l2b_fast\n"
        "from l2b_fast import ops\n"
        "y, logits = torch.randn(3, 4), torch.randn(3, 2, requires_grad=True)\n"
        "for _ in range(3):\n"
        "    out = ops.branch(y, logits, 1.0)\n"
        "    out.sum().backward()\n"
        "print('ok', tuple(out.shape), logits.grad is not None)\n"
    )
    result = run_python(code, L2B_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "ok (2, 4) True" in result.stdout
    assert result.stderr.count("FallbackWarning") == 1, result.stderr
    assert "using the 'ref' backend for cpu tensors" in result.stderr
    assert "L2B_DISABLE_EXTENSION" in result.stderr


def test_without_extension_cpp_request_raises_with_hint():
    code = "import torch, l2b_fast\nl2b_fast.ops.branch(torch.randn(2, 3), torch.randn(2, 2), 1.0, backend='cpp')\n"
    result = run_python(code, L2B_DISABLE_EXTENSION="1")
    assert result.returncode != 0
    assert "BackendUnavailableError" in result.stderr and "--no-build-isolation" in result.stderr


def test_available_lists_every_backend():
    table = backends.available("cpu")
    assert set(table) == {"ref", "cpp", "triton"}
    assert table["ref"] is None


def test_ops_run_under_every_available_cpu_backend():
    y, logits = torch.randn(3, 4), torch.randn(3, 5)
    for name, reason in backends.available("cpu").items():
        if reason is None:
            assert ops.branch(y, logits, 1.0, backend=name).shape == (5, 4)
