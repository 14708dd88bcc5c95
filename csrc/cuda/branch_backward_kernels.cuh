// Device code of the fused straight-through backward and its launch planning, shared by the CUDA
// build (csrc/cuda/branch_cuda.cu) and the CPU emulator of the CUDA kernels (tools/cuda_emulator), which
// compiles this file as plain C++ with L2B_CUDA_EMULATION defined (threads, barriers, shared memory and
// cp.async groups emulated) to check every path against the reference without a GPU.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(L2B_CUDA_EMULATION)
#include <cuda_runtime.h>
#define L2B_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace l2b_fast {
namespace backward {

constexpr int kThreads = 256;
// At most this many (parent, child) pairs per fused launch; larger blocks run as groups (plan_groups).
constexpr int64_t kMaxFusedPairs = 2048;
// Tiles are capped in bytes, not elements, so every dtype moves the same bytes between barriers
// (256 fp32, 512 bf16/fp16, 128 fp64 elements per row), unless one round of lanes needs more.
constexpr int64_t kTileBytes = 1024;
// Shared memory a launch may always use without the opt-in attribute.
constexpr size_t kDefaultSmem = 48 * 1024;

// A run of V elements moved as one load / store (V * sizeof(T) bytes, naturally aligned).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(x);
}

// One 16-byte store (STG.E.128) for a full vector. A plain struct or uint4 store is not enough: the
// register allocator left the sums in non-adjacent registers and ptxas split the store into 4 (fp32)
// or 8 (bf16) narrow ones (SASS of sm_90), a third of the backward's traffic in narrow transactions.
// The PTX vector store makes the four 32-bit words one operand.
template <typename T, int V>
__device__ __forceinline__ void store_vector(T* dst, const Vec<T, V>& value) {
  if constexpr (sizeof(T) * V == 16) {
    uint4 bits;
    std::memcpy(&bits, &value, 16);
#if defined(__CUDA_ARCH__)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(bits.x), "r"(bits.y), "r"(bits.z),
                 "r"(bits.w)
                 : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = bits;
#endif
  } else {
    *reinterpret_cast<Vec<T, V>*>(dst) = value;
  }
}

// Children of parent i in increasing order: offsets[i] = #{j : 0 <= index[j] < i}, then the matching j.
// O(J) per parent with no prefix sum or atomics, so any number of threads can fill the lists at once
// and the order (hence the summation order) is fixed. Out-of-range children are in no list.
__device__ inline void list_children(int i, const int64_t* __restrict__ index, int parents, int children, int* offsets,
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
#if defined(L2B_CUDA_EMULATION)
  if constexpr (Bytes >= 4) {
    ::l2b_emu::cp_async(dst, src, Bytes);  // lands only at the matching wait_group, as on the GPU at worst
    return;
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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
#if defined(L2B_CUDA_EMULATION)
  ::l2b_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(L2B_CUDA_EMULATION)
  ::l2b_emu::cp_async_wait(pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// Launch geometry of the fused kernel, computed on the host (plan_fused, plan_grid).
struct FusedParams {
  int parents, children, rows;  // I, J, I + J (of this launch: a group of the block, see plan_groups)
  int64_t numel;                // N, elements per row
  int tile, row_stride, stages; // T elements per tile; shared row stride (T + 16 bytes); pipeline depth
  int64_t num_tiles, tiles_per_block;
  int group_i, group_j, groups_j;  // pair block = group_i parents x group_j children
  int pair_blocks, lanes, lanes_pow2;
  int reduce_slots;          // accumulators reduced per round (shared memory holds slots x kThreads)
  int data_bytes;            // start of the children lists in shared memory
  bool write_grad_parents;   // false: dot products only (no parents gradient wanted, or a group)
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
  L2B_DYNAMIC_SHARED(smem);
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
  if (p.write_grad_parents) {
    for (int i = tid; i < p.parents; i += kThreads) list_children(i, index, p.parents, p.children, offsets, order);
  }

  const bool active = tid < p.pair_blocks * p.lanes;
  const int pair_block = active ? tid / p.lanes : 0;
  const int lane = active ? tid - pair_block * p.lanes : 0;
  const int i0 = (pair_block / p.groups_j) * p.group_i;
  const int j0 = (pair_block % p.groups_j) * p.group_j;
  const int bi = active ? std::min(p.group_i, p.parents - i0) : 0;
  const int bj = active ? std::min(p.group_j, p.children - j0) : 0;
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
    const int vectors = p.write_grad_parents ? len / VEC : 0;
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
      store_vector(grad_parents + i * p.numel + start + e, out);
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
    const int slots = std::min(p.reduce_slots, kPairs - q0);
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


// Segment sum alone (no logits gradient wanted, e.g. frozen logits): one thread per VEC elements of
// grad_parents[i] (16-byte loads and stores when VEC > 1: numel % VEC == 0, aligned rows), children summed
// in increasing j as in the fused kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const scalar_t* __restrict__ grad, const int* __restrict__ offsets,
                       const int* __restrict__ order, scalar_t* __restrict__ grad_parents, int parents, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t vectors = numel / VEC;
  for (int64_t i = blockIdx.y; i < parents; i += gridDim.y) {
    const int first = offsets[i], last = offsets[i + 1];
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vectors;
         v += static_cast<int64_t>(gridDim.x) * kThreads) {
      acc_t sum[VEC];
#pragma unroll
      for (int d = 0; d < VEC; ++d) sum[d] = acc_t(0);
      for (int m = first; m < last; ++m) {
        const auto g = *reinterpret_cast<const Vec<scalar_t, VEC>*>(grad + order[m] * numel + v * VEC);
#pragma unroll
        for (int d = 0; d < VEC; ++d) sum[d] = m == first ? to_acc<acc_t>(g.v[d]) : sum[d] + to_acc<acc_t>(g.v[d]);
      }
      Vec<scalar_t, VEC> out;
#pragma unroll
      for (int d = 0; d < VEC; ++d) out.v[d] = static_cast<scalar_t>(sum[d]);
      store_vector(grad_parents + i * numel + v * VEC, out);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    list_children_kernel(const int64_t* __restrict__ index, int parents, int children, int* offsets, int* order) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < parents) list_children(i, index, parents, children, offsets, order);
}

// ------------------------------------------------------------------------------------------------
// Host planning (plain C++, shared with the emulator).

// Dot-product chunk of one lane: 16 B (fp32/fp64) or 8 B (16-bit) loads from shared memory.
template <typename scalar_t>
constexpr int dot_chunk() {
  return sizeof(scalar_t) == 8 ? 2 : 4;
}

// Pair blocks of at most m x m pairs; false if there are more blocks than threads.
inline bool plan_pairs(int parents, int children, int m, FusedParams& p) {
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

// Shared-memory plan: the largest tile T (then the deepest pipeline) within smem_budget bytes, T a whole
// number of rounds of the lanes (every lane takes the same number of dot chunks per tile, so no lane
// idles on a partial round) and at most kTileBytes per row unless one round needs more. If not even
// one round fits, the largest T that fits (partial rounds). False when nothing fits (too many rows).
template <typename scalar_t>
bool plan_tiles(size_t smem_budget, FusedParams& p, size_t& smem_bytes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t element = sizeof(scalar_t), vec = 16 / element;
  const int64_t rows = p.rows, pad = vec;  // the pad keeps every row 16-byte aligned
  const int64_t lists = (int64_t{p.parents} + 1 + p.children) * static_cast<int64_t>(sizeof(int));
  const auto fits = [&](int64_t tile, int stages) {
    int64_t data = stages * rows * (tile + pad) * element;
    data = std::max<int64_t>(data, kThreads * static_cast<int64_t>(sizeof(acc_t)));
    data = (data + 15) / 16 * 16;
    if (data + lists > static_cast<int64_t>(smem_budget)) return false;
    p.tile = static_cast<int>(tile);
    p.row_stride = static_cast<int>(tile + pad);
    p.stages = stages;
    p.data_bytes = static_cast<int>(data);
    p.reduce_slots = static_cast<int>(data / (kThreads * static_cast<int64_t>(sizeof(acc_t))));
    smem_bytes = static_cast<size_t>(data + lists);
    return true;
  };
  const int64_t round = std::lcm(int64_t{p.lanes} * dot_chunk<scalar_t>(), vec);
  const int64_t cap = std::max(kTileBytes / element, round);
  for (int64_t tile = cap / round * round; tile >= round; tile -= round) {
    for (int stages = 3; stages >= 2; --stages) {
      if (fits(tile, stages)) return true;
    }
  }
  for (int64_t tile = (round - 1) / vec * vec; tile >= std::max<int64_t>(vec, 8); tile -= vec) {
    for (int stages = 3; stages >= 2; --stages) {
      if (fits(tile, stages)) return true;
    }
  }
  return false;
}

// Pair-block size of a launch: small blocks (4 x 4; 2 x 2 in fp64) keep registers low, occupancy for
// the bandwidth-bound shapes with few pairs; large ones (8 x 8; 4 x 4 in fp64) halve the shared-memory
// reads per multiply-add when there are many pairs.
template <typename scalar_t>
constexpr int small_pair_block() {
  return sizeof(at::opmath_type<scalar_t>) == 8 ? 2 : 4;
}

// Tile and pair plan of one launch over `parents` x `children` rows; pair_m receives the pair-block
// size the kernel must be instantiated with (small_pair_block or twice it). False if it does not fit.
template <typename scalar_t>
bool plan_fused(int parents, int children, int64_t numel, bool write_grad_parents, size_t smem_budget,
                FusedParams& p, size_t& smem_bytes, int& pair_m) {
  if (int64_t{parents} * children > kMaxFusedPairs) return false;
  p = FusedParams{};
  p.parents = parents;
  p.children = children;
  p.rows = parents + children;
  p.numel = numel;
  p.write_grad_parents = write_grad_parents;
  constexpr int kSmall = small_pair_block<scalar_t>();
  const int64_t small_blocks = int64_t{(parents + kSmall - 1) / kSmall} * ((children + kSmall - 1) / kSmall);
  pair_m = small_blocks <= 16 ? kSmall : 2 * kSmall;
  return plan_pairs(parents, children, pair_m, p) && plan_tiles<scalar_t>(smem_budget, p, smem_bytes);
}

// Grid of a launch: one full wave of blocks (SMs x resident blocks per SM), each streaming a contiguous
// run of tiles (no empty block). Returns the number of blocks.
inline int64_t plan_grid(FusedParams& p, int sm_count, int blocks_per_sm) {
  p.num_tiles = (p.numel + p.tile - 1) / p.tile;
  int64_t blocks = std::min<int64_t>(p.num_tiles, int64_t{sm_count} * std::max(blocks_per_sm, 1));
  p.tiles_per_block = (p.num_tiles + blocks - 1) / blocks;
  return (p.num_tiles + p.tiles_per_block - 1) / p.tiles_per_block;
}

// Blocks of parents x children too large for one launch (more than kMaxFusedPairs pairs, or more rows
// than shared memory holds) are split into groups of at most group_parents x group_children, each a
// dots-only launch of the fused kernel over its own rows; the segment sum then runs on its own.
// Groups halve the larger side until one plans. False if not even 1 x 1 fits (cannot happen with the
// default budget).
template <typename scalar_t>
bool plan_groups(int parents, int children, int64_t numel, size_t smem_budget, int& group_parents,
                 int& group_children) {
  group_parents = parents;
  group_children = children;
  FusedParams p;
  size_t smem = 0;
  int m = 0;
  while (!plan_fused<scalar_t>(group_parents, group_children, numel, false, smem_budget, p, smem, m)) {
    if (group_parents == 1 && group_children == 1) return false;
    if (group_parents >= group_children) {
      group_parents = (group_parents + 1) / 2;
    } else {
      group_children = (group_children + 1) / 2;
    }
  }
  return true;
}

// Resident blocks per SM of each (device, kernel, smem), and the opt-in dynamic shared-memory attribute
// (cudaFuncAttributeMaxDynamicSharedMemorySize) of each (device, kernel). The attribute belongs to the kernel,
// not to one launch: it is only ever raised, to the largest smem a launch of that kernel has needed. Setting it
// to each launch's own smem would let a smaller launch (a 46 x 46 block's 95 KB groups) lower it below what a
// larger combination planned and cached earlier (30 x 40: 110 KB) still launches with, which CUDA then rejects;
// a captured CUDA graph replaying the larger launch needs it to stay raised too.
// Runtime provides set_max_dynamic_smem(kernel, bytes) (for the current device; throws on failure) and
// occupancy(kernel, threads, smem) -> blocks per SM: the CUDA runtime in branch_cuda.cu, a fake in the emulator.
class LaunchCache {
 public:
  template <typename Runtime>
  int blocks_per_sm(Runtime& runtime, int device, const void* kernel, size_t smem) {
    const std::lock_guard<std::mutex> lock(mutex_);
    size_t& attribute = attributes_[std::make_pair(device, kernel)];  // 0: never set (kDefaultSmem applies)
    if (smem > std::max(attribute, kDefaultSmem)) {
      runtime.set_max_dynamic_smem(kernel, smem);
      attribute = smem;  // after the call: a failed one leaves the record as the kernel's attribute is
    }
    const auto key = std::make_tuple(device, kernel, smem);
    const auto found = occupancy_.find(key);
    if (found != occupancy_.end()) return found->second;
    return occupancy_.emplace(key, std::max(runtime.occupancy(kernel, kThreads, smem), 1)).first->second;
  }

  // The attribute this cache has set for (device, kernel); 0 if none (launches get kDefaultSmem).
  size_t attribute(int device, const void* kernel) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = attributes_.find(std::make_pair(device, kernel));
    return found == attributes_.end() ? 0 : found->second;
  }

 private:
  std::mutex mutex_;
  std::map<std::pair<int, const void*>, size_t> attributes_;
  std::map<std::tuple<int, const void*, size_t>, int> occupancy_;
};

}  // namespace backward
}  // namespace l2b_fast
