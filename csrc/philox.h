// Counter-based Philox4x32-10 gumbel noise shared by the CPU and CUDA kernels.
//
// Bit-identical to Triton's `tl.randint(seed, offset)` (key = the 64-bit seed split into two 32-bit
// words, counter = (offset, 0, 0, 0), first output word) and to the pure-PyTorch reference in
// l2b_fast/ops/_philox.py, so every backend draws the same sample for the same generator state.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define L2B_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define L2B_HOST_DEVICE inline
#endif

namespace l2b_fast {

L2B_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32 with 10 rounds for counter (offset, 0, 0, 0).
L2B_HOST_DEVICE uint32_t philox_uint32(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi32(0xCD9E8D57u, prev_c2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, prev_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev_c2;
    c3 = 0xD2511F53u * prev_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform in [2^-24, 1 - 2^-24]: the top 23 bits plus half a step, every operation exact in fp32,
// so neither log below can see 0 or 1 and the noise is always finite (|noise| < 17).
L2B_HOST_DEVICE float uniform_open(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

L2B_HOST_DEVICE float gumbel_noise(uint64_t seed, uint32_t offset) {
  const float u = uniform_open(philox_uint32(seed, offset));
#if defined(__CUDA_ARCH__)
  return -logf(-logf(u));
#else
  return -std::log(-std::log(u));
#endif
}

}  // namespace l2b_fast
