// Internal header of the CPU kernels (csrc/cpu/*.cpp only): bfloat16 values as raw 16-bit
// patterns, for the kernels that take bfloat16 parameters without a bfloat16 type.
#pragma once

#include <cstdint>
#include <cstring>

namespace kfac_kernels {
namespace cpu {
namespace bf16 {

inline float to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (as torch does), NaN kept a quiet NaN.
inline uint16_t from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace bf16
}  // namespace cpu
}  // namespace kfac_kernels
