"""Triton kernels of l2b_fast (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1`` for testing).

- :mod:`l2b_fast.triton.sample_branches`: gumbel sampling of every child's parent in one launch.
- :mod:`l2b_fast.triton.branch`: the straight-through gather and its fused backward.
- :mod:`l2b_fast.triton.indexed_conv`: a 2-D convolution of J children reading the parents through the
  sampled index (implicit GEMM: forward, input and weight gradients), the grouped blocks' ``conv_backend="triton"``.
"""
