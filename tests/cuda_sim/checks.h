// Shared helpers of the host-simulation checks: element encodings and a failure counter.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "element_type.h"
#include "shim.h"

namespace host_sim {

inline int checks = 0, failures = 0;

#define SIM_CHECK(condition, ...)                    \
  do {                                               \
    ++host_sim::checks;                              \
    if (!(condition)) {                              \
      ++host_sim::failures;                          \
      std::printf("FAIL " __VA_ARGS__);              \
      std::printf("\n");                             \
    }                                                \
  } while (0)

inline unsigned short to_bf16(float f) {  // truncation: any bf16 value will do as input
  unsigned u;
  std::memcpy(&u, &f, 4);
  return static_cast<unsigned short>(u >> 16);
}

inline unsigned short to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  unsigned short u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Raw storage of `type` elements and their float values.
template <fasttangent::ElementType T>
struct Encoding {
  using Raw = unsigned short;
  static Raw encode(float v) { return T == fasttangent::ElementType::kBFloat16 ? to_bf16(v) : to_f16(v); }
  static float decode(Raw r) {
    return T == fasttangent::ElementType::kBFloat16 ? __uint_as_float(static_cast<unsigned>(r) << 16)
                                                    : __half2float(r);
  }
};

template <>
struct Encoding<fasttangent::ElementType::kFloat32> {
  using Raw = float;
  static Raw encode(float v) { return v; }
  static float decode(Raw r) { return r; }
};

// 16-byte aligned scratch memory; views at element offsets make misaligned inputs.
alignas(16) inline unsigned char scratch[1 << 24];

void run_sign_checks();
void run_gram_checks();

}  // namespace host_sim
