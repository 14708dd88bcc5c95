"""Triton implicit-GEMM 2-D convolution of J children, child j reading parent ``index[j]`` in place.

The grouped execution's cuDNN path gathers a ``[J, *S]`` copy of the parents, re-stacks it in channels
and runs one ``groups=J`` convolution. These kernels skip both copies: every program loads its child's
parent through the device-side ``index`` (no host read, so CUDA graphs and ``torch.compile`` keep
working) and gathers the convolution window straight from it (implicit GEMM: the im2col matrix is never
written).

Shapes: ``parents [I, B, C, H, W]`` (any strides: contiguous and channels_last parents are read in
place), ``index`` int64 ``[J]``, ``weight [J, Co, C, KH, KW]``, ``bias [J, Co]``; zero padding, any
stride, dilation and kernel size, one group per child. Three kernels, one launcher each:

- forward: ``out [B, J*Co, Ho, Wo]``, the channel-stacked layout of the grouped path (child j's channels
  at ``[j*Co, (j+1)*Co)``). GEMM per child: M = B*Ho*Wo output pixels, N = Co, K = C*KH*KW.
- input gradient: ``grad_children [J, B, C, H, W]``, the gradient of each child's (virtual) gathered
  input; the transposed convolution as an implicit GEMM over M = B*H*W input pixels, N = C,
  K = Co*KH*KW, where a (pixel, tap) pair that no output position reaches (stride > 1, borders) is masked.
  The straight-through backward rides on it: the child-major kernel can add the logits' dot products
  ``G[i, j] = <dX_j, parents[i]>`` in its epilogue (fp32 per-tile partials ``[tiles, I, J]``, summed in tile
  order) and skip writing dX; a parent-major variant sums, per parent, the transposed convolutions of the
  children that sampled it (the index compared on the device) and writes ``grad_parents`` directly.
- weight gradient: ``[J, Co, C, KH, KW]``, GEMM over the output pixels, split into chunks written to
  fp32 partials that are summed in a fixed order (deterministic, no atomics), reading the parents
  through the index again.

Accumulation is fp32; fp16/bf16/fp32 inputs. fp32 products use TF32 where PyTorch lets cuDNN convolutions
use it (``torch.backends.cudnn.allow_tf32``, on by default), else IEEE fp32 (a float32 reference's precision).

Compiles: one per layer shape and dtype (kernel size, stride, padding, the K loop's trip count and the tiles are
constexprs). The batch size, the parents' and children's strides that scale with it and the weight gradient's
split size are runtime values Triton does not specialise on, so another batch size (a short last batch) reuses
the compiled kernels; :func:`compile_report` counts and times the compiles. In the interpreter the split loop's
bound is passed as a constexpr: Triton 3.6's interpreter cannot take a runtime loop bound with numpy >= 2.4.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from l2b_fast.triton.sample_branches import _device_guard, _interpreted, _next_pow2, _sm_count

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Stride, zero padding and dilation of a 2-D convolution, (height, width) each."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def output_size(self, height: int, width: int, kernel: tuple[int, int]) -> tuple[int, int]:
        return tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // st + 1
            for size, pad, dil, k, st in zip((height, width), self.padding, self.dilation, kernel, self.stride)
        )


def _upcast(dtype: torch.dtype, interpreted: bool) -> bool:
    # Triton's interpreter multiplies bf16 tiles wrongly in tl.dot (numpy has no bf16): give it fp32 tiles.
    return interpreted and dtype == torch.bfloat16


def cudnn_conv_allows_tf32() -> bool:
    """Whether PyTorch lets cuDNN convolutions use TF32 for fp32 inputs (the default), the rule the Triton
    convolution follows as the cuDNN path's replacement: ``torch.backends.cudnn.allow_tf32``, read through the
    newer ``fp32_precision`` settings where PyTorch has them (conv's, else cuDNN's, else the global one; reading
    ``allow_tf32`` raises once those set cuDNN's conv and RNN precisions differently)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":  # "none": inherit from the enclosing setting
            return precision == "tf32"
    return False


def _dot_precision(dtype: torch.dtype, interpreted: bool) -> str:
    """tl.dot's input_precision. fp32: TF32 tensor cores where cuDNN may use them (see
    :func:`cudnn_conv_allows_tf32`), else IEEE fp32 (matches a float32 reference to ~1e-6; TF32 is ~1e-3 off).
    The interpreter (numpy) and its fp32 tiles of bf16 inputs compute in IEEE. fp16/bf16 on the GPU: ignored,
    their products are exact in the fp32 accumulator."""
    if _upcast(dtype, interpreted) or (dtype == torch.float32 and (interpreted or not cudnn_conv_allows_tf32())):
        return "ieee"
    return "tf32"


@triton.jit
def _child_fastest(J, num_inner):
    """(outer tile, inner tile, child) of a 1-D grid in which the child varies fastest: the J programs of
    one tile run side by side, so children that sampled the same parent (and, in the epilogue, every
    parent's tile) find its data in L2 instead of reading it once per child; a 1-D grid also has no
    65535 limit on the tile count."""
    pid = tl.program_id(0)
    child = pid % J
    tile = pid // J
    return tile // num_inner, tile % num_inner, child


# ---------------------------------------------------------------------------------------------------
# Forward: out[b, j*Co + n, oh, ow] = bias[j, n] + sum_{c, r, s} parents[index[j], b, c, ih, iw] * w[j, n, c, r, s]
# ---------------------------------------------------------------------------------------------------


# Per kernel, the runtime ints Triton must not specialise on (value 1, divisibility by 16): the batch size, the
# strides that scale with it (one parent or child block apart) and the weight gradient's split size, all of which
# change with the batch; specialising on them would compile every kernel again for a short last batch.
NOT_SPECIALISED = {
    "_indexed_conv_forward_kernel": ("B", "sx_i"),
    "_indexed_conv_input_grad_kernel": ("B", "sd_j", "sx_i"),
    "_indexed_conv_parent_grad_kernel": ("B", "sp_i"),
    "_indexed_conv_weight_grad_kernel": ("B", "sx_i", "m_tiles_per_split"),
}


@triton.jit(do_not_specialize=NOT_SPECIALISED["_indexed_conv_forward_kernel"])
def _indexed_conv_forward_kernel(
    x_ptr, index_ptr, w_ptr, bias_ptr, out_ptr,
    B, C, H, W, Co, Ho, Wo, J, num_n,
    sx_i, sx_b, sx_c, sx_h, sx_w,
    sw_j, sw_o, sw_c, sw_h, sw_w,
    sb_j, sb_o,
    so_b, so_c, so_h, so_w,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    K_TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, child = _child_fastest(J, num_n)
    parent = tl.load(index_ptr + child)  # int64: the parent's offset cannot overflow
    x_parent = x_ptr + parent * sx_i

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * Ho * Wo
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    b = offs_m // (Wo * Ho)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_parent + b.to(tl.int64)[:, None] * sx_b

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Co
    w_cols = w_ptr + child.to(tl.int64) * sw_j + offs_n[None, :] * sw_o

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(K_TILES):
        # K = (c, r, s) flattened, the weight's own order: a 3-channel first layer fills K with its taps.
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C * KH * KW
        c = offs_k // (KH * KW)
        r = (offs_k // KW) % KH
        s = offs_k % KW
        ih = ih0[:, None] + (r * DH)[None, :]
        iw = iw0[:, None] + (s * DW)[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_rows + c[None, :] * sx_c + ih * sx_h + iw * sx_w, mask=a_ok, other=0.0)
        w = tl.load(w_cols + (c * sw_c + r * sw_h + s * sw_w)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        # the bias's own strides: a [J, Co] view of a transposed [Co, J] tensor is read as it lies
        acc += tl.load(bias_ptr + child * sb_j + offs_n * sb_o, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = (
        out_ptr + b.to(tl.int64)[:, None] * so_b + (child * Co + offs_n)[None, :] * so_c
        + (oh * so_h + ow * so_w)[:, None]
    )  # fmt: skip
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Input gradient: grad_children[j, b, c, ih, iw] = sum_{n, r, s} grad_out[b, j*Co + n, oh, ow] * w[j, n, c, r, s]
# over the (oh, ow) with oh * SH - PH + r * DH = ih (and the same for the width)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _transposed_conv_tile(
    acc, g_ptr, w_ptr, child, b, ih, iw, m_ok, offs_n, n_ok,
    Co, Ho, Wo,
    sg_b, sg_c, sg_h, sg_w,
    sw_j, sw_o, sw_c, sw_h, sw_w,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    K_TILES: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc`` plus child ``child``'s input gradient at the pixels (b, ih, iw) and channels offs_n."""
    child = tl.cast(child, tl.int64)  # tl.cast: a loop counter is a Python int in the interpreter
    g_rows = g_ptr + b.to(tl.int64)[:, None] * sg_b + child * Co * sg_c
    w_cols = w_ptr + child * sw_j + offs_n[None, :] * sw_c
    for t in range(K_TILES):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)  # K = (output channel, r, s)
        k_ok = offs_k < Co * KH * KW
        o = offs_k // (KH * KW)
        r = (offs_k // KW) % KH
        s = offs_k % KW
        h_num = ih[:, None] + PH - (r * DH)[None, :]  # = oh * SH where an output position reads ih
        w_num = iw[:, None] + PW - (s * DW)[None, :]
        # Negative numerators are masked first: // and % round differently there on GPU and interpreter.
        h_ok = (h_num >= 0) & (h_num % SH == 0) & (h_num // SH < Ho)
        w_ok = (w_num >= 0) & (w_num % SW == 0) & (w_num // SW < Wo)
        oh = tl.where(h_ok, h_num // SH, 0)
        ow = tl.where(w_ok, w_num // SW, 0)
        a_ok = m_ok[:, None] & k_ok[None, :] & h_ok & w_ok
        a = tl.load(g_rows + o[None, :] * sg_c + oh * sg_h + ow * sg_w, mask=a_ok, other=0.0)
        w = tl.load(w_cols + (o * sw_o + r * sw_h + s * sw_w)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=NOT_SPECIALISED["_indexed_conv_input_grad_kernel"])
def _indexed_conv_input_grad_kernel(
    g_ptr, w_ptr, dx_ptr, x_ptr, dots_ptr,
    B, C, H, W, Co, Ho, Wo, J, num_n,
    sg_b, sg_c, sg_h, sg_w,
    sw_j, sw_o, sw_c, sw_h, sw_w,
    sd_j, sd_b, sd_c, sd_h, sd_w,
    sx_i, sx_b, sx_c, sx_h, sx_w,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    K_TILES: tl.constexpr,
    WRITE_DX: tl.constexpr,
    NUM_PARENTS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Child-major: program (pixel tile, channel tile, child j) computes its tile of dX_j; writes it
    (WRITE_DX) and, with NUM_PARENTS > 0, the tile's share of G[i, j] = <dX_j, parents[i]> for every
    parent to ``dots[tile, i, j]`` (fp32, summed over tiles afterwards in a fixed order)."""
    pid_m, pid_n, child = _child_fastest(J, num_n)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * H * W
    iw = offs_m % W
    ih = (offs_m // W) % H
    b = offs_m // (W * H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < C

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _transposed_conv_tile(
        acc, g_ptr, w_ptr, child, b, ih, iw, m_ok, offs_n, n_ok, Co, Ho, Wo,
        sg_b, sg_c, sg_h, sg_w, sw_j, sw_o, sw_c, sw_h, sw_w,
        SH, SW, PH, PW, DH, DW, KH, KW, K_TILES, PRECISION, UPCAST, BLOCK_K,
    )  # fmt: skip

    if WRITE_DX:
        dx = (
            dx_ptr + child.to(tl.int64) * sd_j + b.to(tl.int64)[:, None] * sd_b + offs_n[None, :] * sd_c
            + (ih * sd_h + iw * sd_w)[:, None]
        )  # fmt: skip
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if NUM_PARENTS > 0:
        # The epilogue of the logits' gradient: the fp32 tile just computed times the same tile of every
        # parent (I <= a few dozen), instead of a second pass that reads dX and the parents again.
        tile_ok = m_ok[:, None] & n_ok[None, :]
        x_tile = x_ptr + b.to(tl.int64)[:, None] * sx_b + offs_n[None, :] * sx_c + (ih * sx_h + iw * sx_w)[:, None]
        dots = dots_ptr + ((pid_m * num_n + pid_n).to(tl.int64) * NUM_PARENTS) * J + child
        for _ in range(NUM_PARENTS):
            x = tl.load(x_tile, mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(dots, tl.sum(tl.sum(acc * x, axis=1), axis=0))
            x_tile += sx_i
            dots += J


@triton.jit(do_not_specialize=NOT_SPECIALISED["_indexed_conv_parent_grad_kernel"])
def _indexed_conv_parent_grad_kernel(
    g_ptr, w_ptr, index_ptr, dp_ptr,
    B, C, H, W, Co, Ho, Wo,
    sg_b, sg_c, sg_h, sg_w,
    sw_j, sw_o, sw_c, sw_h, sw_w,
    sp_i, sp_b, sp_c, sp_h, sp_w,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    K_TILES: tl.constexpr,
    NUM_CHILDREN: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Parent-major: program (pixel tile, channel tile, parent i) sums the transposed convolutions of the
    children with index[j] == i (read on the device, in child order: deterministic) in one fp32
    accumulator and writes grad_parents[i]: no per-child dX, no segment-sum pass; unpicked parents get 0."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    parent = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < B * H * W
    iw = offs_m % W
    ih = (offs_m // W) % H
    b = offs_m // (W * H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for child in range(NUM_CHILDREN):
        if tl.load(index_ptr + child) == parent:
            acc = _transposed_conv_tile(
                acc, g_ptr, w_ptr, child, b, ih, iw, m_ok, offs_n, n_ok, Co, Ho, Wo,
                sg_b, sg_c, sg_h, sg_w, sw_j, sw_o, sw_c, sw_h, sw_w,
                SH, SW, PH, PW, DH, DW, KH, KW, K_TILES, PRECISION, UPCAST, BLOCK_K,
            )  # fmt: skip
    dp = (
        dp_ptr + parent.to(tl.int64) * sp_i + b.to(tl.int64)[:, None] * sp_b + offs_n[None, :] * sp_c
        + (ih * sp_h + iw * sp_w)[:, None]
    )  # fmt: skip
    tl.store(dp, acc.to(dp_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Weight gradient:
#   grad_w[j, n, c, r, s] = sum_{b, oh, ow} grad_out[b, j*Co + n, oh, ow] * parents[index[j], b, c, ih, iw]
# ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=NOT_SPECIALISED["_indexed_conv_weight_grad_kernel"])
def _indexed_conv_weight_grad_kernel(
    g_ptr, x_ptr, index_ptr, partials_ptr,
    B, C, H, W, Co, Ho, Wo, J,
    sg_b, sg_c, sg_h, sg_w,
    sx_i, sx_b, sx_c, sx_h, sx_w,
    num_k_blocks, num_nk,
    m_tiles_per_split,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    split, pid_nk, child = _child_fastest(J, num_nk)
    pid_n = pid_nk // num_k_blocks
    pid_k = pid_nk % num_k_blocks
    parent = tl.load(index_ptr + child)
    x_parent = x_ptr + parent * sx_i

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    n_ok = offs_n < Co
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (c, r, s)
    k_ok = offs_k < C * KH * KW
    c = offs_k // (KH * KW)
    r = (offs_k // KW) % KH
    s = offs_k % KW
    g_cols = g_ptr + (child.to(tl.int64) * Co + offs_n)[:, None] * sg_c

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for t in range(m_tiles_per_split):
        offs_m = (split * m_tiles_per_split + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < B * Ho * Wo
        ow = offs_m % Wo
        oh = (offs_m // Wo) % Ho
        b = offs_m // (Wo * Ho)
        g = tl.load(
            g_cols + (b.to(tl.int64) * sg_b + oh * sg_h + ow * sg_w)[None, :],
            mask=n_ok[:, None] & m_ok[None, :], other=0.0,
        )  # fmt: skip
        ih = (oh * SH - PH)[:, None] + (r * DH)[None, :]
        iw = (ow * SW - PW)[:, None] + (s * DW)[None, :]
        x_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(
            x_parent + b.to(tl.int64)[:, None] * sx_b + c[None, :] * sx_c + ih * sx_h + iw * sx_w,
            mask=x_ok, other=0.0,
        )  # fmt: skip
        if UPCAST:
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)

    k_total = C * KH * KW
    out = partials_ptr + ((split * J + child).to(tl.int64) * Co + offs_n[:, None]) * k_total + offs_k[None, :]
    tl.store(out, acc, mask=n_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _blocks(rows: int, cols: int, depth: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM with ``rows`` x ``cols`` outputs and ``depth`` terms.

    tl.dot needs every block >= 16. The interpreter pays per program, so it takes few, large blocks. On the
    GPU the index arithmetic of the gathered [BLOCK_M, BLOCK_K] window costs the registers: compiled for
    sm_90 without a GPU (Triton 3.9, a 32-channel 3x3 layer), BLOCK_K = 32 took 232-255 registers per
    thread at 4 warps and spilled in fp32, BLOCK_K = 16 took 96 (bf16) / 124 (fp32) and no spills. Not
    tuned on a GPU: no GPU has run these kernels yet."""
    if interpreted:
        return (
            max(16, min(_next_pow2(rows), 256)),
            max(16, min(_next_pow2(cols), 64)),
            max(16, min(_next_pow2(depth), 64)),
        )
    return 64, max(16, min(_next_pow2(cols), 64)), 16


def _num_warps(interpreted: bool, block_rows: int, block_cols: int) -> int:
    # 8 warps for 64 x 64 output tiles: at 4 the fp32 accumulator and the pipelined gathers reached 255
    # registers per thread and spilled (sm_90 compile, Triton 3.9).
    return 1 if interpreted else (8 if block_rows * block_cols >= 64 * 64 else 4)


def empty_output(parents: Tensor, weight_shape: torch.Size, geometry: Geometry) -> Tensor:
    """The forward's output ``[B, J*Co, Ho, Wo]``, channels_last where the parents are (per parent, C > 1),
    as the cudnn path's output is (also the operator's fake kernel)."""
    _, batch, channels, height, width = parents.shape
    children, out_channels, _, kh, kw = weight_shape
    channels_last = channels > 1 and parents[0].is_contiguous(memory_format=torch.channels_last)
    return torch.empty(
        (batch, children * out_channels, *geometry.output_size(height, width, (kh, kw))), dtype=parents.dtype,
        device=parents.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )  # fmt: skip


def conv_forward(parents: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, geometry: Geometry) -> Tensor:
    """``out [B, J*Co, Ho, Wo]``: child j's convolution of ``parents[index[j]]`` in channels ``[j*Co, (j+1)*Co)``.

    The output is channels_last where the parents are (per parent, C > 1), as the cuDNN path gives."""
    _, batch, channels, height, width = parents.shape
    children, out_channels, _, kh, kw = weight.shape
    out = empty_output(parents, weight.shape, geometry)
    out_h, out_w = out.shape[2:]
    if out.numel() == 0:
        return out
    interpreted = _interpreted(parents.device)
    rows, depth = batch * out_h * out_w, channels * kh * kw
    block_m, block_n, block_k = _blocks(rows, out_channels, depth, interpreted)
    num_n = triton.cdiv(out_channels, block_n)
    grid = (triton.cdiv(rows, block_m) * num_n * children,)
    with _device_guard(parents.device):
        _indexed_conv_forward_kernel[grid](
            parents, index, weight, bias if bias is not None else weight, out,
            batch, channels, height, width, out_channels, out_h, out_w, children, num_n,
            *parents.stride(), *weight.stride(), *(bias.stride() if bias is not None else (0, 0)), *out.stride(),
            *geometry.stride, *geometry.padding, *geometry.dilation, kh, kw,
            K_TILES=triton.cdiv(depth, block_k),
            HAS_BIAS=bias is not None,
            PRECISION=_dot_precision(parents.dtype, interpreted),
            UPCAST=_upcast(parents.dtype, interpreted),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=_num_warps(interpreted, block_m, block_n),
        )  # fmt: skip
    return out


def _input_grad_launch(grad_out: Tensor, weight: Tensor, parents: Tensor, geometry: Geometry):
    """(grid, launch arguments shared by both input-gradient kernels) over the parents' pixels and channels."""
    num_parents, batch, channels, height, width = parents.shape
    children, out_channels, _, kh, kw = weight.shape
    out_h, out_w = grad_out.shape[2:]
    interpreted = _interpreted(grad_out.device)
    rows, depth = batch * height * width, out_channels * kh * kw
    block_m, block_n, block_k = _blocks(rows, channels, depth, interpreted)
    tiles = (triton.cdiv(rows, block_m), triton.cdiv(channels, block_n))
    options = dict(
        K_TILES=triton.cdiv(depth, block_k),
        PRECISION=_dot_precision(grad_out.dtype, interpreted),
        UPCAST=_upcast(grad_out.dtype, interpreted),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=_num_warps(interpreted, block_m, block_n),
    )  # fmt: skip
    sizes = (batch, channels, height, width, out_channels, out_h, out_w)
    taps = (*geometry.stride, *geometry.padding, *geometry.dilation, kh, kw)
    return tiles, sizes, taps, options


def conv_input_grad(
    grad_out: Tensor, weight: Tensor, parents: Tensor, geometry: Geometry, children_strides: tuple[int, ...],
    *, dots: bool = False, write_children: bool = True,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Child-major input gradient: ``(grad_children, G)``.

    ``grad_children [J, B, C, H, W]`` (strides ``children_strides``, the parents' dtype; None unless
    ``write_children``): each child's gradient of its gathered input, the transposed convolution of its
    slice of ``grad_out``. ``G [I, J]`` float64 (None unless ``dots``): ``G[i, j] = <dX_j, parents[i]>``,
    computed in the kernel's epilogue from the fp32 tile of dX_j, per tile partials summed in tile order."""
    num_parents, batch, channels, height, width = parents.shape
    children = weight.shape[0]
    grad_children = None
    if write_children:
        grad_children = torch.empty_strided(
            (children, batch, channels, height, width), children_strides, dtype=parents.dtype, device=parents.device
        )  # fmt: skip
    if children * batch * channels * height * width == 0 or grad_out.numel() == 0:
        zeros = torch.zeros((num_parents, children), dtype=torch.float64, device=parents.device) if dots else None
        return (grad_children.zero_() if write_children else None), zeros
    tiles, sizes, taps, options = _input_grad_launch(grad_out, weight, parents, geometry)
    partials = torch.empty(
        (tiles[0] * tiles[1], num_parents, children) if dots else (0,), dtype=torch.float32, device=parents.device
    )
    unused = parents.new_empty((0,))  # a pointer argument the constexpr flags leave unread
    with _device_guard(grad_out.device):
        _indexed_conv_input_grad_kernel[(tiles[0] * tiles[1] * children,)](
            grad_out, weight, grad_children if write_children else unused, parents, partials,
            *sizes, children, tiles[1],
            *grad_out.stride(), *weight.stride(), *(grad_children.stride() if write_children else (0,) * 5),
            *parents.stride(),
            *taps,
            WRITE_DX=write_children,
            NUM_PARENTS=num_parents if dots else 0,
            **options,
        )  # fmt: skip
    return grad_children, (partials.sum(dim=0, dtype=torch.float64) if dots else None)


def conv_parents_grad(grad_out: Tensor, weight: Tensor, parents: Tensor, index: Tensor, geometry: Geometry) -> Tensor:
    """Parent-major input gradient: ``grad_parents`` (the parents' shape, strides and dtype), the sum over
    the children that sampled each parent of their transposed convolutions, without a per-child dX."""
    grad_parents = torch.empty_like(parents)
    if grad_parents.numel() == 0:
        return grad_parents
    if grad_out.numel() == 0 or weight.shape[0] == 0:
        return grad_parents.zero_()
    tiles, sizes, taps, options = _input_grad_launch(grad_out, weight, parents, geometry)
    if not _interpreted(grad_out.device):
        # The accumulator carried through the loop over children took 255 registers per thread and spilled
        # 64-72 bytes in fp32 at 4 warps for every tile size tried; 8 warps: 141-182, no spills (sm_90
        # compile without a GPU, Triton 3.9).
        options["num_warps"] = 8
    with _device_guard(grad_out.device):
        _indexed_conv_parent_grad_kernel[(*tiles, parents.shape[0])](
            grad_out, weight, index, grad_parents,
            *sizes,
            *grad_out.stride(), *weight.stride(), *grad_parents.stride(),
            *taps,
            NUM_CHILDREN=weight.shape[0],
            **options,
        )  # fmt: skip
    return grad_parents


def conv_weight_grad(
    grad_out: Tensor, parents: Tensor, index: Tensor, weight_shape: torch.Size, geometry: Geometry
) -> Tensor:
    """``grad_weight [J, Co, C, KH, KW]`` in fp32 (the caller casts): sum over the output pixels of
    ``grad_out`` times the window of ``parents[index[j]]``, split in chunks summed in a fixed order."""
    _, batch, channels, height, width = parents.shape
    children, out_channels, _, kh, kw = weight_shape
    out_h, out_w = grad_out.shape[2:]
    depth, rows = channels * kh * kw, batch * out_h * out_w
    if rows == 0 or grad_out.numel() == 0:
        return torch.zeros(tuple(weight_shape), dtype=torch.float32, device=parents.device)
    interpreted = _interpreted(parents.device)
    block_m, block_n, block_k = _blocks(rows, out_channels, depth, interpreted)
    if not interpreted:
        block_m = 32  # the reduction dim: smaller tiles, more of them, more splits to fill the GPU
    num_n, num_k, m_tiles = triton.cdiv(out_channels, block_n), triton.cdiv(depth, block_k), triton.cdiv(rows, block_m)
    # Few output tiles (a 3-channel first layer has 1-2 per child) and many pixels: split the pixels so
    # about four programs per SM run; the fp32 partials are summed afterwards in split order.
    target = 1 if interpreted else 4 * _sm_count(parents.device)
    splits = max(1, min(m_tiles, triton.cdiv(target, num_n * num_k * children)))
    tiles_per_split = triton.cdiv(m_tiles, splits)
    splits = triton.cdiv(m_tiles, tiles_per_split)
    partials = torch.empty((splits, children, out_channels, depth), dtype=torch.float32, device=parents.device)
    with _device_guard(parents.device):
        _indexed_conv_weight_grad_kernel[(num_n * num_k * splits * children,)](
            grad_out, parents, index, partials,
            batch, channels, height, width, out_channels, out_h, out_w, children,
            *grad_out.stride(), *parents.stride(),
            num_k, num_n * num_k,
            # a runtime value on the GPU (it changes with the batch size); Triton 3.6's interpreter needs a constexpr
            tl.constexpr(tiles_per_split) if interpreted else tiles_per_split,
            *geometry.stride, *geometry.padding, *geometry.dilation, kh, kw,
            PRECISION=_dot_precision(parents.dtype, interpreted),
            UPCAST=_upcast(parents.dtype, interpreted),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=_num_warps(interpreted, block_m, block_n),
        )  # fmt: skip
    grad_weight = partials[0] if splits == 1 else partials.sum(dim=0)
    return grad_weight.view(tuple(weight_shape))


# ---------------------------------------------------------------------------------------------------
# Compile report
# ---------------------------------------------------------------------------------------------------

KERNELS = (
    _indexed_conv_forward_kernel, _indexed_conv_input_grad_kernel, _indexed_conv_parent_grad_kernel,
    _indexed_conv_weight_grad_kernel,
)  # fmt: skip


def _kernel_name(kernel) -> str:
    return kernel.fn.__name__  # the Python function's name, which Triton's compiler reports too


def compiled_variants(kernels=KERNELS) -> dict[str, int]:
    """Compiled variants (specialisations) of each kernel in Triton's in-memory caches, all devices together;
    0 for kernels run by the interpreter, which compiles nothing."""
    counts = {}
    for kernel in kernels:
        # JITFunction.device_caches: device -> (kernel cache, ...); the kernel cache maps a specialisation key
        # to its compiled kernel.
        caches = getattr(kernel, "device_caches", {})
        counts[_kernel_name(kernel)] = sum(len(per_device[0]) for per_device in caches.values())
    return counts


@dataclasses.dataclass
class CompileReport:
    """What the :func:`compile_report` block compiled: ``kernels`` new compiled variants in all,
    ``by_kernel`` per kernel name, ``compiles`` and ``seconds`` the compiler runs and their time (a variant
    found in Triton's on-disk cache counts in ``disk_cache_hits`` instead, its load time not in ``seconds``);
    ``seconds`` is None where this Triton reports no compile times."""

    kernels: int = 0
    by_kernel: dict[str, int] = dataclasses.field(default_factory=dict)
    compiles: int = 0
    disk_cache_hits: int = 0
    seconds: float | None = None

    def record(self, name: str, microseconds: float, cache_hit: bool) -> None:
        """One compile event of one of :data:`KERNELS` (Triton's compilation listener calls it)."""
        if cache_hit:
            self.disk_cache_hits += 1
            return
        self.compiles += 1
        self.seconds = (self.seconds or 0.0) + microseconds / 1e6


@contextlib.contextmanager
def compile_report(kernels=KERNELS):
    """Counts and times the indexed-convolution kernels that Triton compiles inside the block, e.g. around a
    benchmark's warm-up steps and again around its timed steps (which should compile nothing)::

        with compile_report() as report:
            train_step()
        print(report.kernels, report.seconds)

    Any compilation listener already installed keeps being called."""
    report = CompileReport()
    names = {_kernel_name(kernel) for kernel in kernels}
    compilation = getattr(getattr(triton, "knobs", None), "compilation", None)
    previous = getattr(compilation, "listener", None)
    listens = compilation is not None and hasattr(compilation, "listener")

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)
        if getattr(src, "name", None) in names:
            report.record(src.name, times.total, cache_hit)

    before = compiled_variants(kernels)
    if listens:
        report.seconds = 0.0
        compilation.listener = listener
    try:
        yield report
    finally:
        if listens:
            compilation.listener = previous
        after = compiled_variants(kernels)
        report.by_kernel = {name: count - before[name] for name, count in after.items() if count > before[name]}
        report.kernels = sum(report.by_kernel.values())
