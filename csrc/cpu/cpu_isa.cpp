// The CPU kernels' ISA state and OpenMP information (torch-free); see csrc/include/cpu_isa.h.
#include "cpu_isa.h"

#include <atomic>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gram_tiles.h"  // KFK_X86_DISPATCH

namespace kfac_kernels {
namespace cpu {
namespace {

int detect_isa() {
#if KFK_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaGeneric;
}

int best_isa() {
  static const int best = detect_isa();
  return best;
}

std::atomic<int> g_forced_isa{kIsaAuto};

}  // namespace

int current_isa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced == kIsaAuto ? best_isa() : forced;
}

const char* isa() {
  switch (current_isa()) {
    case kIsaAvx512:
      return "avx512";
    case kIsaAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

bool set_isa(const char* name) {
  const std::string s = name ? name : "auto";
  int want;
  if (s == "auto") {
    want = kIsaAuto;
  } else if (s == "generic") {
    want = kIsaGeneric;
  } else if (s == "avx2") {
    want = kIsaAvx2;
  } else if (s == "avx512") {
    want = kIsaAvx512;
  } else {
    return false;
  }
  if (want != kIsaAuto && want > best_isa()) return false;
  g_forced_isa.store(want, std::memory_order_relaxed);
  return true;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace kfac_kernels
