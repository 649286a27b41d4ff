// bfloat16 values as raw 16-bit patterns, for the kernels that take bfloat16 parameters without a
// bfloat16 type (the SINGD steps: ElementType::kBFloat16). One rounding for the CPU and the CUDA
// kernels, so both store the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace kfac_kernels {
namespace bf16 {

KFAC_HD inline float to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (as torch does), NaN kept a quiet NaN.
KFAC_HD inline uint16_t from_float(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Element i of an array of A (Elem = A) or of bfloat16 bits (Elem = uint16_t), as A.
template <typename A, typename Elem>
KFAC_HD inline A load_as(const Elem* p, int64_t i) {
  if constexpr (sizeof(Elem) == 2) {
    return static_cast<A>(to_float(p[i]));
  } else {
    return static_cast<A>(p[i]);
  }
}

// Stores v (type A) to element i of such an array, rounded once.
template <typename A, typename Elem>
KFAC_HD inline void store_as(Elem* p, int64_t i, A v) {
  if constexpr (sizeof(Elem) == 2) {
    p[i] = from_float(static_cast<float>(v));
  } else {
    p[i] = static_cast<Elem>(v);
  }
}

}  // namespace bf16
}  // namespace kfac_kernels
