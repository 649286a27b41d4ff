// Shared by the C++ tests (no torch, no test framework): pass/fail counters, a seeded generator
// and the summary line that main() returns with.
#pragma once

#include <cstdint>
#include <cstdio>

namespace {

int g_passed = 0;
int g_failed = 0;

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  double uniform() {  // in [-1, 1)
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(s >> 11) * (2.0 / 9007199254740992.0) - 1.0;
  }
};

// Prints the counts; the process exit status: 0 if nothing failed.
int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace
