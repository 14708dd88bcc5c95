"""Pure-PyTorch Philox4x32-10 gumbel noise: the reference for csrc/philox.h and Triton's tl.randint.

Every backend turns the same 64-bit seed into the same noise, so switching backends does not change
which parents are sampled. uint32 arithmetic is emulated in int64 tensors.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Split value (< 2^32) in 16-bit halves so every product fits in int64.
    hi16, lo16 = value >> 16, value & 0xFFFF
    lo_product, hi_product = constant * lo16, constant * hi16
    hi = (hi_product + (lo_product >> 16)) >> 16
    lo = (lo_product + ((hi_product & 0xFFFF) << 16)) & _MASK32
    return hi & _MASK32, lo


def philox_uint32(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for counters ``(counter, 0, 0, 0)``, as int64 in [0, 2^32)."""
    seed = seed.reshape(()).to(torch.int64)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = counter.to(torch.int64) & _MASK32
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0


def gumbel_noise(seed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` gumbel samples, element (i, j) from counter ``i * cols + j``.

    ``u`` lies in [2^-24, 1 - 2^-24] (exact in fp32), so the noise is always finite (|noise| < 17).
    """
    counter = torch.arange(rows * cols, device=seed.device, dtype=torch.int64).reshape(rows, cols)
    bits = philox_uint32(seed, counter)
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23
    return -torch.log(-torch.log(uniform))
