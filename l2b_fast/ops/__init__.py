"""Branching operators. Each backend is held to the pure-PyTorch reference (``*_ref``) by the tests."""

from l2b_fast.ops._ref import branch_ref, sample_branches_ref
from l2b_fast.ops.branching import branch, derive_seed, sample_branches

__all__ = ["branch", "branch_ref", "derive_seed", "sample_branches", "sample_branches_ref"]
