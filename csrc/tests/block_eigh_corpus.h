// Shared by the C++ tests of block_eigh (CPU and CUDA): the expectation helper and the block
// corpus (no torch, no test framework).
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>

#include "test_support.h"

namespace {

void expect(bool ok, const char* what, int64_t n, const char* type, double value) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s n=%lld %s: %.3e\n", what, static_cast<long long>(n), type, value);
  }
}

// B symmetric blocks x = m m^T / n + diag shift (SPD) or, for odd b, indefinite m + m^T.
template <typename T>
std::vector<T> make_blocks(int64_t batch, int64_t n, Rng& rng) {
  std::vector<T> out(static_cast<size_t>(batch * n * n));
  std::vector<double> m(static_cast<size_t>(n * n));
  for (int64_t b = 0; b < batch; ++b) {
    for (auto& v : m) v = rng.uniform();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double v = 0;
        if (b % 2 == 0) {
          for (int64_t k = 0; k < n; ++k) v += m[i * n + k] * m[j * n + k];
          v = v / n + (i == j ? 0.1 : 0.0);
        } else {
          v = m[i * n + j] + m[j * n + i];
        }
        out[b * n * n + i * n + j] = static_cast<T>(v);
      }
  }
  return out;
}

}  // namespace
