"""Guarded load of the compiled extension (``l2b_fast._C``).

Importing ``_C`` registers the ``torch.ops.l2b_fast`` operators (C++ CPU kernels, plus CUDA kernels when
it was built against CUDA PyTorch). Without it the package still works through the ``ref`` and
``triton`` backends; ``L2B_DISABLE_EXTENSION=1`` skips loading it on purpose (to test that path).
"""

from __future__ import annotations

import os

import torch

INSTALL_HINT = (
    "build it with `pip install --no-build-isolation -e .` (see README: Install), "
    "or run `make test`, which does so in a virtual environment"
)

LOAD_ERROR: str | None = None
if os.environ.get("L2B_DISABLE_EXTENSION", "") not in ("", "0"):
    LOAD_ERROR = "disabled by L2B_DISABLE_EXTENSION"
else:
    try:
        from l2b_fast import _C  # noqa: F401  (loading registers the operators)
    except ImportError as error:  # not built, or built against another torch
        LOAD_ERROR = f"{type(error).__name__}: {error}"


def loaded() -> bool:
    """True when the compiled operators are registered in this process."""
    return LOAD_ERROR is None


def _kernel_device_types() -> frozenset[str]:
    if not loaded():
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        device_type
        for device_type, key in keys.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key("l2b_fast::branch_backward", key)
    )


# Fixed once loaded; a plain constant keeps backend selection traceable by torch.compile.
KERNEL_DEVICE_TYPES = _kernel_device_types()


def has_kernel(device_type: str) -> bool:
    """True when the compiled extension has kernels for ``device_type`` ("cpu" or "cuda")."""
    return device_type in KERNEL_DEVICE_TYPES
