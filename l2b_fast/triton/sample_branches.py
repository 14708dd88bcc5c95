"""Triton kernel of ``sample_branches``: every child's gumbel-max parent and softmax weights, one launch.

Same semantics as csrc/cpu/sample_branches_cpu.cpp, computed in fp32 (fp64 for fp64 logits):
p = logits + noise, index = first argmax over parents of p, soft = softmax over parents of p / tau,
evaluated as exp((p - max p) / tau) / sum (overflow-safe), written in the logits' dtype. With a
``seed`` the noise is drawn inside the kernel from Philox4x32-10 (``tl.randint``, counter i * J + j)
exactly as csrc/philox.h ``gumbel_noise`` does; the seed is read on the device, so nothing
synchronises with the host. On the GPU, log / exp come from libdevice (``__nv_logf`` is what the CUDA
kernel's ``logf`` compiles to; ``tl.log`` / ``tl.exp`` lower to fast approximations there).

The helpers at the top (launch configuration, tau pointer, device guard) are shared with
:mod:`l2b_fast.triton.branch`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # precise transcendental functions on the GPU (tl.exp / tl.log lower to fast approximations there)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _use_libdevice(device: torch.device) -> bool:
    # libdevice is not implemented by the interpreter; there tl.exp / tl.log are numpy's (precise).
    return libdevice is not None and device.type == "cuda" and not _interpreting()


def _interpreted(device: torch.device) -> bool:
    """True when the kernels run in the interpreter: there each program instance costs ~1 ms, so the
    launch configurations use few, large programs."""
    return device.type != "cuda" or _interpreting()


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def _tau_pointer(tau: Tensor, device: torch.device) -> Tensor:
    """The temperature as one float64 on ``device``, which the kernels load (never a launch argument:
    a changed value then needs no new launch or compile). Same checks as csrc/branch_checks.h."""
    if tau.numel() != 1 or not tau.dtype.is_floating_point:
        raise ValueError(
            f"l2b_fast: tau must be a one-element floating tensor, got {tau.dtype} of shape {tuple(tau.shape)}"
        )
    if tau.device != device:
        raise ValueError(f"l2b_fast: tau is on {tau.device} but the other tensors are on {device}")
    return tau.reshape(1).to(torch.float64)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@triton.jit
def _sample_branches_kernel(
    logits_ptr,
    noise_ptr,
    seed_ptr,
    index_ptr,
    soft_ptr,
    num_parents,
    J,
    stride_li,
    stride_lj,
    stride_ni,
    stride_nj,
    tau_ptr,  # one float64
    HAS_NOISE: tl.constexpr,
    F64: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # One program: BLOCK_J children (columns), all I parents (rows, BLOCK_I >= I, masked).
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_I)
    cols = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < num_parents
    col_ok = cols < J
    mask = row_ok[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]

    logit = tl.load(logits_ptr + r * stride_li + c * stride_lj, mask=mask, other=0.0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + r * stride_ni + c * stride_nj, mask=mask, other=0.0)
    else:
        # csrc/philox.h gumbel_noise: Philox4x32-10, key = seed (lo, hi words), counter = (i * J + j, 0, 0, 0),
        # first word; u = (top 23 bits + 0.5) * 2^-23 in [2^-24, 1 - 2^-24], noise = -log(-log(u)) in fp32.
        seed = tl.load(seed_ptr)
        counter = (r * J + c).to(tl.uint32)
        bits = tl.randint(seed, counter).to(tl.uint32, bitcast=True)
        u = ((bits >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        if USE_LIBDEVICE:
            eps = -libdevice.log(-libdevice.log(u))
        else:
            eps = -tl.log(-tl.log(u))

    if F64:
        perturbed = logit.to(tl.float64) + eps.to(tl.float64)
    else:
        perturbed = logit.to(tl.float32) + eps.to(tl.float32)
    perturbed = tl.where(row_ok[:, None], perturbed, float("-inf"))

    top = tl.max(perturbed, axis=0)
    # First argmax of logits + noise (the CPU loop keeps the earliest of equal maxima).
    best = tl.min(tl.where(perturbed == top[None, :], rows[:, None], BLOCK_I), axis=0)
    tl.store(index_ptr + cols, best.to(tl.int64), mask=col_ok)

    # softmax((logits + noise) / tau) with the maximum subtracted before dividing by tau: the quotient
    # itself may overflow (huge logits, tiny tau), the shifted difference only reaches -inf (exp = 0).
    tau = tl.load(tau_ptr)
    if F64:
        shifted = (perturbed - top[None, :]) / tau
    else:
        # IEEE division (plain `/` is an approximate division for fp32 on NVIDIA GPUs); fp32(tau) as the
        # CPU kernel's static_cast<float>(tau).
        diff = perturbed - top[None, :]
        shifted = tl.math.div_rn(diff, tl.zeros_like(diff) + tau.to(tl.float32))
    if USE_LIBDEVICE:
        e = libdevice.exp(shifted)
    else:
        e = tl.exp(shifted)
    total = tl.sum(e, axis=0)
    if F64:
        soft = e / total[None, :]
    else:
        soft = tl.math.div_rn(e, tl.zeros_like(e) + total[None, :])
    tl.store(soft_ptr + r * J + c, soft.to(soft_ptr.dtype.element_ty), mask=mask)


def sample_branches(logits: Tensor, tau: Tensor, noise: Tensor | None, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """``index`` (int64 [J], first argmax over parents of logits + noise) and ``soft`` ([I, J], logits'
    dtype, softmax over parents of (logits + noise) / tau). Exactly one of ``noise`` ([I, J], any float
    dtype, converted to the compute dtype) or ``seed`` (one int64 on logits' device) is given; ``tau`` is
    a one-element floating tensor on logits' device.

    Inputs are assumed validated (csrc/branch_checks.h ``check_sample_inputs``).
    """
    num_parents, children = logits.shape
    device = logits.device
    index = torch.empty(children, dtype=torch.int64, device=device)
    soft = torch.empty(num_parents, children, dtype=logits.dtype, device=device)
    if num_parents == 0 or children == 0:
        return index, soft
    has_noise = noise is not None
    if has_noise:
        noise_arg, stride_ni, stride_nj = noise, noise.stride(0), noise.stride(1)
        seed_arg = logits  # unused placeholder pointer
    else:
        noise_arg, stride_ni, stride_nj = logits, 0, 0  # unused placeholder pointer
        seed_arg = seed

    block_i = max(2, _next_pow2(num_parents))
    # Columns per program: all of them in the interpreter; ~4096 [I, J] elements per program on the GPU.
    budget = 1 << 16 if _interpreted(device) else 4096
    block_j = max(2, min(_next_pow2(children), _prev_pow2(max(1, budget // block_i))))
    grid = (triton.cdiv(children, block_j),)
    tau_arg = _tau_pointer(tau, device)
    with _device_guard(device):
        _sample_branches_kernel[grid](
            logits,
            noise_arg,
            seed_arg,
            index,
            soft,
            num_parents,
            children,
            logits.stride(0),
            logits.stride(1),
            stride_ni,
            stride_nj,
            tau_arg,
            HAS_NOISE=has_noise,
            F64=logits.dtype == torch.float64,
            USE_LIBDEVICE=_use_libdevice(device),
            BLOCK_I=block_i,
            BLOCK_J=block_j,
            num_warps=4,
        )
    return index, soft
