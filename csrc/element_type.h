// Element types the kernels read (no CUDA headers: the host simulation in
// tests/cuda_sim/ includes this too).
#pragma once

namespace fasttangent {

enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fasttangent
