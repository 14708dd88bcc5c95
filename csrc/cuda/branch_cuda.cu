// CUDA kernels of the straight-through branch: the forward gather and the fused backward (whose device
// code and launch planning live in branch_backward_kernels.cuh, shared with the CPU emulator).
// No host synchronisation anywhere: the index stays on the device and is validated with
// CUDA_KERNEL_ASSERT (reported at the next synchronising call); tau is read from device memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../branch_checks.h"
#include "branch_backward_kernels.cuh"

namespace l2b_fast {
namespace {

using namespace backward;  // kThreads, FusedParams, the kernels and their planning
constexpr int kWarps = kThreads / 32;

// Per-device limits, queried once per device (not on every backward call).
struct DeviceLimits {
  int sm_count = 0;
  size_t smem_per_block_optin = 0, smem_per_sm = 0;
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  DeviceLimits limits;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  limits.smem_per_block_optin = static_cast<size_t>(value);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  limits.smem_per_sm = static_cast<size_t>(value);
  return cache.emplace(device, limits).first->second;
}

// Shared memory one fused block may use: enough for two resident blocks per SM (1 KB per block is
// reserved by the runtime), never less than the 48 KB every launch gets without opting in.
size_t fused_smem_budget(const DeviceLimits& limits) {
  const size_t two_per_sm = limits.smem_per_sm / 2 > 1024 ? limits.smem_per_sm / 2 - 1024 : 0;
  return std::max(kDefaultSmem, std::min(limits.smem_per_block_optin, two_per_sm));
}

// The CUDA runtime calls of LaunchCache (branch_backward_kernels.cuh), on the current device (the callers'
// CUDAGuard has made it the tensors' device).
struct CudaRuntime {
  void set_max_dynamic_smem(const void* kernel, size_t bytes) const {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  int occupancy(const void* kernel, int threads, size_t smem) const {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    return per_sm;
  }
};

// Resident blocks per SM of `kernel` with `smem` bytes; raises the kernel's opt-in shared-memory attribute
// when a launch needs more than it allows (never lowers it: see LaunchCache).
template <typename Kernel>
int blocks_per_sm(int device, Kernel kernel, size_t smem) {
  static LaunchCache cache;
  CudaRuntime runtime;
  return cache.blocks_per_sm(runtime, device, reinterpret_cast<const void*>(kernel), smem);
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// ------------------------------------------------------------------------------------------------
// Forward: out[j] = parents[index[j]] as a byte copy of one dense row, in the widest unit that divides
// the row length and both base addresses. grid = (chunks of the row, children).

constexpr int kGatherUnroll = 4;

template <typename unit_t>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const unit_t* __restrict__ src, unit_t* __restrict__ dst, const int64_t* __restrict__ index,
                       int64_t parents, int64_t children, int64_t row_units) {
  for (int64_t j = blockIdx.y; j < children; j += gridDim.y) {
    const int64_t p = index[j];
    CUDA_KERNEL_ASSERT(p >= 0 && p < parents);
    if (p < 0 || p >= parents) continue;  // block-uniform; only reached if asserts are compiled out
    const unit_t* from = src + p * row_units;
    unit_t* to = dst + j * row_units;
    const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kGatherUnroll;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kGatherUnroll + threadIdx.x; base < row_units;
         base += step) {
      // All loads first, then the stores: kGatherUnroll independent requests in flight per thread.
      unit_t v[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t q = base + u * kThreads;
        if (q < row_units) v[u] = from[q];
      }
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t q = base + u * kThreads;
        if (q < row_units) to[q] = v[u];
      }
    }
  }
}

template <typename unit_t>
void launch_gather(const void* src, void* dst, const int64_t* index, int64_t parents, int64_t children,
                   int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_units = row_bytes / static_cast<int64_t>(sizeof(unit_t));
  const int64_t per_block = int64_t{kThreads} * kGatherUnroll;
  const int64_t chunks = std::min<int64_t>((row_units + per_block - 1) / per_block, int64_t{1} << 20);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(children, 65535)));
  gather_rows_kernel<unit_t><<<grid, kThreads, 0, stream>>>(static_cast<const unit_t*>(src),
                                                             static_cast<unit_t*>(dst), index, parents, children,
                                                             row_units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor straight_through_branch_cuda(const at::Tensor& parents, const at::Tensor& /*logits*/,
                                        const at::Tensor& index, const at::Tensor& soft, const at::Tensor& tau) {
  check_branch_inputs(parents, index, soft);
  check_tau_tensor(tau, parents.device());
  const int64_t num_parents = parents.size(0), children = index.size(0);
  const c10::cuda::CUDAGuard guard(parents.device());
  at::Tensor out = empty_children_like(parents, children);
  const int64_t row_bytes = (parents.numel() / num_parents) * parents.element_size();
  if (row_bytes == 0 || children == 0) return out;
  const at::Tensor index_c = index.contiguous();
  const void* src = parents.data_ptr();
  void* dst = out.data_ptr();
  const uintptr_t both = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  const auto fits = [&](int64_t unit) { return row_bytes % unit == 0 && both % static_cast<uintptr_t>(unit) == 0; };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* idx = index_c.data_ptr<int64_t>();
  if (fits(16)) {
    launch_gather<uint4>(src, dst, idx, num_parents, children, row_bytes, stream);
  } else if (fits(8)) {
    launch_gather<uint2>(src, dst, idx, num_parents, children, row_bytes, stream);
  } else if (fits(4)) {
    launch_gather<uint32_t>(src, dst, idx, num_parents, children, row_bytes, stream);
  } else if (fits(2)) {
    launch_gather<uint16_t>(src, dst, idx, num_parents, children, row_bytes, stream);
  } else {
    launch_gather<uint8_t>(src, dst, idx, num_parents, children, row_bytes, stream);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Backward: the logits gradient from the partial dot products.

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;  // complete in lane 0 only
}

template <typename soft_t>
__device__ __forceinline__ soft_t from_double(double x) {
  if constexpr (std::is_same_v<soft_t, double>) {
    return x;
  } else {
    return static_cast<soft_t>(static_cast<float>(x));  // as Tensor.to(): double -> float -> dtype
  }
}

// One block per child j: G[i, j] = sum over the blocks' partials (fixed order, in double), then the
// softmax backward soft * (G - <soft, G>) / tau of column j. col_dots is a [J, I] double scratch.
template <typename soft_t, typename part_t>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_kernel(const part_t* __restrict__ partials, int64_t blocks, const soft_t* __restrict__ soft,
                            const int64_t* __restrict__ index, double* __restrict__ col_dots, int parents,
                            int children, const double* __restrict__ tau_value, soft_t* __restrict__ grad_logits) {
  __shared__ double centre;
  const int j = blockIdx.x;
  const double tau = *tau_value;  // read from memory: a new temperature needs no new launch (CUDA graphs)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    const int64_t p = index[j];
    CUDA_KERNEL_ASSERT(p >= 0 && p < parents);
    CUDA_KERNEL_ASSERT(isfinite(tau) && tau > 0.0);
  }
  double* dots = col_dots + static_cast<int64_t>(j) * parents;
  for (int i = warp; i < parents; i += kWarps) {
    const part_t* row = partials + (static_cast<int64_t>(i) * children + j) * blocks;
    double sum = 0.0;
    for (int64_t b = lane; b < blocks; b += 32) sum += static_cast<double>(row[b]);
    sum = warp_sum(sum);
    if (lane == 0) dots[i] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    double weighted = 0.0;
    for (int i = lane; i < parents; i += 32) {
      weighted += static_cast<double>(soft[static_cast<int64_t>(i) * children + j]) * dots[i];
    }
    weighted = warp_sum(weighted);
    if (lane == 0) centre = weighted;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < parents; i += kThreads) {
    const int64_t k = static_cast<int64_t>(i) * children + j;
    grad_logits[k] = from_double<soft_t>(static_cast<double>(soft[k]) * (dots[i] - centre) / tau);
  }
}

// One launch of the fused kernel over `p.parents` parent rows and `p.children` grad rows (pointers to the
// first of each) writing partials [parents * children, blocks] in acc_t; returns the partials.
template <typename scalar_t, int M>
at::Tensor launch_fused(const scalar_t* grad, const scalar_t* parents, const int64_t* index, scalar_t* grad_parents,
                        FusedParams p, size_t smem_bytes, const at::TensorOptions& acc_options, int device,
                        cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorised = p.numel % kVec == 0 && aligned16(grad) && aligned16(parents) &&
                          (!p.write_grad_parents || aligned16(grad_parents));
  auto kernel = vectorised ? &branch_backward_fused_kernel<scalar_t, kVec, M, M>
                           : &branch_backward_fused_kernel<scalar_t, 1, M, M>;
  const int64_t blocks = plan_grid(p, device_limits(device).sm_count, blocks_per_sm(device, kernel, smem_bytes));
  at::Tensor partials = at::empty({int64_t{p.parents} * p.children, blocks}, acc_options);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(grad, parents, index, grad_parents,
                                                                          partials.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

template <typename scalar_t>
at::Tensor launch_fused_planned(const scalar_t* grad, const scalar_t* parents, const int64_t* index,
                                scalar_t* grad_parents, const FusedParams& p, size_t smem_bytes, int pair_m,
                                const at::TensorOptions& acc_options, int device, cudaStream_t stream) {
  constexpr int kSmall = small_pair_block<scalar_t>();
  if (pair_m == kSmall) {
    return launch_fused<scalar_t, kSmall>(grad, parents, index, grad_parents, p, smem_bytes, acc_options, device, stream);
  }
  return launch_fused<scalar_t, 2 * kSmall>(grad, parents, index, grad_parents, p, smem_bytes, acc_options, device,
                                            stream);
}

// grad_parents alone (no fused launch writes it): deterministic on-device children lists, then the sum.
template <typename scalar_t>
void launch_segment_sum(const at::Tensor& grad, const at::Tensor& index, at::Tensor& grad_parents, int num_parents,
                        int children, int64_t numel, cudaStream_t stream) {
  at::Tensor lists = at::empty({int64_t{num_parents} + 1 + children}, index.options().dtype(at::kInt));
  int* offsets = lists.data_ptr<int>();
  list_children_kernel<<<static_cast<unsigned>((num_parents + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      index.data_ptr<int64_t>(), num_parents, children, offsets, offsets + num_parents + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorised = numel % kVec == 0 && aligned16(grad.data_ptr()) && aligned16(grad_parents.data_ptr());
  const int64_t vectors = vectorised ? numel / kVec : numel;
  const int64_t chunks = std::min<int64_t>((vectors + kThreads - 1) / kThreads, int64_t{1} << 16);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(num_parents, 65535)));
  auto kernel = vectorised ? &segment_sum_kernel<scalar_t, kVec> : &segment_sum_kernel<scalar_t, 1>;
  kernel<<<grid, kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), offsets, offsets + num_parents + 1,
                                        grad_parents.data_ptr<scalar_t>(), num_parents, numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// param_t: dtype of parents and grad (scalar_t is taken by the dispatch over soft's dtype below).
template <typename param_t>
void branch_backward_impl(const at::Tensor& grad, const at::Tensor& parents, const at::Tensor& index,
                          const at::Tensor& soft, const at::Tensor& tau, bool need_grad_parents,
                          bool need_grad_logits, at::Tensor& grad_parents, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<param_t>;
  const int num_parents = static_cast<int>(parents.size(0)), children = static_cast<int>(index.size(0));
  const int64_t numel = parents.numel() / num_parents;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = parents.device().index();
  const at::TensorOptions acc_options = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const size_t smem_budget = fused_smem_budget(device_limits(device));
  const param_t* grad_ptr = grad.data_ptr<param_t>();
  const param_t* parents_ptr = parents.data_ptr<param_t>();
  param_t* grad_parents_ptr = need_grad_parents ? grad_parents.data_ptr<param_t>() : nullptr;

  if (!need_grad_logits) {  // frozen logits: no dot product, the segment sum alone (J N read, I N written)
    if (numel > 0) launch_segment_sum<param_t>(grad, index, grad_parents, num_parents, children, numel, stream);
    return;
  }

  at::Tensor partials;  // [I * J, blocks] pair-major partial dot products
  FusedParams p;
  size_t smem_bytes = 0;
  int pair_m = 0;
  if (numel == 0) {
    partials = at::zeros({int64_t{num_parents} * children, 1}, acc_options);
  } else if (plan_fused<param_t>(num_parents, children, numel, need_grad_parents, smem_budget, p, smem_bytes, pair_m)) {
    partials = launch_fused_planned<param_t>(grad_ptr, parents_ptr, index.data_ptr<int64_t>(), grad_parents_ptr, p,
                                             smem_bytes, pair_m, acc_options, device, stream);
  } else {
    // Too many pairs or rows for one launch: dots-only launches of the same kernel over groups of
    // parents x children (same arithmetic and fp32/fp64 accumulation as the fused path, no copies of the
    // inputs), each group's partials summed into G; then the segment sum on its own.
    int group_parents = 0, group_children = 0;
    TORCH_CHECK(plan_groups<param_t>(num_parents, children, numel, smem_budget, group_parents, group_children),
                "l2b_fast: no fused backward plan fits in shared memory");
    at::Tensor dots = at::empty({num_parents, children}, acc_options);
    for (int i0 = 0; i0 < num_parents; i0 += group_parents) {
      const int rows_i = std::min(group_parents, num_parents - i0);
      for (int j0 = 0; j0 < children; j0 += group_children) {
        const int rows_j = std::min(group_children, children - j0);
        TORCH_CHECK(plan_fused<param_t>(rows_i, rows_j, numel, false, smem_budget, p, smem_bytes, pair_m),
                    "l2b_fast: a backward group does not fit in shared memory");
        const at::Tensor group = launch_fused_planned<param_t>(grad_ptr + j0 * numel, parents_ptr + i0 * numel,
                                                               nullptr, nullptr, p, smem_bytes, pair_m, acc_options,
                                                               device, stream);
        // Deterministic: a fixed-shape reduction, each group in its own rectangle of G.
        dots.slice(0, i0, i0 + rows_i).slice(1, j0, j0 + rows_j).copy_(group.sum(1).view({rows_i, rows_j}));
      }
    }
    partials = dots.view({int64_t{num_parents} * children, 1});
    if (need_grad_parents) launch_segment_sum<param_t>(grad, index, grad_parents, num_parents, children, numel, stream);
  }

  at::Tensor col_dots = at::empty({int64_t{children}, num_parents}, grad.options().dtype(at::kDouble));
  const at::Tensor soft_c = soft.contiguous();
  const at::Tensor tau_d = tau_as_double(tau);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, soft.scalar_type(), "branch_backward_cuda_logits", [&] {
    softmax_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(children), kThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), partials.size(1), soft_c.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        col_dots.data_ptr<double>(), num_parents, children, tau_d.data_ptr<double>(), grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> branch_backward_cuda(const at::Tensor& grad_out, const at::Tensor& parents,
                                                        const at::Tensor& index, const at::Tensor& soft,
                                                        const at::Tensor& tau, bool need_grad_parents,
                                                        bool need_grad_logits) {
  check_branch_inputs(parents, index, soft);
  check_tau_tensor(tau, parents.device());
  TORCH_CHECK_VALUE(grad_out.device() == parents.device(), "l2b_fast: grad_out is on ", grad_out.device(),
                    " but parents are on ", parents.device());
  const int64_t num_parents = parents.size(0), children = index.size(0);
  TORCH_CHECK_VALUE(num_parents < INT_MAX && children < INT_MAX, "l2b_fast: too many parents or children");
  const c10::cuda::CUDAGuard guard(parents.device());
  at::Tensor grad_parents = need_grad_parents ? at::empty_like(parents) : parents.new_empty({0});
  at::Tensor grad_logits = need_grad_logits ? soft.new_empty({num_parents, children}) : soft.new_empty({0});
  if (!need_grad_parents && !need_grad_logits) return {grad_parents, grad_logits};
  if (children == 0) {
    grad_parents.zero_();  // no child sampled any parent
    return {grad_parents, grad_logits};
  }
  const at::Tensor grad = grad_in_children_layout(grad_out, parents);
  const at::Tensor index_c = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parents.scalar_type(), "branch_backward_cuda", [&] {
    branch_backward_impl<scalar_t>(grad, parents, index_c, soft, tau, need_grad_parents, need_grad_logits,
                                   grad_parents, grad_logits);
  });
  return {grad_parents, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2b_fast, CUDA, m) {
  m.impl("straight_through_branch", &straight_through_branch_cuda);
  m.impl("branch_backward", &branch_backward_cuda);
}

}  // namespace l2b_fast
