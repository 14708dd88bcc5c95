// A CPU emulation of the CUDA features the fused backward uses, so its device code
// (csrc/cuda/branch_backward_kernels.cuh) compiles as plain C++ and runs without a GPU:
//
// - every thread of a block is an OS thread; __syncthreads() is a std::barrier of the block;
// - blocks run one after another (they never communicate); grids have x and y dimensions;
// - dynamic shared memory is one buffer per block, filled with a garbage pattern first, so a read of a
//   byte no copy wrote shows up as a wrong result;
// - cp.async copies are queued per thread in commit groups and land when the thread's wait_group lets
//   them (CopyTiming::at_wait, the latest the hardware may), when they are issued (at_issue, the
//   earliest), or at a random point between (random): a read before its wait, or a refill of a stage
//   other threads still read, gives wrong results under one of the timings.
//
// Include this before the kernels with L2B_CUDA_EMULATION defined.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace l2b_emu {

enum class CopyTiming { at_wait = 0, at_issue = 1, random = 2 };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Block {
  std::barrier<>* barrier;
  unsigned char* shared;
};

struct ThreadState {
  dim3 thread_idx, block_idx;
  Block* block = nullptr;
  CopyTiming timing = CopyTiming::at_wait;
  std::minstd_rand random;
  std::vector<Copy> open;               // issued, not yet committed
  std::deque<std::vector<Copy>> groups; // committed, not yet waited for
};

inline thread_local ThreadState state;
inline dim3 grid_dim;

inline void syncthreads() { state.block->barrier->arrive_and_wait(); }

inline void land(const Copy& copy) { std::memcpy(copy.dst, copy.src, static_cast<size_t>(copy.bytes)); }

inline void cp_async(void* dst, const void* src, int bytes) {
  const bool now = state.timing == CopyTiming::at_issue ||
                   (state.timing == CopyTiming::random && (state.random() & 1u) != 0);
  if (now) {
    land({dst, src, bytes});
  } else {
    state.open.push_back({dst, src, bytes});
  }
}

inline void cp_async_commit() {
  state.groups.push_back(std::move(state.open));
  state.open.clear();
}

inline void cp_async_wait(int pending) {
  while (static_cast<int>(state.groups.size()) > pending) {
    for (const Copy& copy : state.groups.front()) land(copy);
    state.groups.pop_front();
  }
}

// Runs kernel(args...) on a grid.x x grid.y grid of `threads`-thread blocks with `smem` bytes of
// dynamic shared memory. Throws if a thread ends with copies still in flight.
template <typename Kernel, typename... Args>
void launch(dim3 grid, unsigned threads, size_t smem, CopyTiming timing, Kernel kernel, Args... args) {
  grid_dim = grid;
  const size_t shared_bytes = (smem + 15) / 16 * 16 + 16;
  std::unique_ptr<unsigned char, decltype(&std::free)> shared(
      static_cast<unsigned char*>(std::aligned_alloc(16, shared_bytes)), &std::free);
  std::mutex error_mutex;
  std::string error;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(shared.get(), 0xCD, shared_bytes);
      std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
      Block block{&barrier, shared.get()};
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          state = ThreadState{};
          state.thread_idx = dim3{t, 0, 0};
          state.block_idx = dim3{bx, by, 0};
          state.block = &block;
          state.timing = timing;
          state.random.seed(1 + t + 7919u * (bx + 104729u * by));
          kernel(args...);
          if (!state.open.empty() || !state.groups.empty()) {
            const std::lock_guard<std::mutex> lock(error_mutex);
            error = "cp.async copies still in flight when a thread exited";
          }
        });
      }
      for (std::thread& thread : pool) thread.join();
      if (!error.empty()) throw std::runtime_error(error);
    }
  }
}

}  // namespace l2b_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::l2b_emu::state.thread_idx)
#define blockIdx (::l2b_emu::state.block_idx)
#define gridDim (::l2b_emu::grid_dim)
#define __syncthreads() ::l2b_emu::syncthreads()
#define L2B_DYNAMIC_SHARED(name) unsigned char* name = ::l2b_emu::state.block->shared
