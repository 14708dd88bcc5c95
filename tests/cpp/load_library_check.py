"""ctest: the CMake-built library loads with torch.ops.load_library and its CPU op runs.

Usage: python load_library_check.py PATH/TO/libl2b_fast_ops.so
"""

import sys

import torch

torch.ops.load_library(sys.argv[1])
parents = torch.randn(3, 4, 5)
logits = torch.randn(3, 6)
soft, index = torch.ops.l2b_fast.sample_branches(logits, 1.0, None, torch.tensor([7]))
out = torch.ops.l2b_fast.straight_through_branch(parents, logits, index, soft, 1.0)
assert torch.equal(out, parents[index]), "gather mismatch"
assert torch.allclose(soft.sum(0), torch.ones(6)), "soft columns must sum to 1"
print("load_library OK:", sys.argv[1])
