// CPU kernels of the straight-through branch: the forward gather and the fused backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../branch_checks.h"

namespace l2b_fast {
namespace {

// Elements per work item: the I + J rows of one chunk (as fp32) stay in L2 while all I x J dot
// products are taken over it.
constexpr int64_t kChunk = 2048;

at::Tensor straight_through_branch_cpu(const at::Tensor& parents, const at::Tensor& logits, const at::Tensor& index,
                                       const at::Tensor& soft, const at::Tensor& tau) {
  check_branch_inputs(parents, index, soft);
  check_tau_tensor(tau, parents.device());
  cpu_tau_value(tau);
  const int64_t num_parents = parents.size(0), children = index.size(0);
  const at::Tensor index_c = index.contiguous();
  // Validates every index before any copy.
  group_children_by_parent(index_c.data_ptr<int64_t>(), num_parents, children);
  at::Tensor out = empty_children_like(parents, children);
  const int64_t row_bytes = (parents.numel() / num_parents) * parents.element_size();
  if (row_bytes == 0) return out;
  const int64_t chunk_bytes = kChunk * 16;
  const int64_t chunks = (row_bytes + chunk_bytes - 1) / chunk_bytes;
  const auto* src = static_cast<const char*>(parents.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = index_c.data_ptr<int64_t>();
  at::parallel_for(0, children * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / chunks, offset = (item % chunks) * chunk_bytes;
      const int64_t bytes = std::min(chunk_bytes, row_bytes - offset);
      std::memcpy(dst + j * row_bytes + offset, src + idx[j] * row_bytes + offset, bytes);
    }
  });
  return out;
}

template <typename acc_t>
acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  // Eight independent partial sums let the compiler use SIMD without reassociating one sum.
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[k + l] * b[k + l];
  }
  acc_t total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

// Rows of one chunk as acc_t: a pointer into the tensor when the types agree, a converted copy else.
template <typename scalar_t, typename acc_t>
const acc_t* chunk_as_acc(const scalar_t* row, int64_t len, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t k = 0; k < len; ++k) scratch[k] = static_cast<acc_t>(row[k]);
    return scratch;
  }
}

// One pass over chunks of kChunk elements that stay in cache: the segment sum into grad_parents (when
// given) and the I x J dot products into dots (when given; parents are read only for them).
template <typename scalar_t>
void branch_backward_cpu_kernel(const scalar_t* grad_out, const scalar_t* parents, const ChildrenByParent& groups,
                                int64_t num_parents, int64_t children, int64_t numel, scalar_t* grad_parents,
                                double* dots /* [I, J] */) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pairs = num_parents * children;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  const int threads = at::get_num_threads();
  std::vector<double> partial(dots != nullptr ? static_cast<size_t>(threads) * pairs : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    double* my_dots = dots != nullptr ? partial.data() + static_cast<int64_t>(at::get_thread_num()) * pairs : nullptr;
    std::vector<acc_t> scratch((num_parents + children + 1) * kChunk);
    std::vector<const acc_t*> y(num_parents), g(children);
    acc_t* sum = scratch.data() + (num_parents + children) * kChunk;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, numel - start);
      for (int64_t j = 0; j < children; ++j) {
        g[j] = chunk_as_acc(grad_out + j * numel + start, len, scratch.data() + (num_parents + j) * kChunk);
      }
      // grad_parents[i] = segment sum of the children that sampled parent i.
      for (int64_t i = 0; grad_parents != nullptr && i < num_parents; ++i) {
        scalar_t* out = grad_parents + i * numel + start;
        const int64_t first = groups.offsets[i], last = groups.offsets[i + 1];
        if (first == last) {
          std::fill(out, out + len, scalar_t(0));
          continue;
        }
        std::copy(g[groups.child_order[first]], g[groups.child_order[first]] + len, sum);
        for (int64_t m = first + 1; m < last; ++m) {
          const acc_t* gj = g[groups.child_order[m]];
          for (int64_t k = 0; k < len; ++k) sum[k] += gj[k];
        }
        for (int64_t k = 0; k < len; ++k) out[k] = static_cast<scalar_t>(sum[k]);
      }
      if (my_dots == nullptr) continue;
      // G[i, j] for every pair, while the chunk is still in cache.
      for (int64_t i = 0; i < num_parents; ++i) {
        y[i] = chunk_as_acc(parents + i * numel + start, len, scratch.data() + i * kChunk);
      }
      for (int64_t i = 0; i < num_parents; ++i) {
        for (int64_t j = 0; j < children; ++j) my_dots[i * children + j] += static_cast<double>(dot(y[i], g[j], len));
      }
    }
  });
  if (dots == nullptr) return;
  std::fill(dots, dots + pairs, 0.0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t p = 0; p < pairs; ++p) dots[p] += partial[static_cast<size_t>(t) * pairs + p];
  }
}

std::tuple<at::Tensor, at::Tensor> branch_backward_cpu(const at::Tensor& grad_out, const at::Tensor& parents,
                                                       const at::Tensor& index, const at::Tensor& soft,
                                                       const at::Tensor& tau, bool need_grad_parents,
                                                       bool need_grad_logits) {
  check_branch_inputs(parents, index, soft);
  check_tau_tensor(tau, parents.device());
  const double tau_value = cpu_tau_value(tau);
  const int64_t num_parents = parents.size(0), children = index.size(0);
  const int64_t numel = parents.numel() / num_parents;
  const at::Tensor grad = grad_in_children_layout(grad_out, parents);
  const at::Tensor index_c = index.contiguous();
  const ChildrenByParent groups = group_children_by_parent(index_c.data_ptr<int64_t>(), num_parents, children);
  at::Tensor grad_parents = need_grad_parents ? at::empty_like(parents) : parents.new_empty({0});
  at::Tensor dots = need_grad_logits ? at::zeros({num_parents, children}, parents.options().dtype(at::kDouble))
                                     : at::Tensor();
  if (numel > 0 && (need_grad_parents || need_grad_logits)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parents.scalar_type(), "branch_backward_cpu", [&] {
      branch_backward_cpu_kernel<scalar_t>(grad.data_ptr<scalar_t>(), parents.data_ptr<scalar_t>(), groups,
                                           num_parents, children, numel,
                                           need_grad_parents ? grad_parents.data_ptr<scalar_t>() : nullptr,
                                           need_grad_logits ? dots.data_ptr<double>() : nullptr);
    });
  }
  if (!need_grad_logits) return {grad_parents, soft.new_empty({0})};
  // Softmax backward over parents (dz = soft * (G - <soft, G>)) and the 1 / tau of z = (logits + noise) / tau.
  const at::Tensor soft_d = soft.to(at::kDouble);
  const at::Tensor centred = dots - (soft_d * dots).sum(0, /*keepdim=*/true);
  const at::Tensor grad_logits = (soft_d * centred / tau_value).to(soft.scalar_type());
  return {grad_parents, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2b_fast, CPU, m) {
  m.impl("straight_through_branch", &straight_through_branch_cpu);
  m.impl("branch_backward", &branch_backward_cpu);
}

}  // namespace l2b_fast
