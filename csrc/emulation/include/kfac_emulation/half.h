// 16-bit floating-point types of the CUDA emulation (cuda_fp16.h / cuda_bf16.h): storage and the
// conversions the device performs, bit for bit (round to nearest even; a NaN becomes the
// device's canonical NaN 0x7fff, as cvt.rn.f16.f32 / cvt.rn.bf16.f32 produce it).
#pragma once

#include <cstdint>
#include <cstring>

#include "device.h"

namespace kfac_kernels {
namespace emulation {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                   // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;           // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                                 // below 2^-14: subnormal (or zero)
    // |f| / 2^-24 is exact; rounding it to an integer (nearest even) gives the encoding, and
    // 1024 is the smallest normal number's.
    const float scaled = bits_float(ax) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  uint32_t out = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) ++out;
  return sign | static_cast<uint16_t>(out);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {                                                        // zero / subnormal
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp - 15 + 127) << 23) | (man << 13));
}

inline uint16_t float_to_bfloat16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

}  // namespace emulation
}  // namespace kfac_kernels

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(kfac_kernels::emulation::float_to_half_bits(f)) {}
  __half(double d) : __half(static_cast<float>(d)) {}
  __half(__half_raw r) : __x(r.x) {}
  operator float() const { return kfac_kernels::emulation::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(kfac_kernels::emulation::float_to_bfloat16_bits(f)) {}
  __nv_bfloat16(double d) : __nv_bfloat16(static_cast<float>(d)) {}
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  operator float() const { return kfac_kernels::emulation::bfloat16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline bool __hisnan(__half h) { return (h.__x & 0x7fffu) > 0x7c00u; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
  return __nv_bfloat16(__nv_bfloat16_raw{v});
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline bool __hisnan(__nv_bfloat16 b) { return (b.__x & 0x7fffu) > 0x7f80u; }
