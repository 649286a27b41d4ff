// Shared by the CUDA C++ tests (run on a device, or on the CPU under the CUDA emulation of
// csrc/emulation): error checks, copies between host vectors and device buffers, the comparison
// of a CUDA result with the CPU kernel's, the skip status without a device, and the quick mode.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "test_support.h"

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    if (err_ != cudaSuccess) {                                                          \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, \
                  __LINE__, #expr);                                                     \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

namespace {

// Exit status of a CUDA test on a machine without a visible device (CTest: SKIP_RETURN_CODE).
constexpr int kNoDevice = 77;

bool device_visible() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device visible: skipped\n");
    return false;
  }
  return true;
}

// Problem sizes: all (no argument); `--quick` (the emulated runs) fewer large problems, every
// code path kept; `--small` (the compute-sanitizer runs) the small problems only.
enum class Sizes { kFull, kQuick, kSmall };

Sizes test_sizes(int argc, char** argv) {
  Sizes s = Sizes::kFull;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0 && s == Sizes::kFull) s = Sizes::kQuick;
    if (std::strcmp(argv[i], "--small") == 0) s = Sizes::kSmall;
  }
  return s;
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
void to_host(std::vector<T>& h, const T* d) {
  if (!h.empty()) CUDA_OK(cudaMemcpy(h.data(), d, h.size() * sizeof(T), cudaMemcpyDeviceToHost));
}

// `got` (CUDA) agrees with `want` (CPU kernel): the same NaN positions, the same infinities, and
// |got - want| <= tol (1 + |want|) elsewhere. Counts one test and prints the first difference.
template <typename T>
bool expect_close(const std::vector<T>& got, const std::vector<T>& want, double tol,
                  const char* what, const char* where) {
  constexpr size_t kNone = ~size_t{0};
  double worst = 0;
  size_t bad = kNone;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    bool ok;
    if (std::isnan(w) || std::isnan(g)) {
      ok = std::isnan(w) && std::isnan(g);
    } else if (std::isinf(w) || std::isinf(g)) {
      ok = g == w;
    } else {
      const double err = std::fabs(g - w) / (1.0 + std::fabs(w));
      worst = std::max(worst, err);
      ok = err <= tol;
    }
    if (!ok && bad == kNone) bad = i;
  }
  const bool pass = got.size() == want.size() && bad == kNone;
  (pass ? g_passed : g_failed)++;
  if (!pass) {
    std::printf("FAIL %s %s: ", what, where);
    if (got.size() != want.size())
      std::printf("%zu values, want %zu\n", got.size(), want.size());
    else
      std::printf("element %zu is %.9g, want %.9g (worst relative error %.3g, tolerance %.3g)\n",
                  bad, static_cast<double>(got[bad]), static_cast<double>(want[bad]), worst, tol);
  }
  return pass;
}

// bfloat16 values as raw bits: conversions written independently of the kernels.
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t bf16_bits(float f) {  // round to nearest even (finite f)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t lower = u & 0xffffu;
  uint32_t upper = u >> 16;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) upper += 1;
  return static_cast<uint16_t>(upper);
}
inline std::vector<float> bf16_values(const std::vector<uint16_t>& bits) {
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_value(bits[i]);
  return out;
}

}  // namespace
