"""Branching operators and the index-reading convolution. Each is held to its pure-PyTorch reference (``*_ref``) by
the tests."""

# Registers the fake kernels and autograd of torch.ops.l2b_fast as soon as the package is imported (the
# compiled operators exist from then on), not on the cpp backend's first use: opcheck, torch.compile and
# direct calls of torch.ops.l2b_fast must not depend on which l2b_fast function ran first.
from l2b_fast.ops import _cpp  # noqa: F401
from l2b_fast.ops._ref import branch_ref, sample_branches_ref
from l2b_fast.ops.branching import branch, derive_seed, sample_branches
from l2b_fast.ops.indexed_conv import indexed_conv2d, indexed_conv2d_ref

__all__ = [
    "branch",
    "branch_ref",
    "derive_seed",
    "indexed_conv2d",
    "indexed_conv2d_ref",
    "sample_branches",
    "sample_branches_ref",
]
