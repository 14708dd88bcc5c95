// CPU kernel of l2b_fast::sample_branches: one pass over the [I, J] logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "../branch_checks.h"
#include "../philox.h"

namespace l2b_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_branches_cpu(const at::Tensor& logits, const at::Tensor& tau,
                                                       const std::optional<at::Tensor>& noise,
                                                       const std::optional<at::Tensor>& seed) {
  check_sample_inputs(logits, tau, noise, seed);
  const double tau_value = cpu_tau_value(tau);
  TORCH_CHECK_VALUE(at::isfinite(logits).all().item<bool>(), "l2b_fast: logits contain NaN or inf");
  const int64_t parents = logits.size(0), children = logits.size(1);
  TORCH_CHECK_VALUE(parents * children <= (int64_t{1} << 32), "l2b_fast: at most 2^32 logits");
  at::Tensor index = at::empty({children}, logits.options().dtype(at::kLong));
  at::Tensor soft = at::empty({parents, children}, logits.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_branches_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor logits_acc = logits.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor noise_acc;
    if (noise.has_value()) {
      noise_acc = noise->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      TORCH_CHECK_VALUE(at::isfinite(noise_acc).all().item<bool>(), "l2b_fast: noise contains NaN or inf");
    }
    const uint64_t seed_value = seed.has_value() ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
    const acc_t* logit = logits_acc.data_ptr<acc_t>();
    const acc_t* given_noise = noise.has_value() ? noise_acc.data_ptr<acc_t>() : nullptr;
    int64_t* index_out = index.data_ptr<int64_t>();
    scalar_t* soft_out = soft.data_ptr<scalar_t>();
    std::vector<acc_t> perturbed(parents);
    for (int64_t j = 0; j < children; ++j) {
      int64_t best = 0;
      for (int64_t i = 0; i < parents; ++i) {
        const int64_t k = i * children + j;
        const acc_t eps = given_noise ? given_noise[k]
                                      : static_cast<acc_t>(gumbel_noise(seed_value, static_cast<uint32_t>(k)));
        perturbed[i] = logit[k] + eps;
        if (perturbed[i] > perturbed[best]) best = i;
      }
      // Shift by the maximum before dividing by tau: (logits + noise) / tau itself may overflow
      // (bf16 logits near 3e38, tau = 1e-4), the difference only goes to -inf, whose exp is 0.
      const acc_t top = perturbed[best];
      acc_t total = 0;
      for (int64_t i = 0; i < parents; ++i) {
        perturbed[i] = std::exp((perturbed[i] - top) / static_cast<acc_t>(tau_value));
        total += perturbed[i];
      }
      for (int64_t i = 0; i < parents; ++i) soft_out[i * children + j] = static_cast<scalar_t>(perturbed[i] / total);
      index_out[j] = best;
    }
  });
  return {soft, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2b_fast, CPU, m) { m.impl("sample_branches", &sample_branches_cpu); }

}  // namespace l2b_fast
