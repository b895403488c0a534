// Host stand-in for the CUDA subset that csrc/sign_mask.cu and csrc/sym_gram.cu use, so
// their kernels run on CPU threads (g++ -DFASTTANGENT_HOST_SIMULATION='"shim.h"'):
// one std::thread per CUDA thread, blocks one after another (so static storage can act
// as __shared__ memory), std::barrier for __syncthreads and for warp shuffles.
// It checks index logic, bounds and synchronisation order, not speed or memory model.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __ldg(p) (*(p))

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned short __ushort_as_half(unsigned short v) { return v; }
inline float __half2float(unsigned short h) {
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

namespace host_sim {
inline std::barrier<>* block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<unsigned long long> shuffle_slots;
inline std::mutex atomic_mutex;

// Run body() as the kernel's threads over grid x block (blockDim.x a multiple of 32).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> barrier(block.x);
      block_barrier = &barrier;
      warp_barriers.clear();
      for (unsigned w = 0; w < block.x / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
      shuffle_slots.assign(block.x, 0);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&body, t, bx, by, bz] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by, bz);
          body();
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
  }
}
}  // namespace host_sim

inline void __syncthreads() { host_sim::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  host_sim::shuffle_slots[t] = static_cast<unsigned long long>(value);
  host_sim::warp_barriers[warp]->arrive_and_wait();
  const T other = static_cast<T>(host_sim::shuffle_slots[warp * 32 + (lane ^ lane_mask)]);
  host_sim::warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before all read
  return other;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  std::lock_guard<std::mutex> lock(host_sim::atomic_mutex);
  const unsigned long long old = *address;
  *address += value;
  return old;
}
