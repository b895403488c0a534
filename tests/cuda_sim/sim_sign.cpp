// pack_signs_kernel and count_sign_matches_kernel against per-element loops.
#include "checks.h"
#include "../../csrc/sign_mask.cu"

#include <random>
#include <vector>

namespace host_sim {
namespace {

using fasttangent::ElementType;

template <ElementType T>
void check_signs(const std::vector<float>& values, int offset, unsigned blocks) {
  using E = Encoding<T>;
  auto* x = reinterpret_cast<typename E::Raw*>(scratch) + offset;
  const int64_t n = static_cast<int64_t>(values.size()), num_words = (n + 31) / 32;
  for (int64_t i = 0; i < n; ++i) x[i] = E::encode(values[i]);
  std::vector<int32_t> expected(num_words, 0), words(num_words, 0x5a5a5a5a);  // poisoned output
  for (int64_t i = 0; i < n; ++i) {
    if (E::decode(x[i]) > 0.0f) expected[i / 32] |= static_cast<int32_t>(1u << (i % 32));
  }
  const bool vector_ok = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  launch(dim3(blocks), dim3(fasttangent::kThreads),
         [&] { fasttangent::pack_signs_kernel<T>(x, n, words.data(), vector_ok); });
  SIM_CHECK(words == expected, "pack_signs type=%d n=%ld offset=%d blocks=%u", static_cast<int>(T),
            static_cast<long>(n), offset, blocks);

  // reference with random flipped bits and every padding bit set
  std::vector<int32_t> reference = expected;
  std::mt19937 rng(static_cast<unsigned>(n));
  for (auto& word : reference) word ^= static_cast<int32_t>(rng() & rng());
  if (n % 32) reference[num_words - 1] |= static_cast<int32_t>(~0u << (n % 32));
  long long agree = 0;
  for (int64_t i = 0; i < n; ++i) {
    agree += (E::decode(x[i]) > 0.0f) == static_cast<bool>((static_cast<unsigned>(reference[i / 32]) >> (i % 32)) & 1u);
  }
  unsigned long long matches = 0;
  launch(dim3(blocks), dim3(fasttangent::kThreads),
         [&] { fasttangent::count_sign_matches_kernel<T>(x, n, reference.data(), &matches, vector_ok); });
  SIM_CHECK(static_cast<long long>(matches) == agree, "count_sign_matches type=%d n=%ld offset=%d: %llu, want %lld",
            static_cast<int>(T), static_cast<long>(n), offset, matches, agree);
}

}  // namespace

void run_sign_checks() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (int64_t n : {1, 31, 32, 33, 129, 257, 1000, 4096 * 3 + 17, 70001}) {
    std::vector<float> values(n);
    for (int64_t i = 0; i < n; ++i) values[i] = i % 7 == 0 ? 0.0f : (i % 11 == 3 ? -0.0f : normal(rng));
    for (int offset : {0, 1}) {         // aligned (vector loads) and misaligned (scalar loads)
      for (unsigned blocks : {1u, 3u}) {  // one block, and a grid-stride loop over several
        check_signs<ElementType::kFloat32>(values, offset, blocks);
        check_signs<ElementType::kBFloat16>(values, offset, blocks);
        check_signs<ElementType::kFloat16>(values, offset, blocks);
      }
    }
  }
}

}  // namespace host_sim
