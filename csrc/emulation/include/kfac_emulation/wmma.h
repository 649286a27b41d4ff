// nvcuda::wmma of the CUDA emulation (mma.h), for the 16 x 16 x 16 shape with fp16 / bf16 inputs
// and fp32 accumulators. Every *_sync call is a warp barrier (the device requires the whole warp,
// converged, with the same arguments) and checks the device's alignment rules (a 256-bit aligned
// pointer, ldm a multiple of 16 bytes).
//
// Fragment layout (unspecified on the device, so kernels may only rely on element-wise
// consistency between fragments of one type): lane l owns accumulator elements
// (row l / 2, columns 8 (l % 2) .. 8 (l % 2) + 7); its matrix_a fragment holds row l / 2 of A and
// its matrix_b fragment the 8 matching columns of B, so mma_sync needs no data from other lanes.
// The products of 16-bit inputs are exact in fp32; the 16 of an output element are added in
// order, each rounded to nearest (the device's adder tree rounds differently: last-bit
// differences).
#pragma once

#include <cstddef>
#include <cstdint>

#include "device.h"
#include "half.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment;

template <typename T, typename Layout>
class fragment<matrix_a, 16, 16, 16, T, Layout> {
 public:
  static constexpr int num_elements = 16;
  T x[num_elements];  // row (lane / 2) of A: x[k] = A[row][k]
};

template <typename T, typename Layout>
class fragment<matrix_b, 16, 16, 16, T, Layout> {
 public:
  static constexpr int num_elements = 128;
  T x[num_elements];  // x[e * 16 + k] = B[k][8 (lane % 2) + e]
};

template <typename T>
class fragment<accumulator, 16, 16, 16, T, void> {
 public:
  static constexpr int num_elements = 8;
  T x[num_elements];  // x[e] = C[lane / 2][8 (lane % 2) + e]
};

namespace detail {

inline int lane() {
  const unsigned linear = threadIdx.x + threadIdx.y * blockDim.x +
                          threadIdx.z * blockDim.x * blockDim.y;
  return static_cast<int>(linear % 32u);
}

inline void converge(const void* ptr, unsigned ldm, size_t elem_bytes, const char* file,
                     int line) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    kfac_kernels::emulation::kernel_fault(file, line,
                                          "wmma pointer is not 256-bit (32-byte) aligned");
  if ((ldm * elem_bytes) % 16 != 0)
    kfac_kernels::emulation::kernel_fault(file, line, "wmma ldm is not a multiple of 16 bytes");
  kfac_kernels::emulation::warp_operation(kfac_kernels::emulation::WarpOp::kMatrix, 0xffffffffu,
                                          0, 0, 32, file, line);
}

template <typename Layout>
constexpr bool is_row_major() {
  return std::is_same<Layout, row_major>::value;
}

}  // namespace detail

template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& a, const T* p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::converge(p, ldm, sizeof(T), file, line);
  const int r = detail::lane() / 2;
  for (int k = 0; k < 16; ++k)
    a.x[k] = detail::is_row_major<Layout>() ? p[r * ldm + k] : p[k * ldm + r];
}

template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& b, const T* p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::converge(p, ldm, sizeof(T), file, line);
  const int c0 = 8 * (detail::lane() % 2);
  for (int e = 0; e < 8; ++e)
    for (int k = 0; k < 16; ++k)
      b.x[e * 16 + k] =
          detail::is_row_major<Layout>() ? p[k * ldm + c0 + e] : p[(c0 + e) * ldm + k];
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& c, const T* p, unsigned ldm,
                      layout_t layout, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  detail::converge(p, ldm, sizeof(T), file, line);
  const int r = detail::lane() / 2, c0 = 8 * (detail::lane() % 2);
  for (int e = 0; e < 8; ++e)
    c.x[e] = layout == mem_row_major ? p[r * ldm + c0 + e] : p[(c0 + e) * ldm + r];
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& c, unsigned ldm,
                       layout_t layout, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  detail::converge(p, ldm, sizeof(T), file, line);
  const int r = detail::lane() / 2, c0 = 8 * (detail::lane() % 2);
  for (int e = 0; e < 8; ++e) {
    if (layout == mem_row_major)
      p[r * ldm + c0 + e] = c.x[e];
    else
      p[(c0 + e) * ldm + r] = c.x[e];
  }
}

template <typename Use, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = static_cast<T>(v);
}

template <typename In, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, In, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, In, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  kfac_kernels::emulation::warp_operation(kfac_kernels::emulation::WarpOp::kMatrix, 0xffffffffu, 0,
                                          0, 32, file, line);
  float out[8];
  for (int e = 0; e < 8; ++e) {
    float acc = c.x[e];
    for (int k = 0; k < 16; ++k)
      acc += static_cast<float>(a.x[k]) * static_cast<float>(b.x[e * 16 + k]);
    out[e] = acc;
  }
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
