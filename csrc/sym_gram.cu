// Blocked Gram products with fp32 accumulation: C (+)= A Bᵀ, A (n1, p), B (n2, p).
//
// Both operands are row-major with p contiguous, so A and B tiles load the same way:
// a 128-row x 8-column slice, transposed into shared memory as [k][row]. Each of the
// 256 threads owns an 8 x 8 block of the 128 x 128 output tile (two 4-row groups times
// two 4-column groups, 64 apart, which keeps shared-memory reads free of bank
// conflicts). The next k slice is loaded into registers while the current one is
// multiplied (double-buffered shared memory, one barrier per slice).
//
// Symmetric case (B = A): only tiles with block row <= block column run; an
// off-diagonal tile is written to its place and, transposed, to the mirror place.
// Mirrored entries are bitwise the tile's entries, so C is exactly symmetric.
//
// Split-k (few tiles, long p: the usual NTK shape, n samples << p parameters): block z
// multiplies one k range into its own slice of a workspace, and sum_splits_kernel adds
// the slices in a fixed order, so results stay deterministic and exactly symmetric.
#include "kernel_prelude.h"

#include <algorithm>
#include <cmath>

namespace fasttangent {
namespace {

constexpr int kTile = 128;            // output tile edge
constexpr int kSlice = 8;             // k extent of one shared-memory slice
constexpr int kThreads = 256;         // 16 x 16 threads, 8 x 8 outputs each
constexpr int kSmemStride = kTile + 4;  // padding spreads the transposed stores over banks
constexpr int kHalf = kTile / 2;
constexpr int kBlocksPerSm = 2;         // resident gram blocks per SM (128 registers per thread)
constexpr int64_t kMinSplitK = 256;     // k values per split, so a block still streams a while
constexpr int kMaxSplits = 64;
constexpr int kSumThreads = 256;

template <ElementType T>
struct Operand;

template <>
struct Operand<ElementType::kFloat32> {
  using Raw = float;
  using Vec4 = float4;  // four consecutive elements in one load
  __device__ static float to_float(Raw v) { return v; }
  __device__ static void unpack(const Vec4& v, float (&out)[4]) {
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
};

template <>
struct Operand<ElementType::kBFloat16> {
  using Raw = unsigned short;
  using Vec4 = uint2;
  __device__ static float to_float(Raw v) { return __uint_as_float(static_cast<unsigned>(v) << 16); }
  __device__ static void unpack(const Vec4& v, float (&out)[4]) {
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
  }
};

template <>
struct Operand<ElementType::kFloat16> {
  using Raw = unsigned short;
  using Vec4 = uint2;
  __device__ static float to_float(Raw v) { return __half2float(__ushort_as_half(v)); }
  __device__ static void unpack(const Vec4& v, float (&out)[4]) {
    out[0] = to_float(static_cast<Raw>(v.x & 0xffffu)); out[1] = to_float(static_cast<Raw>(v.x >> 16));
    out[2] = to_float(static_cast<Raw>(v.y & 0xffffu)); out[3] = to_float(static_cast<Raw>(v.y >> 16));
  }
};

// Four consecutive k values of one row, as floats; zeros outside the matrix.
template <ElementType T>
__device__ __forceinline__ void load_row_quad(const void* m, int64_t ld, bool vector_ok, int64_t row,
                                              int64_t rows, int64_t k, int64_t p, float (&out)[4]) {
  using Op = Operand<T>;
  if (row >= rows) {
    out[0] = out[1] = out[2] = out[3] = 0.0f;
    return;
  }
  const typename Op::Raw* ptr = static_cast<const typename Op::Raw*>(m) + row * ld + k;
  if (vector_ok && k + 3 < p) {
    Op::unpack(__ldg(reinterpret_cast<const typename Op::Vec4*>(ptr)), out);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = k + j < p ? Op::to_float(ptr[j]) : 0.0f;
  }
}

// C[row, col .. col + 3] (+)= v, clipped to the matrix.
__device__ __forceinline__ void store_quad(float* c, int64_t ldc, bool vector_ok, int64_t row, int64_t col,
                                           int64_t rows, int64_t cols, bool accumulate, const float (&v)[4]) {
  if (row >= rows) return;
  float* ptr = c + row * ldc + col;
  if (vector_ok && col + 3 < cols) {
    float4 q = make_float4(v[0], v[1], v[2], v[3]);
    if (accumulate) {
      const float4 old = *reinterpret_cast<const float4*>(ptr);
      q.x += old.x; q.y += old.y; q.z += old.z; q.w += old.w;
    }
    *reinterpret_cast<float4*>(ptr) = q;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (col + j < cols) ptr[j] = accumulate ? ptr[j] + v[j] : v[j];
    }
  }
}

// (block row, block column) of upper-triangle tile t, enumerated column by column:
// column j holds tiles t = j (j + 1) / 2 .. j (j + 1) / 2 + j.
__device__ __forceinline__ void upper_tile(int64_t t, int64_t& bi, int64_t& bj) {
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while (j * (j + 1) / 2 > t) --j;  // guard the square root's rounding
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  bj = j;
  bi = t - j * (j + 1) / 2;
}

template <ElementType T, bool kSymmetric>
__global__ void __launch_bounds__(kThreads, 2)
    gram_kernel(const void* __restrict__ a, int64_t lda, bool a_vector_ok, const void* __restrict__ b, int64_t ldb,
                bool b_vector_ok, float* __restrict__ c, int64_t ldc, bool c_vector_ok, int64_t n1, int64_t n2,
                int64_t p, int64_t k_per_split, int64_t split_stride, bool accumulate) {
  __shared__ __align__(16) float a_smem[2][kSlice][kSmemStride];
  __shared__ __align__(16) float b_smem[2][kSlice][kSmemStride];

  int64_t block_row, block_col;
  if (kSymmetric) {
    upper_tile(blockIdx.x, block_row, block_col);
  } else {
    block_row = blockIdx.y;
    block_col = blockIdx.x;
  }
  // split-k: block z multiplies columns [k_begin, k_end) into C + z * split_stride
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < p ? k_begin + k_per_split : p;
  c += static_cast<int64_t>(blockIdx.z) * split_stride;
  const int64_t row0 = block_row * kTile;
  const int64_t col0 = block_col * kTile;

  // loading: thread -> (tile row, first of 4 k values)
  const int load_row = threadIdx.x >> 1;
  const int load_k = (threadIdx.x & 1) * 4;
  // computing: thread -> 4-row groups ty*4 and 64 + ty*4, 4-column groups tx*4 and 64 + tx*4
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  float a_next[4], b_next[4];
  load_row_quad<T>(a, lda, a_vector_ok, row0 + load_row, n1, k_begin + load_k, k_end, a_next);
  load_row_quad<T>(b, ldb, b_vector_ok, col0 + load_row, n2, k_begin + load_k, k_end, b_next);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a_smem[0][load_k + j][load_row] = a_next[j];
    b_smem[0][load_k + j][load_row] = b_next[j];
  }
  __syncthreads();

  int buf = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kSlice) {
    const bool has_next = k0 + kSlice < k_end;
    if (has_next) {
      load_row_quad<T>(a, lda, a_vector_ok, row0 + load_row, n1, k0 + kSlice + load_k, k_end, a_next);
      load_row_quad<T>(b, ldb, b_vector_ok, col0 + load_row, n2, k0 + kSlice + load_k, k_end, b_next);
    }
#pragma unroll
    for (int kk = 0; kk < kSlice; ++kk) {
      float a_frag[8], b_frag[8];
      const float4 a_lo = *reinterpret_cast<const float4*>(&a_smem[buf][kk][ty * 4]);
      const float4 a_hi = *reinterpret_cast<const float4*>(&a_smem[buf][kk][kHalf + ty * 4]);
      const float4 b_lo = *reinterpret_cast<const float4*>(&b_smem[buf][kk][tx * 4]);
      const float4 b_hi = *reinterpret_cast<const float4*>(&b_smem[buf][kk][kHalf + tx * 4]);
      a_frag[0] = a_lo.x; a_frag[1] = a_lo.y; a_frag[2] = a_lo.z; a_frag[3] = a_lo.w;
      a_frag[4] = a_hi.x; a_frag[5] = a_hi.y; a_frag[6] = a_hi.z; a_frag[7] = a_hi.w;
      b_frag[0] = b_lo.x; b_frag[1] = b_lo.y; b_frag[2] = b_lo.z; b_frag[3] = b_lo.w;
      b_frag[4] = b_hi.x; b_frag[5] = b_hi.y; b_frag[6] = b_hi.z; b_frag[7] = b_hi.w;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
    }
    if (has_next) {
      // the barrier that ended the previous slice guarantees nobody still reads buf ^ 1
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        a_smem[buf ^ 1][load_k + j][load_row] = a_next[j];
        b_smem[buf ^ 1][load_k + j][load_row] = b_next[j];
      }
    }
    __syncthreads();
    buf ^= 1;
  }

  // acc[i][j]: row offset (i < 4 ? ty*4 + i : 64 + ty*4 + i - 4), same for columns with tx
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = row0 + (i < 4 ? 0 : kHalf) + ty * 4 + (i & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float v[4] = {acc[i][half * 4 + 0], acc[i][half * 4 + 1], acc[i][half * 4 + 2], acc[i][half * 4 + 3]};
      store_quad(c, ldc, c_vector_ok, row, col0 + half * kHalf + tx * 4, n1, n2, accumulate, v);
    }
  }
  if (kSymmetric && block_row != block_col) {
    // mirror: C[col, row .. row + 3] = acc[row .. row + 3][col]
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = col0 + (j < 4 ? 0 : kHalf) + tx * 4 + (j & 3);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float v[4] = {acc[half * 4 + 0][j], acc[half * 4 + 1][j], acc[half * 4 + 2][j], acc[half * 4 + 3][j]};
        store_quad(c, ldc, c_vector_ok, col, row0 + half * kHalf + ty * 4, n2, n1, accumulate, v);
      }
    }
  }
}

// C (+)= sum over z of partial[z] (each n1 x n2, row-major), in the order z = 0, 1, ...
__global__ void __launch_bounds__(kSumThreads)
    sum_splits_kernel(const float* __restrict__ partial, int splits, int64_t n1, int64_t n2, float* __restrict__ c,
                      int64_t ldc, bool accumulate) {
  const int64_t count = n1 * n2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += stride) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[z * count + idx];
    float* dst = c + (idx / n2) * ldc + idx % n2;
    *dst = accumulate ? *dst + sum : sum;
  }
}

int64_t tile_count(int64_t n1, int64_t n2, bool symmetric) {
  const int64_t row_tiles = (n1 + kTile - 1) / kTile;
  const int64_t col_tiles = (n2 + kTile - 1) / kTile;
  return symmetric ? row_tiles * (row_tiles + 1) / 2 : row_tiles * col_tiles;
}

// k range of each split: a whole number of slices covering p in `splits` parts
int64_t k_per_split(int64_t p, int splits) {
  if (splits <= 1) return p;
  const int64_t per = (p + splits - 1) / splits;
  return (per + kSlice - 1) / kSlice * kSlice;
}

#ifndef FASTTANGENT_HOST_SIMULATION  // launches need nvcc
template <ElementType T>
cudaError_t gram_typed(const void* a, int64_t lda, bool a_vector_ok, const void* b, int64_t ldb, bool b_vector_ok,
                       float* c, int64_t ldc, bool c_vector_ok, int64_t n1, int64_t n2, int64_t p, bool symmetric,
                       int splits, int64_t split_stride, bool accumulate, cudaStream_t stream) {
  const int64_t k_split = k_per_split(p, splits);
  const int64_t row_tiles = (n1 + kTile - 1) / kTile;
  const int64_t col_tiles = (n2 + kTile - 1) / kTile;
  if (symmetric) {
    const int64_t tiles = row_tiles * (row_tiles + 1) / 2;
    if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
    gram_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, lda, a_vector_ok, a, lda, a_vector_ok, c, ldc, c_vector_ok,
                                                        n1, n1, p, k_split, split_stride, accumulate);
  } else {
    if (row_tiles > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
    gram_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, lda, a_vector_ok, b, ldb, b_vector_ok, c, ldc,
                                                         c_vector_ok, n1, n2, p, k_split, split_stride, accumulate);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gram(const void* a, int64_t lda, bool a_vector_ok, const void* b, int64_t ldb, bool b_vector_ok,
                        float* c, int64_t ldc, bool c_vector_ok, int64_t n1, int64_t n2, int64_t p, ElementType type,
                        bool symmetric, int splits, int64_t split_stride, bool accumulate, cudaStream_t stream) {
  if (n1 == 0 || n2 == 0) return cudaSuccess;
  if (splits < 1 || splits > 65535) return cudaErrorInvalidConfiguration;
  switch (type) {
    case ElementType::kFloat32:
      return gram_typed<ElementType::kFloat32>(a, lda, a_vector_ok, b, ldb, b_vector_ok, c, ldc, c_vector_ok, n1,
                                               n2, p, symmetric, splits, split_stride, accumulate, stream);
    case ElementType::kBFloat16:
      return gram_typed<ElementType::kBFloat16>(a, lda, a_vector_ok, b, ldb, b_vector_ok, c, ldc, c_vector_ok, n1,
                                                n2, p, symmetric, splits, split_stride, accumulate, stream);
    case ElementType::kFloat16:
      return gram_typed<ElementType::kFloat16>(a, lda, a_vector_ok, b, ldb, b_vector_ok, c, ldc, c_vector_ok, n1,
                                               n2, p, symmetric, splits, split_stride, accumulate, stream);
  }
  return cudaErrorInvalidValue;
}

int gram_split_count(int64_t n1, int64_t n2, int64_t p, bool symmetric, int num_sms) {
  const int64_t tiles = tile_count(n1, n2, symmetric);
  const int64_t resident = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
  if (tiles == 0 || tiles >= resident) return 1;
  int64_t splits = (resident + tiles - 1) / tiles;
  splits = std::min<int64_t>(splits, p / kMinSplitK);
  splits = std::min<int64_t>(splits, kMaxSplits);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

cudaError_t launch_sum_splits(const float* partial, int splits, int64_t n1, int64_t n2, float* c, int64_t ldc,
                              bool accumulate, int num_sms, cudaStream_t stream) {
  const int64_t count = n1 * n2;
  if (count == 0) return cudaSuccess;
  const int64_t wanted = (count + kSumThreads - 1) / kSumThreads;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 8;
  sum_splits_kernel<<<static_cast<unsigned>(std::min(wanted, cap)), kSumThreads, 0, stream>>>(partial, splits, n1, n2,
                                                                                                c, ldc, accumulate);
  return cudaGetLastError();
}

}  // namespace fasttangent
#else
}  // namespace
}  // namespace fasttangent
#endif  // FASTTANGENT_HOST_SIMULATION
