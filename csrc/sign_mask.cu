// ReLU sign masks: pack the on/off status (x > 0) of every element into int32 words,
// and count the elements whose status agrees with a packed reference.
//
// Layout (same as fasttangent/kernels/sign_mask.py): bit b of word w is the status of
// flat element 32 w + b; the last word is zero padded.
//
// Each warp lane loads 16 bytes (E = 4 fp32 or 8 bf16/fp16 elements), so a warp covers
// 32 E elements, i.e. E whole words, per step. A lane's E status bits are bits
// E * (lane % L) .. of word lane / L, where L = 32 / E lanes share one word.
#include "kernel_prelude.h"

namespace fasttangent {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kChunksPerStep = 4;  // chunks a warp loads before using them: more bytes in flight
constexpr int kBlocksPerSm = 8;
constexpr unsigned kFullMask = 0xffffffffu;

template <ElementType T>
struct Element;

template <>
struct Element<ElementType::kFloat32> {
  using Raw = float;
  static constexpr int kPerLane = 4;
  __device__ static bool on(Raw v) { return v > 0.0f; }
};

template <>
struct Element<ElementType::kBFloat16> {
  using Raw = unsigned short;
  static constexpr int kPerLane = 8;
  // bf16 is the top half of an fp32, so the shift is an exact conversion
  __device__ static bool on(Raw v) { return __uint_as_float(static_cast<unsigned>(v) << 16) > 0.0f; }
};

template <>
struct Element<ElementType::kFloat16> {
  using Raw = unsigned short;
  static constexpr int kPerLane = 8;
  __device__ static bool on(Raw v) { return __half2float(__ushort_as_half(v)) > 0.0f; }
};

// Status bits of the kPerLane elements starting at `first` (0 beyond `numel`).
// `whole` says the chunk is in range and aligned, so one 16-byte load reads it.
template <ElementType T>
__device__ __forceinline__ unsigned lane_bits(const void* x, int64_t first, int64_t numel, bool whole) {
  using E = Element<T>;
  const auto* raw = static_cast<const typename E::Raw*>(x);
  unsigned bits = 0;
  if (whole) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(raw + first));
    const typename E::Raw* vals = reinterpret_cast<const typename E::Raw*>(&v);
#pragma unroll
    for (int j = 0; j < E::kPerLane; ++j) bits |= static_cast<unsigned>(E::on(vals[j])) << j;
  } else {
#pragma unroll
    for (int j = 0; j < E::kPerLane; ++j) {
      if (first + j < numel) bits |= static_cast<unsigned>(E::on(raw[first + j])) << j;
    }
  }
  return bits;
}

struct ChunkGrid {
  int64_t warp, num_warps, num_chunks;
};

template <ElementType T>
__device__ __forceinline__ ChunkGrid chunk_grid(int64_t numel) {
  constexpr int64_t kChunk = 32 * Element<T>::kPerLane;
  ChunkGrid g;
  g.warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  g.num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  g.num_chunks = (numel + kChunk - 1) / kChunk;
  return g;
}

template <ElementType T>
__global__ void __launch_bounds__(kThreads) pack_signs_kernel(const void* __restrict__ x, int64_t numel,
                                                              int32_t* __restrict__ words, bool vector_ok) {
  constexpr int kE = Element<T>::kPerLane;
  constexpr int kLanesPerWord = 32 / kE;
  constexpr int64_t kChunk = 32 * kE;
  const int lane = threadIdx.x & 31;
  const int64_t num_words = (numel + 31) / 32;
  const ChunkGrid g = chunk_grid<T>(numel);
  // the loop bounds depend on the warp only, so every lane joins the shuffles below
  for (int64_t base = g.warp; base < g.num_chunks; base += g.num_warps * kChunksPerStep) {
    unsigned bits[kChunksPerStep];
#pragma unroll
    for (int u = 0; u < kChunksPerStep; ++u) {
      const int64_t chunk = base + u * g.num_warps;
      const bool whole = vector_ok && (chunk + 1) * kChunk <= numel;
      bits[u] = chunk < g.num_chunks ? lane_bits<T>(x, chunk * kChunk + lane * kE, numel, whole) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kChunksPerStep; ++u) {
      const int64_t chunk = base + u * g.num_warps;
      if (chunk >= g.num_chunks) break;
      unsigned word = bits[u] << (kE * (lane % kLanesPerWord));
#pragma unroll
      for (int offset = 1; offset < kLanesPerWord; offset <<= 1) word |= __shfl_xor_sync(kFullMask, word, offset);
      const int64_t w = chunk * kE + lane / kLanesPerWord;
      if (lane % kLanesPerWord == 0 && w < num_words) words[w] = static_cast<int32_t>(word);
    }
  }
}

template <ElementType T>
__global__ void __launch_bounds__(kThreads) count_sign_matches_kernel(const void* __restrict__ x, int64_t numel,
                                                                      const int32_t* __restrict__ packed,
                                                                      unsigned long long* __restrict__ matches,
                                                                      bool vector_ok) {
  constexpr int kE = Element<T>::kPerLane;
  constexpr int kLanesPerWord = 32 / kE;
  constexpr int64_t kChunk = 32 * kE;
  constexpr unsigned kLaneMask = (1u << kE) - 1u;
  const int lane = threadIdx.x & 31;
  const ChunkGrid g = chunk_grid<T>(numel);
  unsigned long long agree = 0;
  for (int64_t base = g.warp; base < g.num_chunks; base += g.num_warps * kChunksPerStep) {
    unsigned bits[kChunksPerStep];
    unsigned ref[kChunksPerStep];
#pragma unroll
    for (int u = 0; u < kChunksPerStep; ++u) {
      const int64_t chunk = base + u * g.num_warps;
      const int64_t first = chunk * kChunk + lane * kE;
      const bool whole = vector_ok && (chunk + 1) * kChunk <= numel;
      const bool live = chunk < g.num_chunks && first < numel;
      bits[u] = live ? lane_bits<T>(x, first, numel, whole) : 0u;
      ref[u] = live ? static_cast<unsigned>(__ldg(packed + first / 32)) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kChunksPerStep; ++u) {
      const int64_t first = (base + u * g.num_warps) * kChunk + lane * kE;
      const int64_t valid = numel - first;  // elements of this lane inside the tensor
      const unsigned valid_mask = valid >= kE ? kLaneMask : (valid > 0 ? (1u << valid) - 1u : 0u);
      const unsigned ref_bits = (ref[u] >> (kE * (lane % kLanesPerWord))) & kLaneMask;
      agree += __popc(~(bits[u] ^ ref_bits) & valid_mask);
    }
  }
  // warp sum, then block sum in shared memory, then one atomic per block
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) agree += __shfl_xor_sync(kFullMask, agree, offset);
  __shared__ unsigned long long warp_sums[kWarpsPerBlock];
  const int warp_in_block = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp_in_block] = agree;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w];
    if (total != 0) atomicAdd(matches, total);
  }
}

#ifndef FASTTANGENT_HOST_SIMULATION  // launches need nvcc
template <ElementType T>
int num_blocks(int64_t numel, int num_sms) {
  constexpr int64_t kChunk = 32 * Element<T>::kPerLane;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  const int64_t warps = (chunks + kChunksPerStep - 1) / kChunksPerStep;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <ElementType T>
cudaError_t pack_typed(const void* x, int64_t numel, int32_t* words, bool vector_ok, int num_sms, cudaStream_t s) {
  pack_signs_kernel<T><<<num_blocks<T>(numel, num_sms), kThreads, 0, s>>>(x, numel, words, vector_ok);
  return cudaGetLastError();
}

template <ElementType T>
cudaError_t count_typed(const void* x, int64_t numel, const int32_t* packed, unsigned long long* matches,
                        bool vector_ok, int num_sms, cudaStream_t s) {
  count_sign_matches_kernel<T><<<num_blocks<T>(numel, num_sms), kThreads, 0, s>>>(x, numel, packed, matches,
                                                                                   vector_ok);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_signs(const void* x, ElementType type, int64_t numel, int32_t* words, bool vector_ok,
                              int num_sms, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (type) {
    case ElementType::kFloat32: return pack_typed<ElementType::kFloat32>(x, numel, words, vector_ok, num_sms, stream);
    case ElementType::kBFloat16: return pack_typed<ElementType::kBFloat16>(x, numel, words, vector_ok, num_sms, stream);
    case ElementType::kFloat16: return pack_typed<ElementType::kFloat16>(x, numel, words, vector_ok, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_count_sign_matches(const void* x, ElementType type, int64_t numel, const int32_t* packed,
                                      unsigned long long* matches, bool vector_ok, int num_sms,
                                      cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (type) {
    case ElementType::kFloat32:
      return count_typed<ElementType::kFloat32>(x, numel, packed, matches, vector_ok, num_sms, stream);
    case ElementType::kBFloat16:
      return count_typed<ElementType::kBFloat16>(x, numel, packed, matches, vector_ok, num_sms, stream);
    case ElementType::kFloat16:
      return count_typed<ElementType::kFloat16>(x, numel, packed, matches, vector_ok, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fasttangent
#else
}  // namespace
}  // namespace fasttangent
#endif  // FASTTANGENT_HOST_SIMULATION
