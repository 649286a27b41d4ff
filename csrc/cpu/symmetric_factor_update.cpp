// CPU kernel of the fused symmetric factor update (torch-free).
//
//     out[b] = decay * factor[b] + alpha * x[b]^T x[b]
//
// Work is split into output tiles of kTile x kTile; only the pairs (ti, tj) with ti <= tj are
// computed and each result is mirrored. For every tile pair, chunks of kKc rows of the two
// column panels of x are packed (from any strides) into contiguous, zero-padded micro-panels:
// the row panel in blocks of MR columns, the column panel in blocks of NR columns, k-major. A
// register-blocked MR x NR micro-kernel then streams through them. The micro-kernel is compiled
// three times (AVX-512, AVX2+FMA, baseline) and picked at run time from the CPU's features, so the
// library needs no -march flag.
//
// When there are few tile pairs but many rows, the rows are also split into slices whose partial
// sums are added in a fixed order afterwards. The split depends only on the problem size, never on
// the number of threads, so results are bitwise reproducible for any OMP_NUM_THREADS.
//
// The micro-kernel lives in gram_tiles.h (shared with patch_covariance.cpp), the ISA state in
// cpu_isa.cpp.
#include "symmetric_factor_update.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gram_tiles.h"

namespace kfac_kernels {
namespace cpu {
namespace {

using gram::Buffer;
using gram::ceil_div;
using gram::round_up;

constexpr int64_t kTile = 64;             // output tile edge
constexpr int64_t kKc = 128;              // rows of x packed per chunk
constexpr int64_t kMinRowsPerSlice = 512; // never split m into slices shorter than this
constexpr int64_t kTargetItems = 16;      // split m until there are about this many work items

// One tile pair over one range of rows.
template <typename T>
struct TileJob {
  const T* xb;           // x of this batch element
  int64_t srow, scol;    // strides of x along m and d
  int64_t ci, wi;        // first column and width of the row panel (tile row ti)
  int64_t cj, wj;        // first column and width of the column panel (tile column tj)
  bool diag;             // ti == tj: only the upper triangle is needed
  int64_t k_begin, k_end;
  T* apack;              // kKc * kTile scratch
  T* bpack;              // kKc * kTile scratch
  T* c;                  // kTile x kTile result (row stride kTile), overwritten
};

template <typename T, int MR, int NR, int VL>
struct Kernel {
  static_assert(kTile % MR == 0 && kTile % NR == 0, "tile must be a multiple of MR and NR");
  static constexpr int NV = NR / VL;

  using Micro = gram::MicroKernel<T, MR, NR, VL>;

  // The micro-kernel on blocks packed MR columns wide (a[k * MR + r]).
  template <int NVU>
  static KFK_ALWAYS_INLINE void micro_rows(int64_t rows, int64_t kc, const T* a, const T* b, T* c,
                                           int64_t ldc) {
    Micro::template micro_rows<NVU, MR>(rows, kc, a, b, c, ldc);
  }

  // dst[(blk * kc + k) * W + l] = x[k0 + k][c0 + blk * W + l], zero past column w.
  template <int W>
  static KFK_ALWAYS_INLINE void pack(const T* xb, int64_t srow, int64_t scol, int64_t k0,
                                     int64_t kc, int64_t c0, int64_t w, T* KFK_RESTRICT dst) {
    const int64_t nblk = ceil_div(w, W);
    if (scol == 1) {
      for (int64_t k = 0; k < kc; ++k) {
        const T* row = xb + (k0 + k) * srow + c0;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          T* out = dst + (blk * kc + k) * W;
          const int64_t n = std::min<int64_t>(W, w - blk * W);
          if (n == W) {
            std::memcpy(out, row + blk * W, W * sizeof(T));
          } else {
            for (int64_t l = 0; l < n; ++l) out[l] = row[blk * W + l];
            for (int64_t l = n; l < W; ++l) out[l] = T(0);
          }
        }
      }
    } else if ((scol < 0 ? -scol : scol) <= (srow < 0 ? -srow : srow)) {
      for (int64_t k = 0; k < kc; ++k) {
        const T* row = xb + (k0 + k) * srow + c0 * scol;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          T* out = dst + (blk * kc + k) * W;
          for (int64_t l = 0; l < W; ++l) {
            const int64_t col = blk * W + l;
            out[l] = col < w ? row[col * scol] : T(0);
          }
        }
      }
    } else {
      // Columns are closer together in memory along m: walk down each column.
      for (int64_t col = 0; col < nblk * W; ++col) {
        T* out = dst + (col / W) * kc * W + (col % W);
        if (col < w) {
          const T* src = xb + k0 * srow + (c0 + col) * scol;
          for (int64_t k = 0; k < kc; ++k) out[k * W] = src[k * srow];
        } else {
          for (int64_t k = 0; k < kc; ++k) out[k * W] = T(0);
        }
      }
    }
  }

  // Rows [0, round_up(wi, MR)) of job.c are overwritten; the result is in rows < wi, cols < wj.
  static KFK_ALWAYS_INLINE void tile(const TileJob<T>& job) {
    const int64_t nbi = ceil_div(job.wi, MR);
    const int64_t nbj = ceil_div(job.wj, NR);
    std::memset(job.c, 0, sizeof(T) * nbi * MR * kTile);
    // vectors of the last column block that hold columns < wj
    const int64_t last_nv = ceil_div(job.wj - (nbj - 1) * NR, VL);
    for (int64_t k0 = job.k_begin; k0 < job.k_end; k0 += kKc) {
      const int64_t kc = std::min(kKc, job.k_end - k0);
      pack<MR>(job.xb, job.srow, job.scol, k0, kc, job.ci, job.wi, job.apack);
      pack<NR>(job.xb, job.srow, job.scol, k0, kc, job.cj, job.wj, job.bpack);
      for (int64_t jb = 0; jb < nbj; ++jb) {
        const T* bblk = job.bpack + jb * kc * NR;
        for (int64_t ib = 0; ib < nbi; ++ib) {
          // On a diagonal tile, blocks entirely below the diagonal are not needed.
          if (job.diag && ib * MR > jb * NR + NR - 1) break;
          const T* ablk = job.apack + ib * kc * MR;
          T* cblk = job.c + ib * MR * kTile + jb * NR;
          const int64_t rows = std::min<int64_t>(MR, job.wi - ib * MR);
          if (NV > 1 && jb == nbj - 1 && last_nv == 1) {
            micro_rows<1>(rows, kc, ablk, bblk, cblk, kTile);
          } else {
            micro_rows<NV>(rows, kc, ablk, bblk, cblk, kTile);
          }
        }
      }
    }
  }
};

template <typename T>
using TileFn = void (*)(const TileJob<T>&);

// Baseline (SSE2 on x86-64, NEON on aarch64, scalar elsewhere).
void tile_generic_f32(const TileJob<float>& j) { Kernel<float, 4, 8, 4>::tile(j); }
void tile_generic_f64(const TileJob<double>& j) { Kernel<double, 4, 4, 2>::tile(j); }

#if KFK_X86_DISPATCH
KFK_TARGET("avx2,fma") void tile_avx2_f32(const TileJob<float>& j) {
  Kernel<float, 4, 16, 8>::tile(j);
}
KFK_TARGET("avx2,fma") void tile_avx2_f64(const TileJob<double>& j) {
  Kernel<double, 4, 8, 4>::tile(j);
}
KFK_TARGET("avx512f,avx2,fma") void tile_avx512_f32(const TileJob<float>& j) {
  Kernel<float, 8, 32, 16>::tile(j);
}
KFK_TARGET("avx512f,avx2,fma") void tile_avx512_f64(const TileJob<double>& j) {
  Kernel<double, 8, 16, 8>::tile(j);
}
#endif

template <typename T>
TileFn<T> tile_fn(int isa);

template <>
TileFn<float> tile_fn<float>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return tile_avx512_f32;
  if (isa == kIsaAvx2) return tile_avx2_f32;
#endif
  (void)isa;
  return tile_generic_f32;
}

template <>
TileFn<double> tile_fn<double>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return tile_avx512_f64;
  if (isa == kIsaAvx2) return tile_avx2_f64;
#endif
  (void)isa;
  return tile_generic_f64;
}

// Write the tile's entries (upper triangle only on a diagonal tile) to out[i][j] and out[j][i].
template <typename T>
void finalize(const SymmetricFactorUpdateParams<T>& p, int64_t b, const T* g, int64_t ci,
              int64_t wi, int64_t cj, int64_t wj, bool diag) {
  const int64_t d = p.d;
  T* outb = p.out + b * d * d;
  const T alpha = p.alpha;
  if (p.factor == nullptr) {
    for (int64_t r = 0; r < wi; ++r) {
      const int64_t i = ci + r;
      for (int64_t c = diag ? r : 0; c < wj; ++c) {
        const int64_t j = cj + c;
        const T v = alpha * g[r * kTile + c];
        outb[i * d + j] = v;
        outb[j * d + i] = v;
      }
    }
    return;
  }
  const T decay = p.decay;
  const T* fb = p.factor + b * p.factor_stride_batch;
  const int64_t sr = p.factor_stride_row, sc = p.factor_stride_col;
  for (int64_t r = 0; r < wi; ++r) {
    const int64_t i = ci + r;
    for (int64_t c = diag ? r : 0; c < wj; ++c) {
      const int64_t j = cj + c;
      const T gv = alpha * g[r * kTile + c];
      const T fij = fb[i * sr + j * sc];
      const T fji = fb[j * sr + i * sc];
      const T vij = decay * fij + gv;
      // Equal factor entries give bitwise equal outputs, whatever the compiler contracts.
      const T vji = (fji == fij) ? vij : decay * fji + gv;
      outb[i * d + j] = vij;
      outb[j * d + i] = vji;
    }
  }
}

template <typename T>
void run(const SymmetricFactorUpdateParams<T>& p) {
  const int64_t batch = p.batch, m = p.m, d = p.d;
  if (batch <= 0 || d <= 0) return;
  const TileFn<T> tile = tile_fn<T>(current_isa());

  const int64_t nt = ceil_div(d, kTile);
  const int64_t npairs = nt * (nt + 1) / 2;
  const int64_t base = batch * npairs;

  int64_t slices = 1, rows_per_slice = std::max<int64_t>(m, 1);
  if (base < kTargetItems && m >= 2 * kMinRowsPerSlice) {
    slices = std::min(ceil_div(kTargetItems, base), m / kMinRowsPerSlice);
    rows_per_slice = round_up(ceil_div(m, slices), kKc);
    slices = ceil_div(m, rows_per_slice);
  }
  const int64_t items = base * slices;
  Buffer<T> partial(slices > 1 ? static_cast<size_t>(items * kTile * kTile) : 0);

  // pair index -> (ti, tj), ti <= tj, row-major over the upper triangle
  Buffer<int64_t> pair_ti(static_cast<size_t>(npairs)), pair_tj(static_cast<size_t>(npairs));
  {
    int64_t q = 0;
    for (int64_t ti = 0; ti < nt; ++ti)
      for (int64_t tj = ti; tj < nt; ++tj, ++q) {
        pair_ti.get()[q] = ti;
        pair_tj.get()[q] = tj;
      }
  }

  const double flops = static_cast<double>(base) * kTile * kTile * static_cast<double>(m) +
                       static_cast<double>(batch) * d * d;
  const bool parallel = items > 1 && flops > 2.0e5;
  (void)parallel;

#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    Buffer<T> apack(kKc * kTile), bpack(kKc * kTile), ctile(kTile * kTile);
    TileJob<T> job;
    job.srow = p.x_stride_row;
    job.scol = p.x_stride_col;
    job.apack = apack.get();
    job.bpack = bpack.get();

#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t s = it % slices;
      const int64_t bp = it / slices;
      const int64_t b = bp / npairs;
      const int64_t q = bp % npairs;
      const int64_t ti = pair_ti.get()[q], tj = pair_tj.get()[q];
      job.xb = p.x + b * p.x_stride_batch;
      job.ci = ti * kTile;
      job.wi = std::min(kTile, d - job.ci);
      job.cj = tj * kTile;
      job.wj = std::min(kTile, d - job.cj);
      job.diag = ti == tj;
      job.k_begin = s * rows_per_slice;
      job.k_end = std::min(m, job.k_begin + rows_per_slice);
      job.c = slices > 1 ? partial.get() + it * kTile * kTile : ctile.get();
      tile(job);
      if (slices == 1) finalize(p, b, ctile.get(), job.ci, job.wi, job.cj, job.wj, job.diag);
    }

    if (slices > 1) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t bp = 0; bp < base; ++bp) {
        const int64_t b = bp / npairs;
        const int64_t q = bp % npairs;
        const int64_t ti = pair_ti.get()[q], tj = pair_tj.get()[q];
        const int64_t ci = ti * kTile, cj = tj * kTile;
        const int64_t wi = std::min(kTile, d - ci), wj = std::min(kTile, d - cj);
        T* acc = ctile.get();
        const T* first = partial.get() + bp * slices * kTile * kTile;
        std::memcpy(acc, first, sizeof(T) * wi * kTile);
        for (int64_t s = 1; s < slices; ++s) {
          const T* part = first + s * kTile * kTile;
          for (int64_t e = 0; e < wi * kTile; ++e) acc[e] += part[e];
        }
        finalize(p, b, acc, ci, wi, cj, wj, ti == tj);
      }
    }
  }
}

}  // namespace

template <typename T>
void symmetric_factor_update(const SymmetricFactorUpdateParams<T>& p) {
  run<T>(p);
}

template void symmetric_factor_update<float>(const SymmetricFactorUpdateParams<float>&);
template void symmetric_factor_update<double>(const SymmetricFactorUpdateParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
