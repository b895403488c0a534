// gram_kernel (symmetric and cross) against float64 loops.
#include "checks.h"
#include "../../csrc/sym_gram.cu"

#include <algorithm>
#include <random>
#include <vector>

namespace host_sim {
namespace {

using fasttangent::ElementType;

// splits > 1: split-k into a NaN-poisoned workspace, then sum_splits_kernel into C.
template <ElementType T, bool kSymmetric>
void check_gram(int64_t n1, int64_t n2, int64_t p, bool accumulate, int offset, int64_t out_pad, int splits = 1) {
  using E = Encoding<T>;
  std::mt19937 rng(static_cast<unsigned>(n1 * 1000 + n2 * 10 + p));
  std::normal_distribution<float> normal;
  const int64_t ld = p + (offset ? 3 : 0);  // misaligned rows too when offset
  auto* a = reinterpret_cast<typename E::Raw*>(scratch) + offset;
  auto* b = kSymmetric ? a : a + n1 * ld + 5;
  std::vector<double> A(n1 * p), B(n2 * p);
  auto fill = [&](typename E::Raw* m, std::vector<double>& values, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < p; ++k) {
        m[r * ld + k] = E::encode(normal(rng));
        values[r * p + k] = E::decode(m[r * ld + k]);
      }
    }
  };
  fill(a, A, n1);
  if (kSymmetric) B = A; else fill(b, B, n2);
  const int64_t ldc = n2 + out_pad;
  std::vector<float> c(n1 * ldc, NAN);  // poisoned: entries never written stay NaN
  if (accumulate) {
    for (int64_t i = 0; i < n1; ++i) std::fill(&c[i * ldc], &c[i * ldc] + n2, 1.5f);
  }
  const size_t load_bytes = sizeof(typename E::Raw) == 4 ? 16 : 8;
  const bool a_ok = reinterpret_cast<uintptr_t>(a) % load_bytes == 0 && ld % 4 == 0;
  const bool b_ok = reinterpret_cast<uintptr_t>(b) % load_bytes == 0 && ld % 4 == 0;
  const bool c_ok = ldc % 4 == 0;
  const int64_t row_tiles = (n1 + fasttangent::kTile - 1) / fasttangent::kTile;
  const int64_t col_tiles = (n2 + fasttangent::kTile - 1) / fasttangent::kTile;
  const dim3 grid = kSymmetric ? dim3(row_tiles * (row_tiles + 1) / 2) : dim3(col_tiles, row_tiles);
  if (splits == 1) {
    launch(grid, dim3(fasttangent::kThreads), [&] {
      fasttangent::gram_kernel<T, kSymmetric>(a, ld, a_ok, b, ld, b_ok, c.data(), ldc, c_ok, n1, n2, p, p, 0,
                                              accumulate);
    });
  } else {
    std::vector<float> partial(splits * n1 * n2, NAN);
    const int64_t k_split = fasttangent::k_per_split(p, splits);
    launch(dim3(grid.x, grid.y, splits), dim3(fasttangent::kThreads), [&] {
      fasttangent::gram_kernel<T, kSymmetric>(a, ld, a_ok, b, ld, b_ok, partial.data(), n2, n2 % 4 == 0, n1, n2, p,
                                              k_split, n1 * n2, false);
    });
    launch(dim3(2), dim3(fasttangent::kSumThreads), [&] {
      fasttangent::sum_splits_kernel(partial.data(), splits, n1, n2, c.data(), ldc, accumulate);
    });
  }
  double worst = 0;
  bool exactly_symmetric = true, padding_untouched = true;
  for (int64_t i = 0; i < n1; ++i) {
    for (int64_t j = 0; j < n2; ++j) {
      double sum = accumulate ? 1.5 : 0.0, norm_a = 0, norm_b = 0;
      for (int64_t k = 0; k < p; ++k) {
        sum += A[i * p + k] * B[j * p + k];
        norm_a += A[i * p + k] * A[i * p + k];
        norm_b += B[j * p + k] * B[j * p + k];
      }
      const double scale = std::sqrt(norm_a * norm_b) + (accumulate ? 1.5 : 0.0) + 1e-30;
      const double err = std::isnan(c[i * ldc + j]) ? INFINITY : std::fabs(c[i * ldc + j] - sum) / scale;
      worst = std::max(worst, err);
      if (kSymmetric && c[i * ldc + j] != c[j * ldc + i]) exactly_symmetric = false;
    }
    for (int64_t j = n2; j < ldc; ++j) padding_untouched &= static_cast<bool>(std::isnan(c[i * ldc + j]));
  }
  SIM_CHECK(worst < 1e-5 && exactly_symmetric && padding_untouched,
            "gram type=%d symmetric=%d n1=%ld n2=%ld p=%ld accumulate=%d offset=%d pad=%ld splits=%d: relative "
            "error %g, exactly symmetric %d, padding untouched %d",
            static_cast<int>(T), kSymmetric, static_cast<long>(n1), static_cast<long>(n2), static_cast<long>(p),
            accumulate, offset, static_cast<long>(out_pad), splits, worst, exactly_symmetric, padding_untouched);
}

}  // namespace

void run_gram_checks() {
  // single elements, partial tiles, several tiles (with off-diagonal mirrors), p not a multiple of 8
  for (int64_t n : {1, 5, 129, 300}) {
    for (int64_t p : {1, 13, 37}) {
      for (bool accumulate : {false, true}) {
        check_gram<ElementType::kFloat32, true>(n, n, p, accumulate, 0, 0);
        check_gram<ElementType::kFloat32, true>(n, n, p, accumulate, 1, 3);
      }
    }
  }
  const int64_t cross[][3] = {{1, 1, 3}, {130, 70, 21}, {70, 260, 9}};
  for (const auto& s : cross) {
    for (bool accumulate : {false, true}) {
      check_gram<ElementType::kFloat32, false>(s[0], s[1], s[2], accumulate, 0, 0);
      check_gram<ElementType::kFloat32, false>(s[0], s[1], s[2], accumulate, 1, 3);
    }
    check_gram<ElementType::kBFloat16, false>(s[0], s[1], s[2], false, 0, 0);
    check_gram<ElementType::kFloat16, false>(s[0], s[1], s[2], true, 1, 2);
  }
  check_gram<ElementType::kBFloat16, true>(200, 200, 16, false, 0, 0);
  check_gram<ElementType::kFloat16, true>(200, 200, 19, true, 1, 1);
  // split-k: a partial last range (p=300 in 5 splits of 64) and an empty one (p=100 in 8 splits of 16)
  for (bool accumulate : {false, true}) {
    check_gram<ElementType::kFloat32, true>(200, 200, 300, accumulate, 0, 0, 5);
    check_gram<ElementType::kFloat32, true>(37, 37, 100, accumulate, 1, 3, 8);
    check_gram<ElementType::kFloat32, false>(130, 70, 300, accumulate, 1, 3, 5);
  }
  check_gram<ElementType::kBFloat16, true>(129, 129, 100, true, 0, 2, 8);
}

}  // namespace host_sim
