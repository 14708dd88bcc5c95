"""Triton kernels of the straight-through branch: the forward gather and the fused backward.

Memory model (csrc/branch_checks.h ``parents_rows_dense``): each ``parents[i]`` is one dense block of
N = numel / I elements, parents outermost, whatever the layout inside the block (contiguous or
channels_last). The kernels therefore see parents as flat rows [I, N] and the children tensors
(``out`` of the gather, ``grad_out`` of the backward) as flat rows [J, N] with the same in-row layout.

Backward, two launches, no atomics (deterministic):

1. ``_branch_backward_partials_kernel``: one pass over parents and grad_out. Program p owns a contiguous
   chunk of elements (a loop over BLOCK_N tiles) and a block of BLOCK_I parents (all of them unless
   I * J is large); it writes grad_parents for its tile (segment sum of the children that sampled each
   parent, through the one-hot matrix) and the [BLOCK_I, J] partial dot products G over its chunk into
   ``partials[chunk]``.
2. ``_branch_backward_logits_kernel``: sums the partials over chunks in a fixed order (fp64) and
   applies the softmax backward ``soft * (G - sum_i soft * G) / tau``, as the CPU kernel does in double.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from l2b_fast.triton.sample_branches import (
    _device_guard,
    _interpreted,
    _next_pow2,
    _prev_pow2,
    _sm_count,
    _tau_pointer,
)


def _row_numel(parents: Tensor) -> int:
    return parents.numel() // parents.shape[0] if parents.shape[0] > 0 else 0


def _children_strides(parents: Tensor, children: int) -> tuple[int, ...]:
    """Strides of the [J, *S] children tensor: the parents' strides with row stride N (with one parent,
    parents.stride(0) is arbitrary; children rows must not overlap). Same as csrc/branch_checks.h."""
    return (_row_numel(parents), *parents.stride()[1:])


def _has_children_layout(t: Tensor, parents: Tensor) -> bool:
    """``t`` ([J, *S]) stores row j as the flat block [j * N, (j + 1) * N) in the parents' in-row order."""
    if t.dim() != parents.dim() or t.shape[1:] != parents.shape[1:]:
        return False
    for size, a, b in zip(parents.shape[1:], t.stride()[1:], parents.stride()[1:]):
        if size > 1 and a != b:
            return False
    return t.shape[0] <= 1 or t.stride(0) == _row_numel(parents)


# ---------------------------------------------------------------------------------------------------
# Forward: out[j] = parents[index[j]]
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _gather_children_kernel(parents_ptr, index_ptr, out_ptr, N, num_chunks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    child = pid // num_chunks
    chunk = pid % num_chunks
    parent = tl.load(index_ptr + child)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    values = tl.load(parents_ptr + parent * N + offs, mask=mask)
    tl.store(out_ptr + child.to(tl.int64) * N + offs, values, mask=mask)


def gather_children(parents: Tensor, index: Tensor) -> Tensor:
    """out [J, *S] with the parents' strides, out[j] = parents[index[j]] (a copy, bit-exact)."""
    children = index.shape[0]
    out = torch.empty_strided(
        (children, *parents.shape[1:]), _children_strides(parents, children), dtype=parents.dtype, device=parents.device
    )
    row = _row_numel(parents)
    if children == 0 or row == 0:
        return out
    index = index.contiguous()
    if _interpreted(parents.device):
        block = max(16, min(_next_pow2(row), 1 << 16))
    else:
        block = max(16, min(_next_pow2(row), 4096))
    num_chunks = triton.cdiv(row, block)
    with _device_guard(parents.device):
        _gather_children_kernel[(children * num_chunks,)](
            parents, index, out, row, num_chunks, BLOCK=block, num_warps=4 if block <= 1024 else 8
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _branch_backward_partials_kernel(
    grad_ptr,  # [J, N] flat rows, parents' dtype
    parents_ptr,  # [I, N] flat rows
    index_ptr,  # int64 [J]
    grad_parents_ptr,  # [I, N] flat rows, parents' dtype
    partials_ptr,  # [num_chunks, I, J], fp32 (fp64 for fp64 inputs)
    num_parents,
    J,
    N,
    num_i_blocks,
    # Trip count as a constexpr: Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4
    # (it converts a 1-element array with int()); on the GPU it costs one compile per (N, grid) pair.
    TILES_PER_PROGRAM: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WRITE_GRAD_PARENTS: tl.constexpr,
    COMPUTE_DOTS: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    # Parent blocks of one chunk are adjacent program ids: they run together and share grad_out in L2.
    i_block = pid % num_i_blocks
    chunk = pid // num_i_blocks

    rows_i = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    rows_j = tl.arange(0, BLOCK_J)
    i_ok = rows_i < num_parents
    j_ok = rows_j < J
    base_i = rows_i.to(tl.int64)[:, None] * N
    base_j = rows_j.to(tl.int64)[:, None] * N

    index = tl.load(index_ptr + rows_j, mask=j_ok, other=-1)
    # one_hot[i, j]: child j sampled parent i.
    one_hot = index[None, :] == rows_i.to(tl.int64)[:, None]

    # Per-lane partial products, reduced across lanes once after the loop (not on every tile).
    if ACC_F64:
        acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_N], dtype=tl.float32)

    start = chunk.to(tl.int64) * TILES_PER_PROGRAM * BLOCK_N
    # num_stages: the loads of the next tiles are issued while this one is used (the pipeliner skips a
    # loop without tl.dot unless asked).
    for t in tl.range(0, TILES_PER_PROGRAM, num_stages=NUM_STAGES):
        offs = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs < N
        mask_i = i_ok[:, None] & n_ok[None, :]
        mask_j = j_ok[:, None] & n_ok[None, :]
        g = tl.load(grad_ptr + base_j + offs[None, :], mask=mask_j, other=0.0)
        if ACC_F64:
            g = g.to(tl.float64)
        else:
            g = g.to(tl.float32)
        # grad_parents[i] = sum of the grad_out rows of the children that sampled parent i (a select,
        # not a multiply, so an inf/NaN in one child's gradient stays in its own parent).
        if WRITE_GRAD_PARENTS:
            seg = tl.sum(tl.where(one_hot[:, :, None], g[None, :, :], 0.0), axis=1)
            tl.store(grad_parents_ptr + base_i + offs[None, :], seg.to(grad_parents_ptr.dtype.element_ty), mask=mask_i)
        if COMPUTE_DOTS:
            # G[i, j] += <grad_out[j], parents[i]> over this tile, for every pair (parents are read only here).
            y = tl.load(parents_ptr + base_i + offs[None, :], mask=mask_i, other=0.0)
            if ACC_F64:
                y = y.to(tl.float64)
            else:
                y = y.to(tl.float32)
            acc += y[:, None, :] * g[None, :, :]

    if COMPUTE_DOTS:
        out = partials_ptr + chunk.to(tl.int64) * num_parents * J + rows_i[:, None] * J + rows_j[None, :]
        tl.store(out, tl.sum(acc, axis=2), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _branch_backward_logits_kernel(
    partials_ptr,  # [num_chunks, I, J]
    soft_ptr,
    grad_logits_ptr,  # [I, J] contiguous, soft's dtype
    num_parents,
    J,
    stride_si,
    stride_sj,
    tau_ptr,  # one float64
    NUM_CHUNKS: tl.constexpr,  # constexpr: see TILES_PER_PROGRAM above
    OUT_F64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_I)
    cols = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (rows < num_parents)[:, None] & (cols < J)[None, :]
    pair = rows[:, None] * J + cols[None, :]

    G = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float64)
    ptrs = partials_ptr + pair
    for _ in range(0, NUM_CHUNKS):  # fixed order: deterministic
        G += tl.load(ptrs, mask=mask, other=0.0).to(tl.float64)
        ptrs += num_parents * J

    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    soft = tl.load(soft_ptr + r * stride_si + c * stride_sj, mask=mask, other=0.0).to(tl.float64)
    centre = tl.sum(soft * G, axis=0)
    tau = tl.load(tau_ptr)
    grad = soft * (G - centre[None, :]) / tau
    if OUT_F64:
        out = grad
    else:
        # fp64 -> fp32 -> out: fp64 -> bf16/fp16 conversions are not lowered on every GPU.
        out = grad.to(tl.float32).to(grad_logits_ptr.dtype.element_ty)
    tl.store(grad_logits_ptr + r * J + c, out, mask=mask)


# Pipeline depth of the partials kernel's tile loop (loads of the next tiles in flight).
_NUM_STAGES = 3
_NUM_WARPS = 4
# Bytes of the [BLOCK_I, BLOCK_J, BLOCK_N] accumulator per program (registers for the whole loop).
_ACCUMULATOR_BYTES = 1 << 14


def _partials_config(
    num_parents: int,
    children: int,
    row: int,
    acc_bytes: int,
    interpreted: bool,
    sm_count: int,
    block_n=None,
    block_i=None,
    num_chunks=None,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_I, BLOCK_N, num_i_blocks, num_chunks, tiles_per_program) of the partials kernel."""
    block_j = max(2, _next_pow2(children))
    block_i_all = max(2, _next_pow2(num_parents))
    if interpreted:
        tile, n_min, n_max, programs = 1 << 18, 16, 1 << 14, 1
    else:
        # The [BLOCK_I, BLOCK_J, BLOCK_N] accumulator lives in registers for the whole loop: 4096 fp32
        # (2048 fp64) elements are 16 registers per thread at 8 warps, which leaves room for the
        # pipelined tiles and 4 programs per SM (tools/triton_aot_report.py prints the counts).
        tile, n_min, n_max, programs = _ACCUMULATOR_BYTES // acc_bytes, 32, 512, 4 * sm_count
    if block_n is None:
        block_n = max(n_min, min(n_max, _prev_pow2(max(1, tile // (block_i_all * block_j)))))
        block_n = min(block_n, max(n_min, _next_pow2(row)))
    if block_i is None:
        block_i = max(2, min(block_i_all, _prev_pow2(max(1, tile // (block_j * block_n)))))
    num_i_blocks = triton.cdiv(num_parents, block_i)
    tiles = triton.cdiv(row, block_n)
    if num_chunks is None:
        num_chunks = max(1, programs // num_i_blocks)
    num_chunks = max(1, min(tiles, num_chunks))
    tiles_per_program = triton.cdiv(tiles, num_chunks)
    num_chunks = triton.cdiv(tiles, tiles_per_program)
    return block_i, block_n, num_i_blocks, num_chunks, tiles_per_program


def branch_backward(
    grad_out: Tensor,
    parents: Tensor,
    index: Tensor,
    soft: Tensor,
    tau: Tensor,
    *,
    need_grad_parents: bool = True,
    need_grad_logits: bool = True,
    _block_n: int | None = None,
    _block_i: int | None = None,
    _num_chunks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused straight-through backward (csrc/ops.cpp ``branch_backward``).

    grad_parents[i] = sum over j with index[j] == i of grad_out[j] (parents' shape, strides, dtype);
    G[i, j] = <grad_out[j], parents[i]> for every pair (fp32 accumulation, fp64 for fp64 inputs);
    grad_logits = soft * (G - sum_i soft * G) / tau in soft's dtype ([I, J], contiguous). An output whose
    ``need_*`` flag is False is neither computed nor written and comes back empty (shape [0]).

    ``grad_out`` is expected in the children layout (``parents``' strides with J rows, parents' dtype);
    anything else is copied into it first. The underscored arguments override the launch
    configuration (tests).
    """
    num_parents, children = parents.shape[0], index.shape[0]
    device = parents.device
    row = _row_numel(parents)
    tau_arg = _tau_pointer(tau, device)
    grad_parents = torch.empty_like(parents) if need_grad_parents else parents.new_empty((0,))
    grad_logits = soft.new_empty((num_parents, children) if need_grad_logits else (0,))
    if children == 0 or row == 0:
        return grad_parents.zero_(), grad_logits.zero_()
    if not (need_grad_parents or need_grad_logits):
        return grad_parents, grad_logits
    if grad_out.dtype != parents.dtype or not _has_children_layout(grad_out, parents):
        grad_out = torch.empty_strided(
            grad_out.shape, _children_strides(parents, children), dtype=parents.dtype, device=device
        ).copy_(grad_out)
    index = index.contiguous()

    acc_f64 = parents.dtype == torch.float64
    block_j = max(2, _next_pow2(children))
    acc_dtype = torch.float64 if acc_f64 else torch.float32
    block_i, block_n, num_i_blocks, num_chunks, tiles_per_program = _partials_config(
        num_parents,
        children,
        row,
        acc_dtype.itemsize,
        _interpreted(device),
        _sm_count(device),
        _block_n,
        _block_i,
        _num_chunks,
    )
    partials = torch.empty(
        (num_chunks, num_parents, children) if need_grad_logits else (0,), dtype=acc_dtype, device=device
    )

    block_i2 = max(2, _next_pow2(num_parents))
    budget = 1 << 16 if _interpreted(device) else 2048
    block_j2 = max(2, min(block_j, _prev_pow2(max(1, budget // block_i2))))
    with _device_guard(device):
        _branch_backward_partials_kernel[(num_i_blocks * num_chunks,)](
            grad_out,
            parents,
            index,
            grad_parents if need_grad_parents else parents,  # not written without the flag
            partials if need_grad_logits else parents,
            num_parents,
            children,
            row,
            num_i_blocks,
            TILES_PER_PROGRAM=tiles_per_program,
            NUM_STAGES=_NUM_STAGES,
            WRITE_GRAD_PARENTS=need_grad_parents,
            COMPUTE_DOTS=need_grad_logits,
            ACC_F64=acc_f64,
            BLOCK_I=block_i,
            BLOCK_J=block_j,
            BLOCK_N=block_n,
            num_warps=_NUM_WARPS,
        )
        if need_grad_logits:
            _branch_backward_logits_kernel[(triton.cdiv(children, block_j2),)](
                partials,
                soft,
                grad_logits,
                num_parents,
                children,
                soft.stride(0),
                soft.stride(1),
                tau_arg,
                NUM_CHUNKS=num_chunks,
                OUT_F64=soft.dtype == torch.float64,
                BLOCK_I=block_i2,
                BLOCK_J=block_j2,
                num_warps=4,
            )
    return grad_parents, grad_logits
