// CPU kernel of the patch covariance (torch-free), see csrc/include/patch_covariance.h.
//
// expand: an implicit im2col Gram matrix. The N * out_h * out_w patch rows are walked in chunks.
// For a chunk, the patch columns are gathered straight from x (any strides, fp16/bf16 converted
// to the accumulation type, zeros where a patch reaches into the padding) into a panel packed in
// blocks of NR columns, k-major, from which the register-blocked micro-kernel of gram_tiles.h
// reads both of its operands. The packing walks each column along runs of consecutive output
// columns ow of one (n, oh): along a run the input is read with the constant step
// stride_w * x_stride_w (a plain strided copy, contiguous for a stride-1 NCHW convolution), and
// the padding is handled per run, not per element. The unfolded (N * out_h * out_w, D) matrix
// never exists: a panel holds one chunk. Bias and padding columns of a panel are written once.
//
// Work is split into output tiles of kTile x kTile of each segment's D x D factor; only the tile
// pairs ti <= tj are computed, and both triangles of the output are written from them.
//   * Segments of D <= kTile (one tile: depthwise and other small groups, 1x1 convolutions of few
//     channels) are independent work items: a thread packs a segment's columns chunk by chunk
//     into its own panel and runs the micro-kernel on it right away (a few neighbouring segments
//     per item, chunk by chunk, so that the input lines they share are read from cache).
//   * Larger segments pack each chunk once for all their tile pairs: a step of the loop over
//     chunks packs chunk t into one shared panel (threads share it by column blocks), then runs
//     its tile pairs. The tile pairs accumulate straight into their place in out (which has to
//     exist anyway; the lower triangle is not touched until the end), so there are no O(D^2)
//     accumulators: the temporaries are the panel, which holds about 1/kUnfoldFraction of the
//     unfolded matrix at most, and O(threads * tile) buffers. At the end every upper tile is read
//     back and written out with its mirror.
//   * When there are fewer than kTargetItems (segment, tile pair) items and many rows, the rows
//     are also split into slices; slices after the first have small private accumulators (at
//     most about kTargetItems tiles), added in a fixed order at the end.
// Every split that changes a sum depends only on the problem's shape, and every output value is
// summed in an order that does not depend on which thread did the work, so results are bitwise
// identical for any number of threads.
//
// Writing the output: a tile's values for out[i][j] and for the mirrored out[j][i] are staged in
// small buffers (the mirrored ones through an in-register block transpose), and out is written
// along rows only, each element once, with non-temporal stores when it is large (no
// read-for-ownership of lines that are overwritten whole). A large output gets transparent huge
// pages where the OS offers them (advise_huge_pages): its first write would otherwise cost more
// in page faults than a reduce-mode factor costs to compute.
//
// reduce: the mean patches abar_n are window sums of the input. For a kernel row i the output rows
// oh read the input rows h = oh * stride_h + i * dilation_h - pad_top inside [0, H), for a kernel
// column j likewise, so abar_n[c, i, j] = sum_{h in rows(i)} sum_{w in cols(j)} x[n, c, h, w] / R,
// which takes O(N * C * H * W) work, never a patch (see mean_patches). Every window sum adds the
// window's own pixels only, never subtracts (no prefix or box sums): its rounding error is
// bounded by the magnitudes inside the window, so one huge or non-finite pixel changes only the
// windows that contain it, as in the definition. The mean patches are written into one panel per
// segment (N rows: O(N * D) memory), and decay * factor + alpha * abar^T abar comes from the same
// tile pairs and micro-kernel as expand.
#include "patch_covariance.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gram_tiles.h"

#if KFK_X86_DISPATCH
#include <immintrin.h>
#endif

namespace kfac_kernels {
namespace cpu {
namespace {

using gram::Buffer;
using gram::ceil_div;
using gram::round_up;

constexpr int64_t kTile = 64;               // output tile edge
constexpr int64_t kChunk = 256;             // patch rows packed at once into a private panel
constexpr int64_t kMaxChunk = 1024;         // ... into shared panels (fewer steps and barriers)
constexpr int64_t kMinChunk = 32;           // fewest (when shared panels would be very large)
constexpr int64_t kUnfoldFraction = 8;      // shared panels: at most ~1/8 of the unfolded input
constexpr int64_t kKc = 128;                // rows per micro-kernel call (two-level summation)
constexpr int64_t kMinRowsPerSlice = 1024;  // never split the rows into slices shorter than this
constexpr int64_t kTargetItems = 16;        // split rows until there are about this many items
constexpr int64_t kMaxSharedPanel = int64_t(1) << 21;  // elements of the shared panels (soft cap)

// ---------------------------------------------------------------------------------------------
// Input conversion (no torch): fp16 and bf16 are read as their bit patterns.

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 -> binary32, exact for every value (subnormals, infinities, NaN included);
// branch-free, so that loops over it vectorise.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exp = em & 0x0f800000u;
  // normal: rebias the exponent; Inf / NaN: all ones exponent
  const uint32_t normal =
      em + ((127u - 15u) << 23) + (exp == 0x0f800000u ? (128u - 16u) << 23 : 0u);
  // zero or subnormal: renormalised through a float subtraction (exact)
  const uint32_t small =
      float_to_bits(bits_to_float(em + (113u << 23)) - bits_to_float(113u << 23));
  return bits_to_float((exp == 0 ? small : normal) | sign);
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

template <typename T>
KFK_ALWAYS_INLINE T load(const float* p) {
  return static_cast<T>(*p);
}
template <typename T>
KFK_ALWAYS_INLINE T load(const double* p) {
  return static_cast<T>(*p);
}
template <typename T>
KFK_ALWAYS_INLINE T load(const Half* p) {
  return static_cast<T>(half_to_float(p->bits));
}
template <typename T>
KFK_ALWAYS_INLINE T load(const BFloat16* p) {
  return static_cast<T>(bf16_to_float(p->bits));
}

// ---------------------------------------------------------------------------------------------
// Geometry shared by both modes.

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Output positions o in [0, out) whose input index o * stride + offset lies in [0, size).
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out, int64_t* lo,
                        int64_t* hi) {
  int64_t a = floor_div(-offset + stride - 1, stride);        // ceil(-offset / stride)
  int64_t b = floor_div(size - 1 - offset, stride) + 1;       // floor((size-1-offset)/stride)+1
  a = std::max<int64_t>(a, 0);
  b = std::min<int64_t>(b, out);
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

struct Geometry {
  int64_t khkw = 0;
  int64_t rows_per_example = 0;  // out_h * out_w
  std::vector<int64_t> oh_lo, oh_hi;  // per kernel row i: valid output rows
  std::vector<int64_t> ow_lo, ow_hi;  // per kernel column j: valid output columns
  std::vector<int64_t> offset;        // per (i, j): (i*dh - pt) * sH + (j*dw - pl) * sW

  explicit Geometry(const PatchCovarianceParams& p) {
    khkw = p.kernel_h * p.kernel_w;
    rows_per_example = p.out_h * p.out_w;
    oh_lo.resize(p.kernel_h), oh_hi.resize(p.kernel_h);
    ow_lo.resize(p.kernel_w), ow_hi.resize(p.kernel_w);
    for (int64_t i = 0; i < p.kernel_h; ++i)
      valid_range(i * p.dilation_h - p.pad_top, p.stride_h, p.height, p.out_h, &oh_lo[i],
                  &oh_hi[i]);
    for (int64_t j = 0; j < p.kernel_w; ++j)
      valid_range(j * p.dilation_w - p.pad_left, p.stride_w, p.width, p.out_w, &ow_lo[j],
                  &ow_hi[j]);
    offset.resize(khkw);
    for (int64_t i = 0; i < p.kernel_h; ++i)
      for (int64_t j = 0; j < p.kernel_w; ++j)
        offset[i * p.kernel_w + j] = (i * p.dilation_h - p.pad_top) * p.x_stride_h +
                                     (j * p.dilation_w - p.pad_left) * p.x_stride_w;
  }
};

// ---------------------------------------------------------------------------------------------
// expand: packing

// Consecutive patch rows of one (n, oh): output columns ow .. ow + len - 1, panel rows
// k .. k + len - 1.
struct Run {
  int64_t k, len, oh, ow;
  int64_t base;  // element offset of x[n, 0, oh * stride_h, ow * stride_w]
};

// Splits the patch rows [r0, r1) into runs; returns how many (at most r1 - r0).
inline int64_t make_runs(const PatchCovarianceParams& p, int64_t R, int64_t r0, int64_t r1,
                         Run* runs) {
  int64_t count = 0;
  int64_t r = r0;
  while (r < r1) {
    const int64_t n = r / R, rem = r % R;
    const int64_t oh = rem / p.out_w, ow = rem % p.out_w;
    const int64_t len = std::min(p.out_w - ow, r1 - r);
    runs[count++] = Run{r - r0, len, oh, ow,
                        n * p.x_stride_n + oh * p.stride_h * p.x_stride_h +
                            ow * p.stride_w * p.x_stride_w};
    r += len;
  }
  return count;
}

// Panel of one segment: column d, row k at panel[(d / nr) * block_stride + k * nr + d % nr].
// Writes columns [d_begin, d_end) (patch coordinates, < segment_channels * khkw) of the runs.
template <typename T, typename In>
void pack_columns(const PatchCovarianceParams& p, const Geometry& g, int64_t c0, T* panel,
                  int64_t nr, int64_t block_stride, int64_t d_begin, int64_t d_end,
                  const Run* runs, int64_t nruns) {
  const In* x = static_cast<const In*>(p.x);
  const int64_t wstep = p.stride_w * p.x_stride_w;
  for (int64_t d = d_begin; d < d_end; ++d) {
    const int64_t c = c0 + d / g.khkw;
    const int64_t ij = d % g.khkw;
    const int64_t i = ij / p.kernel_w, j = ij % p.kernel_w;
    const int64_t col_off = c * p.x_stride_c + g.offset[ij];
    const int64_t olo = g.oh_lo[i], ohi = g.oh_hi[i], wlo = g.ow_lo[j], whi = g.ow_hi[j];
    T* dcol = panel + (d / nr) * block_stride + d % nr;
    for (int64_t q = 0; q < nruns; ++q) {
      const Run& run = runs[q];
      T* KFK_RESTRICT dst = dcol + run.k * nr;
      const int64_t len = run.len;
      if (run.oh < olo || run.oh >= ohi) {
        for (int64_t t = 0; t < len; ++t) dst[t * nr] = T(0);
        continue;
      }
      const int64_t a = std::min(std::max<int64_t>(wlo - run.ow, 0), len);
      const int64_t b = std::max(std::min<int64_t>(whi - run.ow, len), a);
      for (int64_t t = 0; t < a; ++t) dst[t * nr] = T(0);
      const int64_t src0 = run.base + col_off;
      if (wstep == 1) {
        const In* KFK_RESTRICT src = x + src0;
        for (int64_t t = a; t < b; ++t) dst[t * nr] = load<T>(src + t);
      } else {
        for (int64_t t = a; t < b; ++t) dst[t * nr] = load<T>(x + src0 + t * wstep);
      }
      for (int64_t t = b; t < len; ++t) dst[t * nr] = T(0);
    }
  }
}

// Zero panel (padding columns stay zero) with the bias column set to 1 (it never changes).
template <typename T>
void init_panel(T* panel, int64_t dpad, int64_t nr, int64_t block_stride, int64_t rows,
                int64_t bias_col) {
  std::memset(panel, 0, sizeof(T) * static_cast<size_t>(dpad / nr * block_stride));
  if (bias_col >= 0) {
    T* col = panel + (bias_col / nr) * block_stride + bias_col % nr;
    for (int64_t k = 0; k < rows; ++k) col[k * nr] = T(1);
  }
}

// ---------------------------------------------------------------------------------------------
// expand: one tile pair of one chunk

template <typename T>
struct PanelTile {
  const T* panel;        // the segment's panel (NR-blocked)
  int64_t block_stride;  // elements between column blocks of the panel
  int64_t kc;            // rows of the chunk
  int64_t ci, wi;        // first column and width of tile row ti
  int64_t cj, wj;        // first column and width of tile column tj
  bool diag;             // ti == tj: only the upper triangle is needed
  T* c;                  // the tile's accumulator (row stride ldc), added to
  int64_t ldc;           // kTile for a private tile, D when c is the tile's place in out
  bool exact;            // c holds only wi x wj values (it is out): a micro-kernel block that
                         // reaches past them is computed into a register-sized buffer first
  bool overwrite;        // the first rows' sums are stored to c rather than added (c = sum):
                         // c's blocks below the diagonal of a diagonal tile are then not set
};

template <typename T, int MR, int NR, int VL>
KFK_ALWAYS_INLINE void panel_tile(const PanelTile<T>& job) {
  using Micro = gram::MicroKernel<T, MR, NR, VL>;
  constexpr int NV = Micro::NV;
  static_assert(kTile % MR == 0 && kTile % NR == 0 && NR % MR == 0, "tile/panel blocking");
  const int64_t nbi = ceil_div(job.wi, MR);
  const int64_t nbj = ceil_div(job.wj, NR);
  const int64_t last_nv = ceil_div(job.wj - (nbj - 1) * NR, VL);
  const int64_t bs = job.block_stride;
  const int64_t ldc = job.ldc;
  alignas(64) T edge[MR * NR];
  for (int64_t k0 = 0; k0 < job.kc; k0 += kKc) {
    const int64_t kc = std::min(kKc, job.kc - k0);
    const bool store = job.overwrite && k0 == 0;
    for (int64_t jb = 0; jb < nbj; ++jb) {
      const T* bblk = job.panel + ((job.cj + jb * NR) / NR) * bs + k0 * NR;
      const int64_t cols = std::min<int64_t>(NR, job.wj - jb * NR);
      const bool narrow = NV > 1 && jb == nbj - 1 && last_nv == 1;
      for (int64_t ib = 0; ib < nbi; ++ib) {
        if (job.diag && ib * MR > jb * NR + NR - 1) break;
        const int64_t col = job.ci + ib * MR;
        const T* ablk = job.panel + (col / NR) * bs + col % NR + k0 * NR;
        T* cblk = job.c + ib * MR * ldc + jb * NR;
        const int64_t rows = std::min<int64_t>(MR, job.wi - ib * MR);
        if (job.exact && (rows < MR || cols < NR)) {
          // A block at the edge of out: its sums from zero, then stored or added in place
          // (the same rounding as the micro-kernel's own c + sum).
          Micro::template micro_rows<NV, NR, false>(rows, kc, ablk, bblk, edge, NR);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j)
              cblk[r * ldc + j] = store ? edge[r * NR + j] : cblk[r * ldc + j] + edge[r * NR + j];
        } else if (store) {
          if (narrow) {
            Micro::template micro_rows<1, NR, false>(rows, kc, ablk, bblk, cblk, ldc);
          } else {
            Micro::template micro_rows<NV, NR, false>(rows, kc, ablk, bblk, cblk, ldc);
          }
        } else if (narrow) {
          Micro::template micro_rows<1, NR>(rows, kc, ablk, bblk, cblk, ldc);
        } else {
          Micro::template micro_rows<NV, NR>(rows, kc, ablk, bblk, cblk, ldc);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Writing a tile: out[s][i][j] and out[s][j][i] from the tile's sums g (upper triangle only on a
// diagonal tile),
//     out[i][j] = decay * factor[i][j] + alpha * g,  out[j][i] = decay * factor[j][i] + alpha * g.
// The values of both triangles are staged in kTile x kTile buffers, the mirrored ones through an
// in-register block transpose, so that out is written along its rows only. Large outputs are
// written with non-temporal stores (no read-for-ownership of lines that are overwritten whole).

template <typename T>
struct FinalizeJob {
  const PatchCovarianceParams* p;
  int64_t d, segment;
  const T* g;        // kTile x kTile sums (row stride kTile)
  T* scratch;        // kScratchTiles * kTile * kTile
  int64_t ci, wi, cj, wj;
  bool diag;
  bool streaming;    // non-temporal stores
};

constexpr int64_t kScratchTiles = 5;
constexpr int64_t kStreamingBytes = int64_t(8) << 20;  // outputs at least this large stream

#if KFK_HAVE_VECTOR_EXT && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KFK_HAVE_SHUFFLE 1
#endif
#endif
#ifndef KFK_HAVE_SHUFFLE
#define KFK_HAVE_SHUFFLE 0
#endif

// dst[j][i] = src[i][j] for one B x B block (B = 8 floats or 4 doubles: one 32-byte row).
template <typename T>
struct Transpose;

template <>
struct Transpose<float> {
  static constexpr int B = 8;
  static KFK_ALWAYS_INLINE void block(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if KFK_HAVE_SHUFFLE
    typedef float v8 __attribute__((vector_size(32)));
    v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * lds, sizeof(v8));
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; ++i) {
      const v8 lo = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      const v8 hi = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      std::memcpy(dst + i * ldd, &lo, sizeof(v8));
      std::memcpy(dst + (i + 4) * ldd, &hi, sizeof(v8));
    }
#else
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
  }
};

template <>
struct Transpose<double> {
  static constexpr int B = 4;
  static KFK_ALWAYS_INLINE void block(const double* src, int64_t lds, double* dst, int64_t ldd) {
#if KFK_HAVE_SHUFFLE
    typedef double v4 __attribute__((vector_size(32)));
    v4 r[4];
    for (int i = 0; i < 4; ++i) std::memcpy(&r[i], src + i * lds, sizeof(v4));
    const v4 t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6);
    const v4 t1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
    const v4 t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6);
    const v4 t3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
    const v4 o0 = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    const v4 o1 = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    const v4 o2 = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    const v4 o3 = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
    std::memcpy(dst, &o0, sizeof(v4));
    std::memcpy(dst + ldd, &o1, sizeof(v4));
    std::memcpy(dst + 2 * ldd, &o2, sizeof(v4));
    std::memcpy(dst + 3 * ldd, &o3, sizeof(v4));
#else
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
  }
};

// dst[c][r] = src[r][c] for r < rows, c < cols (rounded up to blocks; both kTile x kTile).
template <typename T>
KFK_ALWAYS_INLINE void transpose_tile(const T* src, T* dst, int64_t rows, int64_t cols) {
  constexpr int B = Transpose<T>::B;
  for (int64_t bi = 0; bi < rows; bi += B)
    for (int64_t bj = 0; bj < cols; bj += B)
      Transpose<T>::block(src + bi * kTile + bj, kTile, dst + bj * kTile + bi, kTile);
}

// Row stores: plain, or non-temporal for the whole 64-byte lines of the row.
struct PlainStore {
  template <typename T>
  static KFK_ALWAYS_INLINE void line(T* dst, const T* src) {
    std::memcpy(dst, src, 64);
  }
};

#if KFK_X86_DISPATCH
struct Avx2Store {
  KFK_TARGET("avx2") static inline void line(float* dst, const float* src) {
    _mm256_stream_ps(dst, _mm256_loadu_ps(src));
    _mm256_stream_ps(dst + 8, _mm256_loadu_ps(src + 8));
  }
  KFK_TARGET("avx2") static inline void line(double* dst, const double* src) {
    _mm256_stream_pd(dst, _mm256_loadu_pd(src));
    _mm256_stream_pd(dst + 4, _mm256_loadu_pd(src + 4));
  }
};
struct Avx512Store {
  KFK_TARGET("avx512f") static inline void line(float* dst, const float* src) {
    _mm512_stream_ps(dst, _mm512_loadu_ps(src));
  }
  KFK_TARGET("avx512f") static inline void line(double* dst, const double* src) {
    _mm512_stream_pd(dst, _mm512_loadu_pd(src));
  }
};
#endif

// dst[0, n) = src[0, n) with plain stores, n < 2 * 64 / sizeof(T) (fixed-size copies).
template <typename T>
KFK_ALWAYS_INLINE void copy_short(T* dst, const T* src, int64_t n) {
  constexpr int64_t L = 64 / sizeof(T);  // elements per line
  int64_t e = 0;
  if (n - e >= L) std::memcpy(dst + e, src + e, 64), e += L;
  if (n - e >= L / 2) std::memcpy(dst + e, src + e, 32), e += L / 2;
  if (n - e >= L / 4) std::memcpy(dst + e, src + e, 16), e += L / 4;
  for (; e < n; ++e) dst[e] = src[e];
}

// dst[0, n) = scale * src[0, n) (kScale) or src[0, n): whole 64-byte lines of dst through Store
// when streaming, plain stores otherwise. The scaling costs nothing here: writing out is bound by
// memory bandwidth.
template <typename Store, bool kScale = false, typename T>
KFK_ALWAYS_INLINE void write_row(T* KFK_RESTRICT dst, const T* KFK_RESTRICT src, int64_t n,
                                 bool streaming, T scale = T(1)) {
  constexpr int64_t L = 64 / sizeof(T);  // elements per line
  alignas(64) T line[L];
  auto scaled_line = [&](const T* s) {
    for (int64_t l = 0; l < L; ++l) line[l] = scale * s[l];
    return static_cast<const T*>(line);
  };
  auto put_short = [&](T* d, const T* s, int64_t m) {
    if (kScale) {
      for (int64_t e = 0; e < m; ++e) d[e] = scale * s[e];
    } else {
      copy_short(d, s, m);
    }
  };
  const uintptr_t mis = reinterpret_cast<uintptr_t>(dst) % 64;
  if (!streaming || mis % sizeof(T) != 0) {
    int64_t e = 0;
    for (; e + L <= n; e += L) std::memcpy(dst + e, kScale ? scaled_line(src + e) : src + e, 64);
    put_short(dst + e, src + e, n - e);
    return;
  }
  const int64_t head = std::min<int64_t>(n, mis == 0 ? 0 : (64 - mis) / sizeof(T));
  put_short(dst, src, head);
  int64_t e = head;
  for (; e + L <= n; e += L) Store::line(dst + e, kScale ? scaled_line(src + e) : src + e);
  put_short(dst + e, src + e, n - e);
}

template <typename T, typename Store>
KFK_ALWAYS_INLINE void finalize_tile(const FinalizeJob<T>& f) {
  const PatchCovarianceParams& p = *f.p;
  const int64_t d = f.d, ci = f.ci, cj = f.cj, wi = f.wi, wj = f.wj;
  T* outs = static_cast<T*>(p.out) + f.segment * d * d;
  const T alpha = static_cast<T>(p.alpha);
  const T* KFK_RESTRICT g = f.g;
  T* KFK_RESTRICT up = f.scratch;                // up[r][c]: out[ci + r][cj + c]
  T* KFK_RESTRICT lo = f.scratch + kTile * kTile;  // lo[c][r]: out[cj + c][ci + r]
  if (p.factor == nullptr) {
    // out = alpha * g: the scaling is done while writing (both triangles round alike).
    transpose_tile(g, lo, wi, wj);
    for (int64_t r = 0; r < wi; ++r) {
      const int64_t c0 = f.diag ? r : 0;
      write_row<Store, true>(outs + (ci + r) * d + cj + c0, g + r * kTile + c0, wj - c0,
                             f.streaming, alpha);
    }
    for (int64_t c = 0; c < wj; ++c) {
      const int64_t n = f.diag ? std::min(c + 1, wi) : wi;
      write_row<Store, true>(outs + (cj + c) * d + ci, lo + c * kTile, n, f.streaming, alpha);
    }
    return;
  } else {
    const T decay = static_cast<T>(p.decay);
    const T* fs = static_cast<const T*>(p.factor) + f.segment * p.factor_stride_batch;
    const int64_t sr = p.factor_stride_row, sc = p.factor_stride_col;
    T* KFK_RESTRICT fu = f.scratch + 2 * kTile * kTile;  // factor[ci + r][cj + c]
    T* KFK_RESTRICT ag = f.scratch + 3 * kTile * kTile;  // alpha * g
    T* KFK_RESTRICT tt = f.scratch + 4 * kTile * kTile;  // transposes
    for (int64_t r = 0; r < wi; ++r) {
      const T* frow = fs + (ci + r) * sr + cj * sc;
      for (int64_t c = 0; c < wj; ++c) {
        const T fij = frow[c * sc];
        const T gv = alpha * g[r * kTile + c];
        fu[r * kTile + c] = fij;
        ag[r * kTile + c] = gv;
        up[r * kTile + c] = decay * fij + gv;
      }
    }
    transpose_tile(up, lo, wi, wj);
    transpose_tile(fu, tt, wi, wj);  // tt[c][r] = factor[i][j]
    bool general = false;
    for (int64_t c = 0; c < wj && !general; ++c) {
      const T* frow = fs + (cj + c) * sr + ci * sc;
      for (int64_t r = 0; r < (f.diag ? std::min(c + 1, wi) : wi); ++r)
        general |= !(frow[r * sc] == tt[c * kTile + r]);
    }
    if (general) {
      // factor[j][i] != factor[i][j] somewhere: out[j][i] = decay * factor[j][i] + alpha * g
      // there (where they are equal, the value of out[i][j] is kept: bitwise symmetric).
      transpose_tile(ag, fu, wi, wj);  // fu[c][r] = alpha * g
      for (int64_t c = 0; c < wj; ++c) {
        const T* frow = fs + (cj + c) * sr + ci * sc;
        for (int64_t r = 0; r < wi; ++r) {
          const T fji = frow[r * sc];
          if (!(fji == tt[c * kTile + r])) lo[c * kTile + r] = decay * fji + fu[c * kTile + r];
        }
      }
    }
  }
  for (int64_t r = 0; r < wi; ++r) {
    const int64_t c0 = f.diag ? r : 0;
    write_row<Store>(outs + (ci + r) * d + cj + c0, up + r * kTile + c0, wj - c0, f.streaming);
  }
  for (int64_t c = 0; c < wj; ++c) {
    const int64_t n = f.diag ? std::min(c + 1, wi) : wi;
    write_row<Store>(outs + (cj + c) * d + ci, lo + c * kTile, n, f.streaming);
  }
}

// ---------------------------------------------------------------------------------------------
// Per code path: the tile function, the tile writer and the panel block width.

template <typename T>
struct Kernels {
  void (*tile)(const PanelTile<T>&);
  void (*finalize)(const FinalizeJob<T>&);
  void (*fence)();
  int64_t nr;
};

// Same blockings as the symmetric factor update.
void tile_generic_f32(const PanelTile<float>& j) { panel_tile<float, 4, 8, 4>(j); }
void tile_generic_f64(const PanelTile<double>& j) { panel_tile<double, 4, 4, 2>(j); }
void finalize_generic_f32(const FinalizeJob<float>& j) { finalize_tile<float, PlainStore>(j); }
void finalize_generic_f64(const FinalizeJob<double>& j) { finalize_tile<double, PlainStore>(j); }
void fence_none() {}

#if KFK_X86_DISPATCH
KFK_TARGET("avx2,fma") void tile_avx2_f32(const PanelTile<float>& j) {
  panel_tile<float, 4, 16, 8>(j);
}
KFK_TARGET("avx2,fma") void tile_avx2_f64(const PanelTile<double>& j) {
  panel_tile<double, 4, 8, 4>(j);
}
KFK_TARGET("avx512f,avx2,fma") void tile_avx512_f32(const PanelTile<float>& j) {
  panel_tile<float, 8, 32, 16>(j);
}
KFK_TARGET("avx512f,avx2,fma") void tile_avx512_f64(const PanelTile<double>& j) {
  panel_tile<double, 8, 16, 8>(j);
}
KFK_TARGET("avx2,fma") void finalize_avx2_f32(const FinalizeJob<float>& j) {
  finalize_tile<float, Avx2Store>(j);
}
KFK_TARGET("avx2,fma") void finalize_avx2_f64(const FinalizeJob<double>& j) {
  finalize_tile<double, Avx2Store>(j);
}
KFK_TARGET("avx512f,avx2,fma") void finalize_avx512_f32(const FinalizeJob<float>& j) {
  finalize_tile<float, Avx512Store>(j);
}
KFK_TARGET("avx512f,avx2,fma") void finalize_avx512_f64(const FinalizeJob<double>& j) {
  finalize_tile<double, Avx512Store>(j);
}
KFK_TARGET("avx2") void fence_store() { _mm_sfence(); }
#endif

template <typename T>
Kernels<T> kernels(int isa);

template <>
Kernels<float> kernels<float>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return {tile_avx512_f32, finalize_avx512_f32, fence_store, 32};
  if (isa == kIsaAvx2) return {tile_avx2_f32, finalize_avx2_f32, fence_store, 16};
#endif
  (void)isa;
  return {tile_generic_f32, finalize_generic_f32, fence_none, 8};
}

template <>
Kernels<double> kernels<double>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return {tile_avx512_f64, finalize_avx512_f64, fence_store, 16};
  if (isa == kIsaAvx2) return {tile_avx2_f64, finalize_avx2_f64, fence_store, 8};
#endif
  (void)isa;
  return {tile_generic_f64, finalize_generic_f64, fence_none, 4};
}

// The sum over the row slices of the tiles of one (segment, pair) item: the tiles of its slices
// are consecutive from `first`; added in slice order into `sum` when there are several.
template <typename T>
const T* slice_total(const T* first, int64_t slices, T* sum) {
  if (slices == 1) return first;
  std::memcpy(sum, first, sizeof(T) * kTile * kTile);
  for (int64_t s = 1; s < slices; ++s) {
    const T* part = first + s * kTile * kTile;
    for (int64_t e = 0; e < kTile * kTile; ++e) sum[e] += part[e];
  }
  return sum;
}

// The upper-triangle tile pairs (ti <= tj) of a D x D factor, row-major.
struct TilePairs {
  int64_t d, nt, count;
  std::vector<int64_t> ti, tj;
  explicit TilePairs(int64_t dim) : d(dim), nt(ceil_div(dim, kTile)), count(nt * (nt + 1) / 2) {
    for (int64_t a = 0; a < nt; ++a)
      for (int64_t b = a; b < nt; ++b) ti.push_back(a), tj.push_back(b);
  }
  template <typename T>
  PanelTile<T> job(int64_t q, const T* panel, int64_t block_stride, int64_t kc, T* c) const {
    PanelTile<T> j;
    j.panel = panel;
    j.block_stride = block_stride;
    j.kc = kc;
    j.ci = ti[q] * kTile, j.wi = std::min(kTile, d - j.ci);
    j.cj = tj[q] * kTile, j.wj = std::min(kTile, d - j.cj);
    j.diag = ti[q] == tj[q];
    j.c = c;
    j.ldc = kTile;
    j.exact = false;
    j.overwrite = false;
    return j;
  }
};

// ---------------------------------------------------------------------------------------------
// expand: driver

template <typename T, typename In>
void expand(const PatchCovarianceParams& p) {
  const int64_t S = p.num_segments, D = p.dim();
  const Geometry g(p);
  const int64_t dx = p.segment_channels * g.khkw;  // patch columns (without the bias)
  const int64_t bias_col = p.bias ? D - 1 : -1;
  const int64_t R = g.rows_per_example;
  const int64_t M = p.n * R;

  const Kernels<T> kern = kernels<T>(current_isa());
  const int64_t nr = kern.nr;
  const bool streaming = static_cast<double>(S) * static_cast<double>(D) * static_cast<double>(D) *
                             sizeof(T) >= static_cast<double>(kStreamingBytes);
  const TilePairs tp(D);
  const int64_t npairs = tp.count;
  const int64_t base = S * npairs;
  const bool fused = npairs == 1;

  // Row slices when there are few (segment, pair) items, and the chunk length. Both are
  // functions of the shape only (the panel width used here does not depend on the code path).
  int64_t slices = 1;
  if (base < kTargetItems && M >= 2 * kMinRowsPerSlice)
    slices = std::min(ceil_div(kTargetItems, base), M / kMinRowsPerSlice);
  const int64_t rows_per_slice = std::max<int64_t>(round_up(ceil_div(M, slices), kKc), 1);
  slices = std::max<int64_t>(ceil_div(M, rows_per_slice), 1);
  int64_t chunk = kChunk;
  if (!fused) {
    // One shared panel per (slice, segment), together at most kMaxSharedPanel elements and about
    // 1 / kUnfoldFraction of the unfolded matrix (M * S * dx elements), so that the temporaries
    // stay far below what im2col would take.
    chunk = kMaxChunk;
    const double unfold = static_cast<double>(M) * static_cast<double>(S) * static_cast<double>(dx);
    const int64_t width = slices * S * round_up(D, kTile);
    while (chunk > kMinChunk &&
           (width * chunk > kMaxSharedPanel ||
            static_cast<double>(width * chunk) * kUnfoldFraction > unfold))
      chunk /= 2;
  }
  chunk = std::min(chunk, round_up(rows_per_slice, kKc));
  const int64_t steps = M > 0 ? ceil_div(rows_per_slice, chunk) : 0;
  // Slice s, step t: rows [s * rows_per_slice + t * chunk, ...), at most `chunk` of them.
  auto chunk_rows = [&](int64_t s, int64_t t, int64_t* r0) {
    const int64_t begin = s * rows_per_slice + t * chunk;
    const int64_t end = std::min({M, (s + 1) * rows_per_slice, begin + chunk});
    *r0 = begin;
    return std::max<int64_t>(end - begin, 0);
  };

  const int64_t dpad = round_up(D, nr);
  const int64_t block_stride = chunk * nr;
  const int64_t panel_size = dpad * chunk;  // one (slice, segment)
  const int64_t items = slices * base;
  const double work = static_cast<double>(base) * kTile * kTile * static_cast<double>(M) +
                      static_cast<double>(M) * static_cast<double>(S) * static_cast<double>(dx);
  const bool parallel = items > 1 && work > 2.0e5;
  (void)parallel;

  if (fused) {
    // One tile per segment: items of (group of segments, slice), each packing its rows chunk by
    // chunk into its own panel and multiplying right away. A group's segments go through each
    // chunk together, so that input lines they share (neighbouring channels of a channels_last
    // input) come from cache. The grouping decides only which thread does what, never a sum.
    int64_t threads = 1;
#ifdef _OPENMP
    threads = parallel ? omp_get_max_threads() : 1;
#endif
    const int64_t group = std::min<int64_t>(16, std::max<int64_t>(1, items / (4 * threads)));
    const int64_t gitems = ceil_div(S, group) * slices;
    Buffer<T> partial(slices > 1 ? static_cast<size_t>(items * kTile * kTile) : 0);
#ifdef _OPENMP
#pragma omp parallel if (parallel && gitems > 1)
#endif
    {
      Buffer<T> panel(static_cast<size_t>(panel_size)), ctile(group * kTile * kTile);
      Buffer<T> scratch(kScratchTiles * kTile * kTile);
      Buffer<Run> runs(static_cast<size_t>(chunk));
      init_panel(panel.get(), dpad, nr, block_stride, chunk, bias_col);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t it = 0; it < gitems; ++it) {
        const int64_t s = it % slices, seg0 = (it / slices) * group;
        const int64_t nseg = std::min(group, S - seg0);
        auto acc = [&](int64_t q) {  // the tile of segment seg0 + q
          return slices > 1 ? partial.get() + ((seg0 + q) * slices + s) * kTile * kTile
                            : ctile.get() + q * kTile * kTile;
        };
        for (int64_t q = 0; q < nseg; ++q) std::memset(acc(q), 0, sizeof(T) * kTile * kTile);
        for (int64_t t = 0; t < steps; ++t) {
          int64_t r0;
          const int64_t kc = chunk_rows(s, t, &r0);
          if (kc <= 0) break;
          const int64_t nruns = make_runs(p, R, r0, r0 + kc, runs.get());
          for (int64_t q = 0; q < nseg; ++q) {
            pack_columns<T, In>(p, g, p.segment_start + (seg0 + q) * p.segment_step, panel.get(),
                                nr, block_stride, 0, dx, runs.get(), nruns);
            kern.tile(tp.job<T>(0, panel.get(), block_stride, kc, acc(q)));
          }
        }
        if (slices == 1)
          for (int64_t q = 0; q < nseg; ++q)
            kern.finalize({&p, D, seg0 + q, acc(q), scratch.get(), 0, D, 0, D, true, streaming});
      }
      if (slices > 1) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t seg = 0; seg < S; ++seg) {
          const T* total =
              slice_total(partial.get() + seg * slices * kTile * kTile, slices, ctile.get());
          kern.finalize({&p, D, seg, total, scratch.get(), 0, D, 0, D, true, streaming});
        }
      }
      if (streaming) kern.fence();
    }
    return;
  }

  // Several tiles per segment. Each step packs the chunk's panels (column blocks as work units),
  // then runs its tile pairs. Slice 0 of every (segment, pair) accumulates straight into the
  // pair's upper-triangle tile of out, which has to exist anyway (the first step stores, the
  // later ones add); the other slices, only present when there are few tile pairs, into small
  // private tiles. At the end each tile is read back, the slices are added in order, and the
  // tile is written out with its mirror. The temporaries are the panels and those few tiles:
  // O(chunk * D) + O(kTargetItems * kTile^2), never O(D^2).
  const int64_t col_blocks = ceil_div(dx, nr);
  const int64_t npanels = slices * S;
  T* const out = static_cast<T*>(p.out);
  Buffer<T> panels(static_cast<size_t>(npanels * panel_size));
  Buffer<T> partial(static_cast<size_t>((slices - 1) * base * kTile * kTile));
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t u = 0; u < npanels; ++u)
      init_panel(panels.get() + u * panel_size, dpad, nr, block_stride, chunk, bias_col);

    Buffer<Run> runs(static_cast<size_t>(chunk));
    const int64_t npack = npanels * col_blocks;
    for (int64_t t = 0; t < steps; ++t) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t v = 0; v < npack; ++v) {
        const int64_t blk = v % col_blocks, ps = v / col_blocks;  // ps = seg * slices + s
        const int64_t s = ps % slices, seg = ps / slices;
        int64_t r0;
        const int64_t kc = chunk_rows(s, t, &r0);
        if (kc <= 0) continue;
        const int64_t nruns = make_runs(p, R, r0, r0 + kc, runs.get());
        pack_columns<T, In>(p, g, p.segment_start + seg * p.segment_step,
                            panels.get() + ps * panel_size, nr, block_stride, blk * nr,
                            std::min(dx, (blk + 1) * nr), runs.get(), nruns);
      }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t u = 0; u < items; ++u) {
        // item u = (segment, pair, slice), slices innermost
        const int64_t s = u % slices, sp = u / slices;
        const int64_t seg = sp / npairs, q = sp % npairs;
        int64_t r0;
        const int64_t kc = chunk_rows(s, t, &r0);
        if (kc <= 0) continue;
        PanelTile<T> job = tp.job<T>(q, panels.get() + (seg * slices + s) * panel_size,
                                     block_stride, kc, static_cast<T*>(nullptr));
        if (s == 0) {
          job.c = out + seg * D * D + job.ci * D + job.cj;
          job.ldc = D;
          job.exact = true;
        } else {
          job.c = partial.get() + (sp * (slices - 1) + s - 1) * kTile * kTile;
        }
        job.overwrite = t == 0;  // every slice has rows in the first step
        kern.tile(job);
      }
    }

    Buffer<T> sum(kTile * kTile), scratch(kScratchTiles * kTile * kTile);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t sp = 0; sp < base; ++sp) {
      const int64_t seg = sp / npairs, q = sp % npairs;
      const PanelTile<T> j = tp.job<T>(q, static_cast<const T*>(nullptr), 0, 0, nullptr);
      // The tile's sums (upper triangle only on a diagonal tile): a copy, since writing the
      // tile out overwrites them.
      const T* tile = out + seg * D * D + j.ci * D + j.cj;
      T* KFK_RESTRICT acc = sum.get();
      for (int64_t r = 0; r < j.wi; ++r) {
        if (steps > 0) {
          std::memcpy(acc + r * kTile, tile + r * D, sizeof(T) * j.wj);
        } else {
          std::memset(acc + r * kTile, 0, sizeof(T) * j.wj);
        }
      }
      for (int64_t s = 1; s < slices; ++s) {
        const T* part = partial.get() + (sp * (slices - 1) + s - 1) * kTile * kTile;
        for (int64_t r = 0; r < j.wi; ++r)
          for (int64_t c = 0; c < j.wj; ++c) acc[r * kTile + c] += part[r * kTile + c];
      }
      kern.finalize({&p, D, seg, acc, scratch.get(), j.ci, j.wi, j.cj, j.wj, j.diag, streaming});
    }
    if (streaming) kern.fence();
  }
}

// ---------------------------------------------------------------------------------------------
// reduce: mean patches
//
// abar_n[c, i, j] = window sum over the input positions of kernel offset (i, j), divided by R.
// Per (example, channel) -- or per (example, block of kChannelBlock channels) when channels are
// the closer dimension in memory (channels_last), so that the additions run along them, or when
// the planes are small (kSmallPlane), so that the per-plane overhead is shared:
//   rowsum[i][w] = sum over the input rows h of kernel row i of x[h, w]
//   abar[i][j]   = sum over the input columns w of kernel column j of rowsum[i][w], / R,
// each sum formed as AxisPlan says, by additions only.

constexpr int64_t kChannelBlock = 16;
constexpr int64_t kSmallPlane = 64;  // planes of at most this many values: channel blocks

// How the window sums of one axis (kernel rows over input rows, or kernel columns over input
// columns) are formed, worked out once per call. Kernel offset k reads the input indices
// first(k), first(k) + step, ..., last(k). The offsets whose indices have the same residue modulo
// the step share all but a few indices (with stride 1 and no padding: all but kernel - 1): the
// indices every member of such a class reads (the class's core) are summed once, and a member's
// sum is the core's plus its own indices outside the core -- additions of the member's own
// indices only, so a value outside its range never enters it (a subtraction of a union's sum
// would lose the member's digits to a large value outside it, and turn it into NaN for an inf
// one). A member whose margins are longer than its range is summed directly.
struct AxisOp {
  enum Kind : int { kEmpty, kCore, kFromCore, kDirect } kind;
  int64_t k;       // kernel offset (kEmpty, kFromCore, kDirect)
  int64_t a, b;    // its first and last index; for kCore the core's
  int64_t c0, c1;  // kFromCore: the core's first and last index
};

struct AxisPlan {
  int64_t step = 1;
  std::vector<AxisOp> ops;
  std::vector<int64_t> first, last;  // per kernel offset (first > last: reads nothing)

  AxisPlan(int64_t n, const std::vector<int64_t>& lo, const std::vector<int64_t>& hi,
           int64_t stride, int64_t dilation, int64_t pad)
      : step(stride), first(n), last(n) {
    std::vector<char> done(static_cast<size_t>(n), 0);
    for (int64_t k = 0; k < n; ++k) {
      first[k] = lo[k] * stride + k * dilation - pad;
      last[k] = (hi[k] - 1) * stride + k * dilation - pad;
    }
    for (int64_t k0 = 0; k0 < n; ++k0) {
      if (done[k0]) continue;
      if (lo[k0] >= hi[k0]) {
        ops.push_back({AxisOp::kEmpty, k0, 0, -1, 0, -1});
        continue;
      }
      std::vector<int64_t> members;
      int64_t c0 = first[k0], c1 = last[k0];
      for (int64_t k = k0; k < n; ++k)
        if (!done[k] && lo[k] < hi[k] && (first[k] - first[k0]) % stride == 0) {
          members.push_back(k), done[k] = 1;
          c0 = std::max(c0, first[k]), c1 = std::min(c1, last[k]);
        }
      // from the core where that reads fewer indices than the member's own range, and only
      // when two members at least share the core (else it is one more pass for nothing)
      std::vector<char> from_core(members.size(), 0);
      size_t users = 0;
      for (size_t m = 0; m < members.size() && members.size() > 1 && c0 <= c1; ++m) {
        const int64_t a = first[members[m]], b = last[members[m]];
        from_core[m] = (c0 - a) + (b - c1) + stride < b - a + stride;
        users += from_core[m] != 0;
      }
      if (users < 2) std::fill(from_core.begin(), from_core.end(), 0);
      if (users >= 2) ops.push_back({AxisOp::kCore, -1, c0, c1, c0, c1});
      for (size_t m = 0; m < members.size(); ++m) {
        const int64_t k = members[m];
        ops.push_back({from_core[m] ? AxisOp::kFromCore : AxisOp::kDirect, k, first[k], last[k],
                       c0, c1});
      }
    }
  }
};

struct MeanPlan {
  AxisPlan rows, cols;
  explicit MeanPlan(const PatchCovarianceParams& p, const Geometry& g)
      : rows(p.kernel_h, g.oh_lo, g.oh_hi, p.stride_h, p.dilation_h, p.pad_top),
        cols(p.kernel_w, g.ow_lo, g.ow_hi, p.stride_w, p.dilation_w, p.pad_left) {}
};

template <typename T>
struct MeanJob {
  const PatchCovarianceParams* p;
  const Geometry* g;
  const MeanPlan* plan;
  int64_t ch0, nch;  // channels [ch0, ch0 + nch)
  int64_t cb;        // channels per unit: 1 or kChannelBlock
  T* abar;           // abar[n][ch - ch0][i * kernel_w + j]
};

// acc[w][b] += x[w][b] for w < W, b < nb (B values per w; x at src + w * sw + b * sc).
template <typename T, typename In, int B>
KFK_ALWAYS_INLINE void add_line(T* KFK_RESTRICT acc, const In* src, int64_t W, int64_t sw,
                                int64_t sc, int64_t nb) {
  if (B == 1) {
    if (sw == 1) {
      const In* KFK_RESTRICT s = src;
      for (int64_t w = 0; w < W; ++w) acc[w] += load<T>(s + w);
    } else {
      for (int64_t w = 0; w < W; ++w) acc[w] += load<T>(src + w * sw);
    }
  } else if (nb == B && sc == 1) {
    for (int64_t w = 0; w < W; ++w) {
      const In* KFK_RESTRICT s = src + w * sw;
      T* KFK_RESTRICT a = acc + w * B;
      for (int b = 0; b < B; ++b) a[b] += load<T>(s + b);
    }
  } else {
    for (int64_t w = 0; w < W; ++w) {
      const In* s = src + w * sw;
      T* KFK_RESTRICT a = acc + w * B;
      for (int64_t b = 0; b < nb; ++b) a[b] += load<T>(s + b * sc);
    }
  }
}

// Mean patches of channels xc[0, nb) (channel stride sc) of one example into
// out[b * khkw + i * kw + j] (the AxisPlan scheme along rows, then along columns). `work` holds
// (kernel_h + 1) * width * B values.
template <typename T, typename In, int B>
KFK_ALWAYS_INLINE void mean_patches(const PatchCovarianceParams& p, const Geometry& g,
                                    const MeanPlan& plan, const In* xc, int64_t nb, T* work,
                                    T* out) {
  const int64_t kh = p.kernel_h, kw = p.kernel_w, W = p.width, WB = W * B;
  const int64_t sH = p.x_stride_h, sW = p.x_stride_w, sC = p.x_stride_c;
  const int64_t ph = plan.rows.step, pw = plan.cols.step;
  auto add = [&](T* acc, int64_t h) { add_line<T, In, B>(acc, xc + h * sH, W, sW, sC, nb); };

  // rowsum[i][w][b] = sum over the input rows h of kernel row i of x[h, w, b]
  T* core = work + kh * WB;
  for (const AxisOp& op : plan.rows.ops) {
    T* KFK_RESTRICT acc = op.kind == AxisOp::kCore ? core : work + op.k * WB;
    if (op.kind == AxisOp::kFromCore) {
      for (int64_t e = 0; e < WB; ++e) acc[e] = core[e];
      for (int64_t h = op.a; h < op.c0; h += ph) add(acc, h);
      for (int64_t h = op.c1 + ph; h <= op.b; h += ph) add(acc, h);
    } else {
      for (int64_t e = 0; e < WB; ++e) acc[e] = T(0);
      for (int64_t h = op.a; h <= op.b; h += ph) add(acc, h);
    }
  }

  // out[b][i][j] = sum over the input columns w of kernel column j of rowsum[i][w][b], / R
  const T r = static_cast<T>(g.rows_per_example);
  const int64_t khkw = g.khkw;
  for (int64_t i = 0; i < kh; ++i) {
    const T* acc = work + i * WB;
    T shared[B], sum[B];
    for (const AxisOp& op : plan.cols.ops) {
      T* s = op.kind == AxisOp::kCore ? shared : sum;
      if (op.kind == AxisOp::kFromCore) {
        for (int b = 0; b < B; ++b) s[b] = shared[b];
        for (int64_t w = op.a; w < op.c0; w += pw)
          for (int b = 0; b < B; ++b) s[b] += acc[w * B + b];
        for (int64_t w = op.c1 + pw; w <= op.b; w += pw)
          for (int b = 0; b < B; ++b) s[b] += acc[w * B + b];
      } else {
        for (int b = 0; b < B; ++b) s[b] = T(0);
        for (int64_t w = op.a; w <= op.b; w += pw)
          for (int b = 0; b < B; ++b) s[b] += acc[w * B + b];
      }
      if (op.kind != AxisOp::kCore)
        for (int64_t b = 0; b < nb; ++b) out[b * khkw + i * kw + op.k] = s[b] / r;
    }
  }
}

template <typename T, typename In, int B>
KFK_ALWAYS_INLINE void mean_units(const MeanJob<T>& job, int64_t u0, int64_t u1, T* work) {
  const PatchCovarianceParams& p = *job.p;
  const In* x = static_cast<const In*>(p.x);
  const int64_t blocks = ceil_div(job.nch, B);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / blocks, cl = (u % blocks) * B;
    const int64_t nb = std::min<int64_t>(B, job.nch - cl);
    mean_patches<T, In, B>(p, *job.g, *job.plan,
                           x + n * p.x_stride_n + (job.ch0 + cl) * p.x_stride_c, nb, work,
                           job.abar + (n * job.nch + cl) * job.g->khkw);
  }
}

template <typename T>
using MeanFn = void (*)(const MeanJob<T>&, int64_t, int64_t, T*);

template <typename T, typename In, int B>
void mean_generic(const MeanJob<T>& j, int64_t u0, int64_t u1, T* w) {
  mean_units<T, In, B>(j, u0, u1, w);
}
#if KFK_X86_DISPATCH
template <typename T, typename In, int B>
KFK_TARGET("avx2,fma") void mean_avx2(const MeanJob<T>& j, int64_t u0, int64_t u1, T* w) {
  mean_units<T, In, B>(j, u0, u1, w);
}
template <typename T, typename In, int B>
KFK_TARGET("avx512f,avx2,fma")
void mean_avx512(const MeanJob<T>& j, int64_t u0, int64_t u1, T* w) {
  mean_units<T, In, B>(j, u0, u1, w);
}
#endif

template <typename T, typename In, int B>
MeanFn<T> mean_fn(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return mean_avx512<T, In, B>;
  if (isa == kIsaAvx2) return mean_avx2<T, In, B>;
#endif
  (void)isa;
  return mean_generic<T, In, B>;
}

template <typename T, typename In>
void reduce(const PatchCovarianceParams& p) {
  const int64_t S = p.num_segments, D = p.dim(), N = p.n;
  const int64_t cs = p.segment_channels;
  const Geometry g(p);
  const int64_t khkw = g.khkw;

  const Kernels<T> kern = kernels<T>(current_isa());
  const int64_t nr = kern.nr;
  const bool streaming = static_cast<double>(S) * static_cast<double>(D) * static_cast<double>(D) *
                             sizeof(T) >= static_cast<double>(kStreamingBytes);
  const TilePairs tp(D);
  const int64_t npairs = tp.count;
  const int64_t items = S * npairs;

  // The mean patches of a segment as one panel of N rows (the abar^T abar operand).
  const int64_t dpad = round_up(D, nr);
  const int64_t block_stride = N * nr;
  const int64_t panel_size = dpad * N;
  Buffer<T> panels(static_cast<size_t>(S * panel_size));

  // Mean patches of every channel of the segments (nch of them from segment_start).
  const int64_t nch = (S - 1) * p.segment_step + cs;
  const MeanPlan plan(p, g);
  MeanJob<T> job{&p, &g, &plan, p.segment_start, nch, 1, nullptr};
  const int64_t asc = p.x_stride_c < 0 ? -p.x_stride_c : p.x_stride_c;
  const int64_t asw = p.x_stride_w < 0 ? -p.x_stride_w : p.x_stride_w;
  // channels_last: add along channels; small planes (a few rows of a few values): the per-plane
  // work of one channel at a time is mostly loop overhead, kChannelBlock channels share it
  if (nch > 1 && (asc < asw || p.height * p.width <= kSmallPlane)) job.cb = kChannelBlock;
  const MeanFn<T> mean = job.cb == 1 ? mean_fn<T, In, 1>(current_isa())
                                     : mean_fn<T, In, kChannelBlock>(current_isa());
  Buffer<T> abar(static_cast<size_t>(N * nch * khkw));
  job.abar = abar.get();
  const int64_t units = N * ceil_div(nch, job.cb);
  const int64_t kUnitsPerCall = std::max<int64_t>(1, 64 / job.cb);
  const double work = static_cast<double>(N) * static_cast<double>(nch) *
                          static_cast<double>(p.height) * static_cast<double>(p.width) +
                      static_cast<double>(items) * kTile * kTile * static_cast<double>(N + 4);
  const bool parallel = work > 2.0e5;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t s = 0; s < (N > 0 ? S : 0); ++s)
      init_panel(panels.get() + s * panel_size, dpad, nr, block_stride, N, p.bias ? D - 1 : -1);

    {
      Buffer<T> work(static_cast<size_t>((p.kernel_h + 1) * p.width * job.cb));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t u = 0; u < units; u += kUnitsPerCall)
        mean(job, u, std::min(units, u + kUnitsPerCall), work.get());
    }
    // scatter into the segments' panels: column d = c * khkw + e of row n
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t sn = 0; sn < S * N; ++sn) {
      const int64_t s = sn / N, n = sn % N;
      const T* src = abar.get() + (n * nch + s * p.segment_step) * khkw;
      T* dst = panels.get() + s * panel_size + n * nr;
      for (int64_t d0 = 0; d0 < cs * khkw; d0 += nr)
        std::memcpy(dst + (d0 / nr) * block_stride, src + d0,
                    sizeof(T) * static_cast<size_t>(std::min(nr, cs * khkw - d0)));
    }

    Buffer<T> ctile(kTile * kTile), scratch(kScratchTiles * kTile * kTile);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t seg = it / npairs, q = it % npairs;
      PanelTile<T> job =
          tp.job<T>(q, panels.get() + seg * panel_size, block_stride, N, ctile.get());
      // The sums are stored, not added: only a diagonal tile (whose lower blocks are not
      // computed but are read when it is written out) or no rows at all need zeros first.
      job.overwrite = N > 0;
      if (N == 0 || job.diag) std::memset(ctile.get(), 0, sizeof(T) * kTile * kTile);
      if (N > 0) kern.tile(job);
      kern.finalize({&p, D, seg, ctile.get(), scratch.get(), job.ci, job.wi, job.cj, job.wj,
                     job.diag, streaming});
    }
    if (streaming) kern.fence();
  }
}

template <typename T, typename In>
void run(const PatchCovarianceParams& p) {
  if (p.reduce) {
    reduce<T, In>(p);
  } else {
    expand<T, In>(p);
  }
}

// A large output is usually fresh memory that the kernel writes whole: asking for transparent
// huge pages before the first write replaces 512 page faults by one per 2 MiB (an 85 MB output
// costs ~35 ms of 4 KiB faults at one thread). Advice only, for the 2 MiB-aligned part inside
// the output; where it is refused or unknown nothing changes.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) / kHuge * kHuge;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) / kHuge * kHuge;
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr, (void)bytes;
#endif
}

}  // namespace

void patch_covariance(const PatchCovarianceParams& p) {
  if (p.num_segments <= 0 || p.dim() <= 0) return;
  const size_t elem = p.x_type == ElementType::kFloat64 ? sizeof(double) : sizeof(float);
  advise_huge_pages(p.out, static_cast<size_t>(p.num_segments * p.dim() * p.dim()) * elem);
  switch (p.x_type) {
    case ElementType::kFloat32:
      run<float, float>(p);
      break;
    case ElementType::kFloat64:
      run<double, double>(p);
      break;
    case ElementType::kFloat16:
      run<float, Half>(p);
      break;
    case ElementType::kBFloat16:
      run<float, BFloat16>(p);
      break;
  }
}

}  // namespace cpu
}  // namespace kfac_kernels
