// CUDA kernels of the straight-through branch: the forward gather and the fused backward.
// No host synchronisation anywhere: the index stays on the device and is validated with
// CUDA_KERNEL_ASSERT (reported at the next synchronising call).
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
#include <type_traits>

#include "../branch_checks.h"

namespace l2b_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Fused backward limits: beyond them branch_backward_cuda takes the ATen fallback.
constexpr int64_t kMaxFusedPairs = 2048;
constexpr size_t kSmemBudget = 48 * 1024;  // no opt-in attribute needed

// A run of V elements moved as one load / store (V * sizeof(T) bytes, naturally aligned).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(x);
}

int multiprocessor_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
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
// Backward building blocks.

// Children of parent i in increasing order: offsets[i] = #{j : 0 <= index[j] < i}, then the matching j.
// O(J) per parent with no prefix sum or atomics, so any number of threads can fill the lists at once
// and the order (hence the summation order) is fixed. Out-of-range children are in no list.
__device__ void list_children(int i, const int64_t* __restrict__ index, int parents, int children, int* offsets,
                              int* order) {
  int before = 0, mine = 0;
  for (int j = 0; j < children; ++j) {
    const int64_t v = index[j];
    before += (v >= 0 && v < i) ? 1 : 0;
    mine += v == i ? 1 : 0;
  }
  offsets[i] = before;
  if (i == parents - 1) offsets[parents] = before + mine;
  for (int j = 0, k = before; j < children && k < before + mine; ++j) {
    if (index[j] == i) order[k++] = j;
  }
}

// Global -> shared copy of Bytes bytes: cp.async (sm_80+) so tiles load while earlier ones are used;
// a plain copy elsewhere and for 2-byte elements (cp.async moves 4, 8 or 16 bytes).
template <int Bytes>
__device__ __forceinline__ void copy_to_shared(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Bytes >= 4) {
    const unsigned shared_address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    if constexpr (Bytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address), "l"(src) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(shared_address), "l"(src), "n"(Bytes)
                   : "memory");
    }
    return;
  }
#endif
  using unit_t = std::conditional_t<
      Bytes == 16, uint4,
      std::conditional_t<Bytes == 8, uint2, std::conditional_t<Bytes == 4, uint32_t, uint16_t>>>;
  *static_cast<unit_t*>(dst) = *static_cast<const unit_t*>(src);
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// Launch geometry of the fused kernel, computed on the host (plan_tiles, plan_pairs, launch_fused).
struct FusedParams {
  int parents, children, rows;  // I, J, I + J
  int64_t numel;                // N, elements per row
  int tile, row_stride, stages; // T elements per tile; shared row stride (T + 16 bytes); pipeline depth
  int64_t num_tiles, tiles_per_block;
  int group_i, group_j, groups_j;  // pair block = group_i parents x group_j children
  int pair_blocks, lanes, lanes_pow2;
  int reduce_slots;          // accumulators reduced per round (shared memory holds slots x kThreads)
  int data_bytes;            // start of the children lists in shared memory
};

// Blocks per SM the register budget is sized for: 4 while the accumulators take <= 16 registers
// (bandwidth-bound shapes want occupancy), else 2 (<= 128 registers, no spills).
template <typename scalar_t, int MI, int MJ>
constexpr int fused_min_blocks() {
  return MI * MJ * sizeof(at::opmath_type<scalar_t>) <= 16 * 4 ? 4 : 2;
}

// Split-K fused backward. Each block owns a contiguous run of tiles of T elements. A tile holds T
// elements of all I parent rows and J grad rows in shared memory (raw dtype, S-stage cp.async
// pipeline). Per tile: grad_parents = segment sum of the listed children (VEC-wide stores), then the
// I x J dot products: thread = (pair block, lane); a pair block is up to MI x MJ pairs kept in
// registers (static indexing), a lane takes DV-element chunks lane, lane + L, ... of the tile.
// At the end the lanes are tree-reduced in shared memory (fixed order, deterministic) and the block
// writes its partial G to partials[pair * gridDim.x + block].
template <typename scalar_t, int VEC, int MI, int MJ>
__global__ void __launch_bounds__(kThreads, (fused_min_blocks<scalar_t, MI, MJ>()))
    branch_backward_fused_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ parents,
                                 const int64_t* __restrict__ index, scalar_t* __restrict__ grad_parents,
                                 at::opmath_type<scalar_t>* __restrict__ partials, const FusedParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int DV = sizeof(scalar_t) == 8 ? 2 : 4;  // dot chunk: 16 B (fp32/fp64) or 8 B (16-bit) loads
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tiles = reinterpret_cast<scalar_t*>(smem);
  acc_t* red = reinterpret_cast<acc_t*>(smem);  // aliases the tiles once they are done
  int* offsets = reinterpret_cast<int*>(smem + p.data_bytes);
  int* order = offsets + p.parents + 1;

  const int tid = threadIdx.x;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_block;
  const int ntiles = static_cast<int>(std::max<int64_t>(0, std::min(p.num_tiles - tile_begin, p.tiles_per_block)));
  const int stage_elems = p.rows * p.row_stride;

  // Issues the copies of local tile k into stage k % S. Rows < I are parents, the rest grad rows.
  const auto stage = [&](int k) {
    const int64_t start = (tile_begin + k) * p.tile;
    const int len = static_cast<int>(std::min<int64_t>(p.tile, p.numel - start));
    scalar_t* buf = tiles + (k % p.stages) * stage_elems;
    const int vectors = len / VEC;  // VEC divides len on the vector path (N % VEC == 0)
    for (int it = tid; it < p.rows * vectors; it += kThreads) {
      const int r = it / vectors, v = it - r * vectors;
      const scalar_t* row = r < p.parents ? parents + r * p.numel : grad + (r - p.parents) * p.numel;
      const scalar_t* src = row + start + v * VEC;
      copy_to_shared<VEC * sizeof(scalar_t)>(buf + r * p.row_stride + v * VEC, src);
    }
    // Zero the rest of a partial last dot chunk so the dot loop needs no bounds (plain stores to
    // addresses no copy writes; published by the barrier before the tile is read).
    const int pad = (DV - len % DV) % DV;
    for (int it = tid; it < p.rows * pad; it += kThreads) {
      buf[(it / pad) * p.row_stride + len + it % pad] = static_cast<scalar_t>(0.0f);
    }
  };

  // Prologue: the first S - 1 tiles are in flight while the children lists are built. One commit per
  // slot, even when empty, keeps the wait_group arithmetic uniform.
  for (int k = 0; k < p.stages - 1; ++k) {
    if (k < ntiles) stage(k);
    cp_async_commit();
  }
  for (int i = tid; i < p.parents; i += kThreads) list_children(i, index, p.parents, p.children, offsets, order);

  const bool active = tid < p.pair_blocks * p.lanes;
  const int pair_block = active ? tid / p.lanes : 0;
  const int lane = active ? tid - pair_block * p.lanes : 0;
  const int i0 = (pair_block / p.groups_j) * p.group_i;
  const int j0 = (pair_block % p.groups_j) * p.group_j;
  const int bi = active ? min(p.group_i, p.parents - i0) : 0;
  const int bj = active ? min(p.group_j, p.children - j0) : 0;
  acc_t acc[MI][MJ];
#pragma unroll
  for (int a = 0; a < MI; ++a) {
#pragma unroll
    for (int b = 0; b < MJ; ++b) acc[a][b] = acc_t(0);
  }

  for (int k = 0; k < ntiles; ++k) {
    // Stage (k - 1) % S was released by the barrier that ended iteration k - 1.
    if (k + p.stages - 1 < ntiles) stage(k + p.stages - 1);
    cp_async_commit();
    if (p.stages == 3) {
      cp_async_wait<2>();
    } else {
      cp_async_wait<1>();
    }
    __syncthreads();  // tile k (and, on k == 0, the children lists) visible to every thread

    const scalar_t* buf = tiles + (k % p.stages) * stage_elems;
    const int64_t start = (tile_begin + k) * p.tile;
    const int len = static_cast<int>(std::min<int64_t>(p.tile, p.numel - start));

    // grad_parents[i] over this tile: the children of i summed in increasing j (as the CPU path).
    const int vectors = len / VEC;
    for (int it = tid; it < p.parents * vectors; it += kThreads) {
      const int i = it / vectors, e = (it - i * vectors) * VEC;
      const int first = offsets[i], last = offsets[i + 1];
      Vec<scalar_t, VEC> out;
      if (first == last) {
#pragma unroll
        for (int d = 0; d < VEC; ++d) out.v[d] = static_cast<scalar_t>(0.0f);
      } else {
        acc_t sum[VEC];
        const scalar_t* child = buf + (p.parents + order[first]) * p.row_stride + e;
        const auto g0 = *reinterpret_cast<const Vec<scalar_t, VEC>*>(child);
#pragma unroll
        for (int d = 0; d < VEC; ++d) sum[d] = to_acc<acc_t>(g0.v[d]);
        for (int m = first + 1; m < last; ++m) {
          const auto g = *reinterpret_cast<const Vec<scalar_t, VEC>*>(buf + (p.parents + order[m]) * p.row_stride + e);
#pragma unroll
          for (int d = 0; d < VEC; ++d) sum[d] += to_acc<acc_t>(g.v[d]);
        }
#pragma unroll
        for (int d = 0; d < VEC; ++d) out.v[d] = static_cast<scalar_t>(sum[d]);
      }
      *reinterpret_cast<Vec<scalar_t, VEC>*>(grad_parents + i * p.numel + start + e) = out;
    }

    // G over this tile for this thread's pair block (no barrier inside).
    if (active) {
      const int chunks = (len + DV - 1) / DV;
      for (int c = lane; c < chunks; c += p.lanes) {
        const int e = c * DV;
        acc_t g[MJ][DV];
#pragma unroll
        for (int b = 0; b < MJ; ++b) {
          if (b < bj) {
            const auto v = *reinterpret_cast<const Vec<scalar_t, DV>*>(buf + (p.parents + j0 + b) * p.row_stride + e);
#pragma unroll
            for (int d = 0; d < DV; ++d) g[b][d] = to_acc<acc_t>(v.v[d]);
          } else {
#pragma unroll
            for (int d = 0; d < DV; ++d) g[b][d] = acc_t(0);
          }
        }
#pragma unroll
        for (int a = 0; a < MI; ++a) {
          if (a < bi) {
            const auto y = *reinterpret_cast<const Vec<scalar_t, DV>*>(buf + (i0 + a) * p.row_stride + e);
#pragma unroll
            for (int d = 0; d < DV; ++d) {
              const acc_t yd = to_acc<acc_t>(y.v[d]);
#pragma unroll
              for (int b = 0; b < MJ; ++b) acc[a][b] += yd * g[b][d];
            }
          }
        }
      }
    }
    __syncthreads();  // every thread is done with stage k % S before it is refilled
  }
  cp_async_wait<0>();  // only empty groups can be left; keeps the aliasing below obviously safe
  __syncthreads();

  // Lane reduction in rounds of reduce_slots accumulators: red[slot * kThreads + tid].
  const int64_t blocks = gridDim.x;
  constexpr int kPairs = MI * MJ;
  for (int q0 = 0; q0 < kPairs; q0 += p.reduce_slots) {
    const int slots = min(p.reduce_slots, kPairs - q0);
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      if (q >= q0 && q < q0 + slots) red[(q - q0) * kThreads + tid] = acc[q / MJ][q % MJ];
    }
    __syncthreads();
    for (int stride = p.lanes_pow2 / 2; stride > 0; stride >>= 1) {
      if (active && lane < stride && lane + stride < p.lanes) {
        for (int s = 0; s < slots; ++s) red[s * kThreads + tid] += red[s * kThreads + tid + stride];
      }
      __syncthreads();
    }
    if (active && lane == 0) {
      for (int s = 0; s < slots; ++s) {
        const int q = q0 + s, a = q / MJ, b = q % MJ;
        if (a < bi && b < bj) {
          const int64_t pair = static_cast<int64_t>(i0 + a) * p.children + (j0 + b);
          partials[pair * blocks + blockIdx.x] = red[s * kThreads + tid];
        }
      }
    }
    __syncthreads();  // red is rewritten by the next round
  }
}

// Fallback segment sum (see branch_backward_cuda): one thread per element of grad_parents[i].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const scalar_t* __restrict__ grad, const int* __restrict__ offsets,
                       const int* __restrict__ order, scalar_t* __restrict__ grad_parents, int parents, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.y; i < parents; i += gridDim.y) {
    const int first = offsets[i], last = offsets[i + 1];
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; n < numel;
         n += static_cast<int64_t>(gridDim.x) * kThreads) {
      acc_t sum = acc_t(0);
      if (first < last) {
        sum = to_acc<acc_t>(grad[order[first] * numel + n]);
        for (int m = first + 1; m < last; ++m) sum += to_acc<acc_t>(grad[order[m] * numel + n]);
      }
      grad_parents[i * numel + n] = static_cast<scalar_t>(sum);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    list_children_kernel(const int64_t* __restrict__ index, int parents, int children, int* offsets, int* order) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < parents) list_children(i, index, parents, children, offsets, order);
}

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

// Shared-memory plan of the fused kernel: largest tile T (then deepest pipeline) that fits the budget.
// Returns false when even T = 8 with two stages does not fit (too many rows).
template <typename scalar_t>
bool plan_tiles(int parents, int children, FusedParams& p, size_t& smem_bytes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = int64_t{parents} + children;
  const int64_t pad = 16 / static_cast<int64_t>(sizeof(scalar_t));  // keeps every row 16-byte aligned
  const int64_t lists = (int64_t{parents} + 1 + children) * static_cast<int64_t>(sizeof(int));
  for (int tile = 256; tile >= 8; tile /= 2) {
    for (int stages = 3; stages >= 2; --stages) {
      int64_t data = stages * rows * (tile + pad) * static_cast<int64_t>(sizeof(scalar_t));
      data = std::max<int64_t>(data, kThreads * static_cast<int64_t>(sizeof(acc_t)));
      data = (data + 15) / 16 * 16;
      if (data + lists <= static_cast<int64_t>(kSmemBudget)) {
        p.tile = tile;
        p.row_stride = static_cast<int>(tile + pad);
        p.stages = stages;
        p.data_bytes = static_cast<int>(data);
        p.reduce_slots = static_cast<int>(data / (kThreads * static_cast<int64_t>(sizeof(acc_t))));
        smem_bytes = static_cast<size_t>(data + lists);
        return true;
      }
    }
  }
  return false;
}

// Pair blocks of at most m x m pairs; false if there are more blocks than threads.
bool plan_pairs(int parents, int children, int m, FusedParams& p) {
  const int groups_i = (parents + m - 1) / m, groups_j = (children + m - 1) / m;
  // Balanced group sizes (5 parents -> 3 + 2, not 4 + 1); every group is non-empty.
  p.group_i = (parents + groups_i - 1) / groups_i;
  p.group_j = (children + groups_j - 1) / groups_j;
  p.groups_j = (children + p.group_j - 1) / p.group_j;
  p.pair_blocks = ((parents + p.group_i - 1) / p.group_i) * p.groups_j;
  p.lanes = std::max(1, kThreads / p.pair_blocks);
  p.lanes_pow2 = 1;
  while (p.lanes_pow2 < p.lanes) p.lanes_pow2 *= 2;
  return p.pair_blocks <= kThreads;
}

template <typename scalar_t, int M>
void launch_fused(const at::Tensor& grad, const at::Tensor& parents, const at::Tensor& index,
                  at::Tensor& grad_parents, FusedParams p, size_t smem_bytes, at::Tensor& partials,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorised = p.numel % kVec == 0 && aligned16(grad.data_ptr()) && aligned16(parents.data_ptr()) &&
                          aligned16(grad_parents.data_ptr());
  auto kernel = vectorised ? &branch_backward_fused_kernel<scalar_t, kVec, M, M>
                           : &branch_backward_fused_kernel<scalar_t, 1, M, M>;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes));
  // One full wave of blocks, each streaming a contiguous run of tiles (no empty block).
  p.num_tiles = (p.numel + p.tile - 1) / p.tile;
  int64_t blocks = std::min<int64_t>(p.num_tiles, int64_t{multiprocessor_count()} * std::max(per_sm, 1));
  p.tiles_per_block = (p.num_tiles + blocks - 1) / blocks;
  blocks = (p.num_tiles + p.tiles_per_block - 1) / p.tiles_per_block;
  partials = at::empty({int64_t{p.parents} * p.children, blocks},
                       grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(
      grad.data_ptr<scalar_t>(), parents.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
      grad_parents.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// param_t: dtype of parents and grad (scalar_t is taken by the dispatch over soft's dtype below).
template <typename param_t>
void branch_backward_impl(const at::Tensor& grad, const at::Tensor& parents, const at::Tensor& index,
                          const at::Tensor& soft, double tau, at::Tensor& grad_parents, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<param_t>;
  const int num_parents = static_cast<int>(parents.size(0)), children = static_cast<int>(index.size(0));
  const int64_t numel = parents.numel() / num_parents;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;

  at::Tensor partials;  // [I * J, blocks] pair-major partial dot products
  if (numel == 0) {
    partials = at::empty({int64_t{num_parents} * children, 0}, grad.options().dtype(acc_type));
  } else {
    FusedParams p{};
    p.parents = num_parents;
    p.children = children;
    p.rows = num_parents + children;
    p.numel = numel;
    size_t smem_bytes = 0;
    // Small pair blocks (4 x 4; 2 x 2 in fp64) keep registers low: occupancy for the bandwidth-bound
    // shapes with few pairs. Large ones (8 x 8; 4 x 4 in fp64) halve the shared-memory reads per
    // multiply-add when there are many pairs. Both sizes fit their register budget without spills.
    constexpr int kSmall = sizeof(acc_t) == 8 ? 2 : 4;
    const int64_t small_blocks = int64_t{(num_parents + kSmall - 1) / kSmall} * ((children + kSmall - 1) / kSmall);
    const bool small = small_blocks <= 16;
    const bool fused = int64_t{num_parents} * children <= kMaxFusedPairs &&
                       plan_tiles<param_t>(num_parents, children, p, smem_bytes) &&
                       plan_pairs(num_parents, children, small ? kSmall : 2 * kSmall, p);
    if (fused) {
      if (small) {
        launch_fused<param_t, kSmall>(grad, parents, index, grad_parents, p, smem_bytes, partials, stream);
      } else {
        launch_fused<param_t, 2 * kSmall>(grad, parents, index, grad_parents, p, smem_bytes, partials, stream);
      }
    } else {
      // Fallback for shapes the fused kernel does not take (more than kMaxFusedPairs pairs, too many
      // rows for one shared-memory tile, more pair blocks than threads): G from a GEMM in acc_t over
      // the flat [rows, N] views, the segment sum from deterministic on-device children lists.
      // Correct, slower (several passes; the GEMM may use TF32 if the user allows it for fp32).
      const at::Tensor parents_flat = parents.as_strided({num_parents, numel}, {numel, 1}).to(acc_type);
      const at::Tensor grad_flat = grad.as_strided({children, numel}, {numel, 1}).to(acc_type);
      partials = at::mm(parents_flat, grad_flat.t()).contiguous().view({int64_t{num_parents} * children, 1});
      at::Tensor lists = at::empty({int64_t{num_parents} + 1 + children}, index.options().dtype(at::kInt));
      int* offsets = lists.data_ptr<int>();
      list_children_kernel<<<static_cast<unsigned>((num_parents + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          index.data_ptr<int64_t>(), num_parents, children, offsets, offsets + num_parents + 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t chunks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{1} << 16);
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(num_parents, 65535)));
      segment_sum_kernel<param_t><<<grid, kThreads, 0, stream>>>(grad.data_ptr<param_t>(), offsets,
                                                                 offsets + num_parents + 1,
                                                                 grad_parents.data_ptr<param_t>(), num_parents,
                                                                 numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  at::Tensor col_dots = at::empty({int64_t{children}, num_parents}, grad.options().dtype(at::kDouble));
  const at::Tensor soft_c = soft.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, soft.scalar_type(), "branch_backward_cuda_logits", [&] {
    softmax_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(children), kThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), partials.size(1), soft_c.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        col_dots.data_ptr<double>(), num_parents, children, tau, grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> branch_backward_cuda(const at::Tensor& grad_out, const at::Tensor& parents,
                                                        const at::Tensor& index, const at::Tensor& soft, const at::Tensor& tau) {
  check_branch_inputs(parents, index, soft);
  check_tau_tensor(tau, parents.device());
  TORCH_CHECK_VALUE(grad_out.device() == parents.device(), "l2b_fast: grad_out is on ", grad_out.device(),
                    " but parents are on ", parents.device());
  const int64_t num_parents = parents.size(0), children = index.size(0);
  TORCH_CHECK_VALUE(num_parents < INT_MAX && children < INT_MAX, "l2b_fast: too many parents or children");
  const c10::cuda::CUDAGuard guard(parents.device());
  const at::Tensor grad = grad_in_children_layout(grad_out, parents);
  const at::Tensor index_c = index.contiguous();
  at::Tensor grad_parents = at::empty_like(parents);
  at::Tensor grad_logits = at::empty({num_parents, children}, soft.options());
  if (children == 0) {
    grad_parents.zero_();  // no child sampled any parent
    return {grad_parents, grad_logits};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parents.scalar_type(), "branch_backward_cuda", [&] {
    branch_backward_impl<scalar_t>(grad, parents, index_c, soft, tau, grad_parents, grad_logits);
  });
  return {grad_parents, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(l2b_fast, CUDA, m) {
  m.impl("straight_through_branch", &straight_through_branch_cuda);
  m.impl("branch_backward", &branch_backward_cuda);
}

}  // namespace l2b_fast
