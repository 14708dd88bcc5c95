// torch.ops.l2b_emu.branch_backward: the CUDA fused backward (csrc/cuda/branch_backward_kernels.cuh)
// run on the CPU through cuda_emulation.h, with the launch decisions of csrc/cuda/branch_cuda.cu
// (one fused launch, dots-only groups for large blocks, the segment sum alone without the logits
// gradient) for a GPU described by its SM count, resident blocks per SM and shared-memory budget.
// The fused launches go through the CUDA build's LaunchCache against a fake runtime that keeps each
// kernel's opt-in shared-memory attribute and refuses a launch above it, as CUDA does; every attribute
// change and launch is logged (torch.ops.l2b_emu.launch_log) so tests can check a sequence of calls.
// Built and driven by tools/cuda_emulator/emulator.py.
#define L2B_CUDA_EMULATION 1
#include "cuda_emulation.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "cuda/branch_backward_kernels.cuh"

namespace {

using namespace l2b_fast::backward;

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

struct Gpu {
  int device;  // one per distinct (sm_count, blocks_per_sm, smem_budget): the launch cache is per device
  int sm_count, blocks_per_sm;
  size_t smem_budget;
  l2b_emu::CopyTiming timing;
};

// The CUDA runtime as the launch cache and the fused launches see it: per (device, kernel) dynamic
// shared-memory attribute (kDefaultSmem until set), occupancy from the emulated GPU's description, and a log
// of rows (event: 0 attribute set / 1 launch, device, kernel ordinal, bytes set or launched, attribute after).
struct FakeRuntime {
  std::mutex mutex;
  std::map<std::pair<int, const void*>, size_t> attributes;
  std::map<const void*, int64_t> kernel_ordinals;
  std::vector<std::vector<int64_t>> log;

  int64_t ordinal(const void* kernel) {
    return kernel_ordinals.emplace(kernel, static_cast<int64_t>(kernel_ordinals.size())).first->second;
  }
  size_t attribute(int device, const void* kernel) {
    const auto found = attributes.find({device, kernel});
    return found == attributes.end() ? kDefaultSmem : found->second;
  }
  void set(int device, const void* kernel, size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex);
    attributes[{device, kernel}] = bytes;
    log.push_back({0, device, ordinal(kernel), static_cast<int64_t>(bytes), static_cast<int64_t>(bytes)});
  }
  // As cudaLaunchKernel: a launch with more dynamic shared memory than the kernel's attribute is an error.
  void check_launch(int device, const void* kernel, size_t smem) {
    const std::lock_guard<std::mutex> lock(mutex);
    const size_t allowed = attribute(device, kernel);
    log.push_back({1, device, ordinal(kernel), static_cast<int64_t>(smem), static_cast<int64_t>(allowed)});
    TORCH_CHECK(smem <= allowed, "emulated CUDA: launch with ", smem, " B of dynamic shared memory above the kernel's ",
                "cudaFuncAttributeMaxDynamicSharedMemorySize of ", allowed, " B (invalid argument)");
  }
  void reset() {
    const std::lock_guard<std::mutex> lock(mutex);
    attributes.clear();
    kernel_ordinals.clear();
    log.clear();
  }
};

FakeRuntime& fake_runtime() {
  static FakeRuntime runtime;
  return runtime;
}

// The launch cache of one emulated process: replaced by reset_launch_state (a fresh process).
std::unique_ptr<LaunchCache>& launch_cache() {
  static std::unique_ptr<LaunchCache> cache = std::make_unique<LaunchCache>();
  return cache;
}

// LaunchCache's Runtime for one device.
struct DeviceRuntime {
  const Gpu& gpu;
  void set_max_dynamic_smem(const void* kernel, size_t bytes) const { fake_runtime().set(gpu.device, kernel, bytes); }
  int occupancy(const void* /*kernel*/, int /*threads*/, size_t /*smem*/) const { return gpu.blocks_per_sm; }
};

int emulated_device(int64_t sm_count, int64_t blocks_per_sm, int64_t smem_budget) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, int> devices;
  const std::lock_guard<std::mutex> lock(mutex);
  return devices.emplace(std::make_tuple(sm_count, blocks_per_sm, smem_budget), static_cast<int>(devices.size()))
      .first->second;
}

template <typename Kernel, typename... Args>
void launch_checked(const Gpu& gpu, dim3 grid, size_t smem, Kernel kernel, Args... args) {
  fake_runtime().check_launch(gpu.device, reinterpret_cast<const void*>(kernel), smem);
  l2b_emu::launch(grid, kThreads, smem, gpu.timing, kernel, args...);
}

// plan[0..7]: launches, tile, stages, lanes, pair_m, blocks, tiles_per_block, vectorised (of the last launch)
template <typename scalar_t, int M>
at::Tensor run_fused(const scalar_t* grad, const scalar_t* parents, const int64_t* index, scalar_t* grad_parents,
                     FusedParams p, size_t smem, const Gpu& gpu, std::vector<int64_t>& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorised = p.numel % kVec == 0 && aligned16(grad) && aligned16(parents) &&
                          (!p.write_grad_parents || aligned16(grad_parents));
  auto kernel = vectorised ? &branch_backward_fused_kernel<scalar_t, kVec, M, M>
                           : &branch_backward_fused_kernel<scalar_t, 1, M, M>;
  DeviceRuntime runtime{gpu};
  const int per_sm = launch_cache()->blocks_per_sm(runtime, gpu.device, reinterpret_cast<const void*>(kernel), smem);
  const int64_t blocks = plan_grid(p, gpu.sm_count, per_sm);
  at::Tensor partials = at::full({int64_t{p.parents} * p.children, blocks}, NAN,
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = partials.data_ptr<acc_t>();
  const dim3 grid{static_cast<unsigned>(blocks), 1, 1};
  launch_checked(gpu, grid, smem, kernel, grad, parents, index, grad_parents, out, p);
  plan = {plan.empty() ? 1 : plan[0] + 1, p.tile, p.stages, p.lanes, M, blocks, p.tiles_per_block, vectorised};
  return partials;
}

template <typename scalar_t>
at::Tensor run_planned(const scalar_t* grad, const scalar_t* parents, const int64_t* index, scalar_t* grad_parents,
                       const FusedParams& p, size_t smem, int pair_m, const Gpu& gpu, std::vector<int64_t>& plan) {
  constexpr int kSmall = small_pair_block<scalar_t>();
  if (pair_m == kSmall) return run_fused<scalar_t, kSmall>(grad, parents, index, grad_parents, p, smem, gpu, plan);
  return run_fused<scalar_t, 2 * kSmall>(grad, parents, index, grad_parents, p, smem, gpu, plan);
}

template <typename scalar_t>
void run_segment_sum(const at::Tensor& grad, const int64_t* index, scalar_t* grad_parents, int parents, int children,
                     int64_t numel, const Gpu& gpu) {
  std::vector<int> lists(static_cast<size_t>(parents) + 1 + children, -1);
  l2b_emu::launch(dim3{static_cast<unsigned>((parents + kThreads - 1) / kThreads), 1, 1}, kThreads, 0, gpu.timing,
                  list_children_kernel, index, parents, children, lists.data(), lists.data() + parents + 1);
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorised = numel % kVec == 0 && aligned16(grad.data_ptr()) && aligned16(grad_parents);
  const dim3 grid{4, static_cast<unsigned>(parents), 1};  // few blocks: the grid-stride loop covers the rest
  const int* offsets = lists.data();
  if (vectorised) {
    l2b_emu::launch(grid, kThreads, 0, gpu.timing, segment_sum_kernel<scalar_t, kVec>, grad.data_ptr<scalar_t>(),
                    offsets, offsets + parents + 1, grad_parents, parents, numel);
  } else {
    l2b_emu::launch(grid, kThreads, 0, gpu.timing, segment_sum_kernel<scalar_t, 1>, grad.data_ptr<scalar_t>(), offsets,
                    offsets + parents + 1, grad_parents, parents, numel);
  }
}

// grad [J, N] and parents [I, N] (flat rows, any alignment), index int64 [J]. Returns grad_parents ([I, N],
// or [0]), the dot products G [I, J] in float64 ([0] without the logits gradient) and the plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_branch_backward(
    const at::Tensor& grad, const at::Tensor& parents, const at::Tensor& index, int64_t sm_count,
    int64_t blocks_per_sm, int64_t smem_budget, int64_t copy_timing, bool need_grad_parents, bool need_grad_logits) {
  TORCH_CHECK(grad.dim() == 2 && parents.dim() == 2 && grad.size(1) == parents.size(1), "grad [J, N], parents [I, N]");
  TORCH_CHECK(grad.is_contiguous() && parents.is_contiguous() && grad.scalar_type() == parents.scalar_type());
  const Gpu gpu{emulated_device(sm_count, blocks_per_sm, smem_budget), static_cast<int>(sm_count),
                static_cast<int>(blocks_per_sm), static_cast<size_t>(smem_budget),
                static_cast<l2b_emu::CopyTiming>(copy_timing)};
  const int num_parents = static_cast<int>(parents.size(0)), children = static_cast<int>(grad.size(0));
  const int64_t numel = parents.size(1);
  const at::Tensor index_c = index.contiguous();
  at::Tensor grad_parents = need_grad_parents ? at::full_like(parents, NAN) : parents.new_empty({0});
  at::Tensor dots = at::empty({0}, at::kDouble);
  std::vector<int64_t> plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parents.scalar_type(), "emulated_branch_backward", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    const scalar_t* parents_ptr = parents.data_ptr<scalar_t>();
    scalar_t* grad_parents_ptr = need_grad_parents ? grad_parents.data_ptr<scalar_t>() : nullptr;
    const int64_t* idx = index_c.data_ptr<int64_t>();
    if (!need_grad_logits) {
      run_segment_sum<scalar_t>(grad, idx, grad_parents_ptr, num_parents, children, numel, gpu);
      return;
    }
    FusedParams p;
    size_t smem = 0;
    int pair_m = 0;
    if (plan_fused<scalar_t>(num_parents, children, numel, need_grad_parents, gpu.smem_budget, p, smem, pair_m)) {
      dots = run_planned<scalar_t>(grad_ptr, parents_ptr, idx, grad_parents_ptr, p, smem, pair_m, gpu, plan)
                 .to(at::kDouble)
                 .sum(1)
                 .view({num_parents, children});
      return;
    }
    int group_parents = 0, group_children = 0;
    TORCH_CHECK(plan_groups<scalar_t>(num_parents, children, numel, gpu.smem_budget, group_parents, group_children));
    dots = at::empty({num_parents, children}, at::kDouble);
    for (int i0 = 0; i0 < num_parents; i0 += group_parents) {
      const int rows_i = std::min(group_parents, num_parents - i0);
      for (int j0 = 0; j0 < children; j0 += group_children) {
        const int rows_j = std::min(group_children, children - j0);
        TORCH_CHECK(plan_fused<scalar_t>(rows_i, rows_j, numel, false, gpu.smem_budget, p, smem, pair_m));
        const at::Tensor group = run_planned<scalar_t>(grad_ptr + j0 * numel, parents_ptr + i0 * numel, nullptr,
                                                       nullptr, p, smem, pair_m, gpu, plan);
        dots.slice(0, i0, i0 + rows_i).slice(1, j0, j0 + rows_j).copy_(group.to(at::kDouble).sum(1).view({rows_i, rows_j}));
      }
    }
    if (need_grad_parents) run_segment_sum<scalar_t>(grad, idx, grad_parents_ptr, num_parents, children, numel, gpu);
  });
  return {grad_parents, dots, at::tensor(plan.empty() ? std::vector<int64_t>(8, 0) : plan, at::kLong)};
}

// [rows, 5] int64: the fake runtime's log since the last reset (see FakeRuntime).
at::Tensor launch_log() {
  FakeRuntime& runtime = fake_runtime();
  const std::lock_guard<std::mutex> lock(runtime.mutex);
  at::Tensor log = at::empty({static_cast<int64_t>(runtime.log.size()), 5}, at::kLong);
  for (size_t row = 0; row < runtime.log.size(); ++row) {
    for (int64_t column = 0; column < 5; ++column) log[static_cast<int64_t>(row)][column] = runtime.log[row][column];
  }
  return log;
}

// A fresh emulated process: no attribute set, no occupancy cached, an empty log.
void reset_launch_state() {
  fake_runtime().reset();
  launch_cache() = std::make_unique<LaunchCache>();
}

}  // namespace

TORCH_LIBRARY(l2b_emu, m) {
  m.def("branch_backward(Tensor grad, Tensor parents, Tensor index, int sm_count, int blocks_per_sm, int smem_budget, "
        "int copy_timing, bool need_grad_parents, bool need_grad_logits) -> (Tensor, Tensor, Tensor)");
  m.impl("branch_backward", &emulated_branch_backward);
  m.def("launch_log() -> Tensor", &launch_log);
  m.def("reset_launch_state() -> ()", &reset_launch_state);
}
