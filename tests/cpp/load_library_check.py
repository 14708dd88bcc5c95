"""ctest: the CMake-built library loads with torch.ops.load_library and its CPU op runs.

Usage: python load_library_check.py PATH/TO/libl2b_fast_ops.so
"""

import sys

import torch

torch.ops.load_library(sys.argv[1])
parents = torch.randn(3, 4, 5)
logits = torch.randn(3, 6)
tau = torch.tensor(1.0, dtype=torch.float64)  # the temperature is a tensor the kernels read
soft, index = torch.ops.l2b_fast.sample_branches(logits, tau, None, torch.tensor([7]))
out = torch.ops.l2b_fast.straight_through_branch(parents, logits, index, soft, tau)
assert torch.equal(out, parents[index]), "gather mismatch"
assert torch.allclose(soft.sum(0), torch.ones(6)), "soft columns must sum to 1"
print("load_library OK:", sys.argv[1])
