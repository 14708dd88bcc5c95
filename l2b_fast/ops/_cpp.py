"""The ``cpp`` backend: ``torch.ops.l2b_fast`` (C++ CPU kernels, CUDA kernels where built)."""

from __future__ import annotations

from l2b_fast import _extension
from l2b_fast.ops import _registration

BACKEND = None
if _extension.loaded():
    _registration.register("l2b_fast")
    BACKEND = _registration.CustomOpBackend("l2b_fast")
