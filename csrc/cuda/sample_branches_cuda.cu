// CUDA kernel of l2b_fast::sample_branches: one launch, one thread per child, no host synchronisation
// (the seed is read on the device; finiteness is asserted asynchronously by the Python wrapper).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "../branch_checks.h"
#include "../philox.h"

namespace l2b_fast {
namespace {

constexpr int kThreads = 128;

// logits + noise for (i, j), recomputed on each pass instead of stored: I is unbounded and Philox is
// counter based, so every pass sees bit-identical values.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t perturbed_logit(const scalar_t* logits, const acc_t* noise, uint64_t seed,
                                                 int64_t k) {
  const acc_t eps = noise != nullptr ? noise[k] : static_cast<acc_t>(gumbel_noise(seed, static_cast<uint32_t>(k)));
  return static_cast<acc_t>(logits[k]) + eps;
}

// Same arithmetic, in the same order, as sample_branches_cpu: argmax of logits + noise (first maximum),
// then softmax of (perturbed - top) / tau.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sample_branches_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ noise,
                           const int64_t* __restrict__ seed, const double* __restrict__ tau_value,
                           int64_t parents, int64_t children, scalar_t* __restrict__ soft,
                           int64_t* __restrict__ index) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= children) return;
  // Read from memory, not passed by value: a new temperature needs no new launch (CUDA graphs).
  CUDA_KERNEL_ASSERT(isfinite(*tau_value) && *tau_value > 0.0);
  const acc_t tau = static_cast<acc_t>(*tau_value);
  const uint64_t seed_value = noise == nullptr ? static_cast<uint64_t>(*seed) : 0;
  int64_t best = 0;
  acc_t top = perturbed_logit(logits, noise, seed_value, j);
  for (int64_t i = 1; i < parents; ++i) {
    const acc_t value = perturbed_logit(logits, noise, seed_value, i * children + j);
    if (value > top) {
      top = value;
      best = i;
    }
  }
  acc_t total = 0;
  for (int64_t i = 0; i < parents; ++i) {
    total += std::exp((perturbed_logit(logits, noise, seed_value, i * children + j) - top) / tau);
  }
  for (int64_t i = 0; i < parents; ++i) {
    const int64_t k = i * children + j;
    soft[k] = static_cast<scalar_t>(std::exp((perturbed_logit(logits, noise, seed_value, k) - top) / tau) / total);
  }
  index[j] = best;
}

std::tuple<at::Tensor, at::Tensor> sample_branches_cuda(const at::Tensor& logits, const at::Tensor& tau,
                                                        const std::optional<at::Tensor>& noise,
                                                        const std::optional<at::Tensor>& seed) {
  check_sample_inputs(logits, tau, noise, seed);
  const int64_t parents = logits.size(0), children = logits.size(1);
  TORCH_CHECK_VALUE(parents * children <= (int64_t{1} << 32), "l2b_fast: at most 2^32 logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor index = at::empty({children}, logits.options().dtype(at::kLong));
  at::Tensor soft = at::empty({parents, children}, logits.options());
  // Read in logits' own dtype: the in-kernel conversion to acc_t is the exact `.to(acc)` of the CPU path.
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor tau_d = tau_as_double(tau);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (children + kThreads - 1) / kThreads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_branches_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor noise_acc;
    if (noise.has_value()) noise_acc = noise->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    sample_branches_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        logits_c.data_ptr<scalar_t>(), noise.has_value() ? noise_acc.data_ptr<acc_t>() : nullptr,
        seed.has_value() ? seed->data_ptr<int64_t>() : nullptr, tau_d.data_ptr<double>(), parents, children,
        soft.data_ptr<scalar_t>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {soft, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2b_fast, CUDA, m) { m.impl("sample_branches", &sample_branches_cuda); }

}  // namespace l2b_fast
