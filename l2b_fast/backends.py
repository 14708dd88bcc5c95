"""Which implementation runs an op: explicit ``backend=`` > ``L2B_BACKEND`` > best available > ``ref``.

Backends:

- ``ref``: the obviously-correct pure-PyTorch formula (gumbel-softmax weights over all parents); the oracle.
- ``cpp``: the compiled C++ CPU kernels and CUDA kernels (``torch.ops.l2b_fast``).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for testing).

A backend asked for explicitly (argument or environment variable) that cannot run on the tensors'
device raises :class:`BackendUnavailableError`; the automatic choice falls back and says so once.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from l2b_fast import _extension

BACKENDS = ("ref", "cpp", "triton")
ENV_VAR = "L2B_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


class FallbackWarning(UserWarning):
    """The automatic backend choice had to fall back to a slower implementation."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why ``name`` cannot run on ``device_type`` tensors, or None when it can."""
    if name == "ref":
        return None
    if name == "cpp":
        if not _extension.loaded():
            return f"the compiled extension is not loaded ({_extension.LOAD_ERROR}); {_extension.INSTALL_HINT}"
        if not _extension.has_kernel(device_type):
            return f"the compiled extension has no {device_type} kernels (built without CUDA?)"
        return None
    if name == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed (pip install 'triton>=3.6')"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreting():
            return None
        return f"triton runs on cuda tensors (and on cpu only with TRITON_INTERPRET=1), not {device_type}"
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def _preference(device_type: str) -> tuple[str, ...]:
    # The Triton interpreter is for testing only: never picked automatically on CPU.
    return ("cpp", "triton", "ref") if device_type == "cuda" else ("cpp", "ref")


_warned: set[str] = set()


def select(backend: str | None, device: torch.device) -> str:
    """Name of the backend that runs an op on ``device`` tensors."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower() or "auto"
    if requested != "auto":
        reason = unavailable_reason(requested, device.type)
        if reason is not None:
            source = "backend argument" if backend is not None else f"{ENV_VAR}={requested}"
            raise BackendUnavailableError(f"l2b_fast: backend {requested!r} ({source}) is unavailable: {reason}")
        return requested
    preference = _preference(device.type)
    for name in preference:
        if unavailable_reason(name, device.type) is None:
            break
    if name != preference[0] and device.type not in _warned and not torch.compiler.is_compiling():
        _warned.add(device.type)
        warnings.warn(
            f"l2b_fast: using the {name!r} backend for {device.type} tensors because "
            f"{preference[0]!r} is unavailable: {unavailable_reason(preference[0], device.type)}",
            FallbackWarning,
            stacklevel=3,
        )
    return name


def available(device_type: str = "cpu") -> dict[str, str | None]:
    """Every backend with None when it runs on ``device_type`` tensors, else the reason it cannot."""
    return {name: unavailable_reason(name, device_type) for name in BACKENDS}
