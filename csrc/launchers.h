// Raw-pointer launchers of the fasttangent CUDA kernels.
//
// The .cu files include only the CUDA runtime (no torch headers), which keeps nvcc
// fast; argument checking, allocation and the current stream come from bindings.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "element_type.h"

namespace fasttangent {

// words[w] bit b = (x[32 w + b] > 0); words has ceil(numel / 32) entries, zero padded.
// `vector_ok`: x is 16-byte aligned, so whole 16-byte chunks can be loaded at once.
cudaError_t launch_pack_signs(const void* x, ElementType type, int64_t numel, int32_t* words,
                              bool vector_ok, int num_sms, cudaStream_t stream);

// *matches += number of i < numel with (x[i] > 0) == bit i of `packed`.
cudaError_t launch_count_sign_matches(const void* x, ElementType type, int64_t numel,
                                      const int32_t* packed, unsigned long long* matches,
                                      bool vector_ok, int num_sms, cudaStream_t stream);

// C (+)= A Bᵀ in fp32 with A (n1, p), B (n2, p) row-major (leading dimensions lda, ldb)
// and C (n1, n2) with leading dimension ldc. `symmetric` (A == B, n1 == n2) computes
// only the upper-triangle tiles and mirrors them. `accumulate` adds into C instead of
// overwriting it. Each *_vector_ok says that 16-byte (8-byte for 16-bit inputs) loads
// of that matrix are aligned. With splits > 1, split z multiplies the z-th k range
// into C + z * split_stride (a workspace for launch_sum_splits).
cudaError_t launch_gram(const void* a, int64_t lda, bool a_vector_ok, const void* b, int64_t ldb,
                        bool b_vector_ok, float* c, int64_t ldc, bool c_vector_ok, int64_t n1,
                        int64_t n2, int64_t p, ElementType type, bool symmetric, int splits,
                        int64_t split_stride, bool accumulate, cudaStream_t stream);

// How many k ranges a Gram should be split into so that its tiles fill the GPU (1: none).
int gram_split_count(int64_t n1, int64_t n2, int64_t p, bool symmetric, int num_sms);

// C (+)= partial[0] + partial[1] + ... (splits slices of n1 x n2, row-major), in that order.
cudaError_t launch_sum_splits(const float* partial, int splits, int64_t n1, int64_t n2, float* c,
                              int64_t ldc, bool accumulate, int num_sms, cudaStream_t stream);

}  // namespace fasttangent
