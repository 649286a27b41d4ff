// Internal header of the CPU kernels (csrc/cpu/*.cpp only; not part of the public declarations in
// csrc/include): the register-blocked Gram micro-kernel shared by symmetric_factor_update.cpp and
// patch_covariance.cpp, and the macros of the kernels compiled per ISA (their run-time selection,
// current_isa, is in cpu_isa.h). The CUDA counterpart is csrc/cuda/gram_tiles.cuh.
//
// The micro-kernel computes an MR x NR block of A^T B from packed panels: for every k it loads NR
// contiguous values of B (b + k * NR) and broadcasts MR values of A (a + k * LDA). LDA = MR is the
// layout of a panel packed in blocks of MR columns; LDA = NR lets both operands come from one panel
// packed in blocks of NR columns (MR divides NR, so an MR block never straddles two NR blocks).
//
// Everything below is compiled into each including file separately (anonymous namespace): the
// kernels are instantiated inside functions with different target attributes (AVX-512, AVX2+FMA,
// baseline), and they are always inlined there, so no out-of-line copy compiled for one ISA can be
// shared with another. Only the ISA state (current_isa) is defined once, in cpu_isa.cpp, so that
// cpu::set_isa applies to every kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

#include "cpu_isa.h"

// KFAC_KERNELS_NO_VECTOR_EXT / KFAC_KERNELS_NO_ISA_DISPATCH (compile definitions) select the plain
// C++ micro-kernel / the baseline path only, as other compilers and CPUs get them.
#if defined(__GNUC__) || defined(__clang__)
#define KFK_ALWAYS_INLINE inline __attribute__((always_inline))
#define KFK_RESTRICT __restrict__
#else
#define KFK_ALWAYS_INLINE inline
#define KFK_RESTRICT
#endif
#if (defined(__GNUC__) || defined(__clang__)) && !defined(KFAC_KERNELS_NO_VECTOR_EXT)
#define KFK_HAVE_VECTOR_EXT 1
#else
#define KFK_HAVE_VECTOR_EXT 0
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(KFAC_KERNELS_NO_ISA_DISPATCH)
#define KFK_X86_DISPATCH 1
#define KFK_TARGET(s) __attribute__((target(s)))
#else
#define KFK_X86_DISPATCH 0
#endif

#if defined(__clang__)
#define KFK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KFK_UNROLL _Pragma("GCC unroll 32")
#else
#define KFK_UNROLL
#endif

namespace kfac_kernels {
namespace cpu {
namespace gram {

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// 64-byte aligned scratch buffer (no value initialisation).
template <typename T>
class Buffer {
 public:
  explicit Buffer(size_t n)
      : ptr_(n ? static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))) : nullptr) {}
  ~Buffer() {
    if (ptr_) ::operator delete(ptr_, std::align_val_t(64));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

template <typename T, int MR, int NR, int VL>
struct MicroKernel {
  static_assert(NR % VL == 0, "NR must be a multiple of the vector length");
  static_assert(NR % MR == 0 || MR % NR == 0, "MR and NR must nest");
  static constexpr int NV = NR / VL;

  // c[r][j] += sum_k a[k * LDA + r] * b[k * NR + j] for an MRU x (NVU * VL) block (MRU <= MR,
  // NVU <= NV: smaller for the last, narrower blocks of the panels). The chunk's sum starts from
  // zero and is then added to c (two-level summation: the rounding error grows with kc + m / kc
  // rather than with m); with kAdd = false it is stored to c instead (c = sum, no read of c).
  template <int MRU, int NVU, int LDA, bool kAdd = true>
  static KFK_ALWAYS_INLINE void micro(int64_t kc, const T* KFK_RESTRICT a,
                                      const T* KFK_RESTRICT b, T* KFK_RESTRICT c, int64_t ldc) {
#if KFK_HAVE_VECTOR_EXT
    typedef T vec __attribute__((vector_size(VL * sizeof(T))));
    vec acc[MRU][NVU];
    KFK_UNROLL
    for (int r = 0; r < MRU; ++r) {
      KFK_UNROLL
      for (int v = 0; v < NVU; ++v) acc[r][v] = vec{};
    }
    for (int64_t k = 0; k < kc; ++k) {
      vec bv[NVU];
      KFK_UNROLL
      for (int v = 0; v < NVU; ++v) std::memcpy(&bv[v], b + k * NR + v * VL, sizeof(vec));
      KFK_UNROLL
      for (int r = 0; r < MRU; ++r) {
        const T s = a[k * LDA + r];
        KFK_UNROLL
        for (int v = 0; v < NVU; ++v) acc[r][v] += bv[v] * s;
      }
    }
    KFK_UNROLL
    for (int r = 0; r < MRU; ++r) {
      KFK_UNROLL
      for (int v = 0; v < NVU; ++v) {
        vec cv = acc[r][v];
        if (kAdd) {
          vec old;
          std::memcpy(&old, c + r * ldc + v * VL, sizeof(vec));
          cv = old + acc[r][v];
        }
        std::memcpy(c + r * ldc + v * VL, &cv, sizeof(vec));
      }
    }
#else
    constexpr int NU = NVU * VL;
    T acc[MRU][NU];
    for (int r = 0; r < MRU; ++r)
      for (int j = 0; j < NU; ++j) acc[r][j] = T(0);
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < MRU; ++r) {
        const T s = a[k * LDA + r];
        for (int j = 0; j < NU; ++j) acc[r][j] += s * b[k * NR + j];
      }
    for (int r = 0; r < MRU; ++r)
      for (int j = 0; j < NU; ++j) c[r * ldc + j] = kAdd ? c[r * ldc + j] + acc[r][j] : acc[r][j];
#endif
  }

  // The micro-kernel for a block with `rows` (1..MR) useful rows: rows are rounded up to 1, 2,
  // MR / 2 or MR, so a narrow last block does not cost a full one. Rows past `rows` are computed
  // from whatever the panel holds there and written to c too.
  template <int NVU, int LDA, bool kAdd = true>
  static KFK_ALWAYS_INLINE void micro_rows(int64_t rows, int64_t kc, const T* a, const T* b, T* c,
                                           int64_t ldc) {
    if (rows > MR / 2) {
      micro<MR, NVU, LDA, kAdd>(kc, a, b, c, ldc);
    } else if (rows > 2) {
      micro<MR / 2, NVU, LDA, kAdd>(kc, a, b, c, ldc);
    } else if (rows == 2) {
      micro<2, NVU, LDA, kAdd>(kc, a, b, c, ldc);
    } else {
      micro<1, NVU, LDA, kAdd>(kc, a, b, c, ldc);
    }
  }
};

}  // namespace
}  // namespace gram
}  // namespace cpu
}  // namespace kfac_kernels
