// CPU kernel of the fused symmetric factor update (torch-free).
//
//     out[b] = decay * factor[b] + alpha * x[b]^T x[b]
//
// Work is split into output tiles of kTile x kTile; only the pairs (ti, tj) with ti <= tj are
// computed and each result is mirrored. Rows of x are taken kKc at a time and packed (from any
// strides) into contiguous, zero-padded micro-panels, k-major, NR columns wide; the same packing
// serves as row panel (read MR columns at a time) and as column panel. A register-blocked
// MR x NR micro-kernel then streams through them. The micro-kernel is compiled three times
// (AVX-512, AVX2+FMA, baseline) and picked at run time from the CPU's features, so the library
// needs no -march flag.
//
// Usually (run_banded) each chunk of rows is packed once for a band of tile rows and every tile
// pair of the band is accumulated from it; packing per tile pair instead (two panels per pair
// and chunk) took a quarter of the time. Where the pairs outgrow one band (run_direct), each
// chunk is packed once for all of them and they accumulate straight into the output. When there are few tile pairs but many rows
// (run_sliced), the rows are also split into slices whose partial sums are added in a fixed order
// afterwards, and each work item packs its own panels. The split depends only on the problem
// size, never on the number of threads, so results are bitwise reproducible for any
// OMP_NUM_THREADS.
//
// The micro-kernel lives in gram_tiles.h (shared with patch_covariance.cpp), the ISA state in
// cpu_isa.cpp.
#include "symmetric_factor_update.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

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
// Rows of x packed per chunk. 256 rather than 128: 8-13% faster at d = 384..513, m = 2080 on one
// thread of an AVX-512 Xeon (the micro-kernel adds its sums to the tile half as often); 512 is
// slower again (the packed chunk, kKc x d, outgrows the core's share of L2).
constexpr int64_t kKc = 256;
constexpr int64_t kMinRowsPerSlice = 512; // never split m into slices shorter than this
constexpr int64_t kTargetItems = 16;      // split m until there are about this many work items

// Columns [c0, c0 + w) of the rows r0 <= k < r1 of the chunk of rows [k0, k0 + kc) of x, to be
// packed NR columns wide into dst.
template <typename T>
struct PackJob {
  const T* xb;
  int64_t srow, scol;
  int64_t k0, kc, r0, r1, c0, w;
  T* dst;
};

// One tile pair over one chunk of rows already packed (panels NR columns wide).
template <typename T>
struct PairJob {
  int64_t kc;
  const T* apanel;       // row panel (tile row ti)
  const T* bpanel;       // column panel (tile column tj)
  int64_t wi, wj;
  bool diag;
  T* c;                  // kTile x kTile partial result (row stride ldc), added to
  int64_t ldc;
};

template <typename T, int MR, int NR, int VL>
struct Kernel {
  static_assert(kTile % MR == 0 && kTile % NR == 0, "tile must be a multiple of MR and NR");
  static constexpr int NV = NR / VL;

  using Micro = gram::MicroKernel<T, MR, NR, VL>;

  // The micro-kernel on both operands packed NR columns wide (a[k * NR + r]): one packing serves
  // as row and as column panel, and packs whole 64-byte runs.
  template <int NVU>
  static KFK_ALWAYS_INLINE void micro_rows(int64_t rows, int64_t kc, const T* a, const T* b, T* c,
                                           int64_t ldc) {
    Micro::template micro_rows<NVU, NR>(rows, kc, a, b, c, ldc);
  }

  // c (row stride ldc) += A^T B over kc packed rows of a wi-column row panel and a wj-column
  // column panel (both packed NR columns wide); on a diagonal tile only the blocks that reach
  // the upper triangle. Blocks are written whole (MR rows rounded as micro_rows does, NR-column
  // vectors): c must have room for them past wi and wj, or the tile must be full.
  static KFK_ALWAYS_INLINE void panels(int64_t kc, const T* apanel, const T* bpanel, int64_t wi,
                                       int64_t wj, bool diag, T* c, int64_t ldc) {
    const int64_t nbi = ceil_div(wi, MR);
    const int64_t nbj = ceil_div(wj, NR);
    // vectors of the last column block that hold columns < wj
    const int64_t last_nv = ceil_div(wj - (nbj - 1) * NR, VL);
    for (int64_t jb = 0; jb < nbj; ++jb) {
      const T* bblk = bpanel + jb * kc * NR;
      for (int64_t ib = 0; ib < nbi; ++ib) {
        if (diag && ib * MR > jb * NR + NR - 1) break;
        const T* ablk = apanel + (ib * MR / NR) * kc * NR + (ib * MR) % NR;
        T* cblk = c + ib * MR * ldc + jb * NR;
        const int64_t rows = std::min<int64_t>(MR, wi - ib * MR);
        if (NV > 1 && jb == nbj - 1 && last_nv == 1) {
          micro_rows<1>(rows, kc, ablk, bblk, cblk, ldc);
        } else {
          micro_rows<NV>(rows, kc, ablk, bblk, cblk, ldc);
        }
      }
    }
  }

  // dst[(blk * kc + k) * W + l] = x[k0 + k][c0 + blk * W + l] for the rows r0 <= k < r1 of the
  // kc-row chunk, zero past column w.
  template <int W>
  static KFK_ALWAYS_INLINE void pack(const T* xb, int64_t srow, int64_t scol, int64_t k0,
                                     int64_t kc, int64_t r0, int64_t r1, int64_t c0, int64_t w,
                                     T* KFK_RESTRICT dst) {
    const int64_t nblk = ceil_div(w, W);
    if (scol == 1) {
      for (int64_t k = r0; k < r1; ++k) {
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
      for (int64_t k = r0; k < r1; ++k) {
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
          for (int64_t k = r0; k < r1; ++k) out[k * W] = src[k * srow];
        } else {
          for (int64_t k = r0; k < r1; ++k) out[k * W] = T(0);
        }
      }
    }
  }

  // Columns [c0, c0 + w) of kc rows from k0, packed NR columns wide (zeros past w).
  static KFK_ALWAYS_INLINE void pack_columns(const PackJob<T>& job) {
    pack<NR>(job.xb, job.srow, job.scol, job.k0, job.kc, job.r0, job.r1, job.c0, job.w,
             job.dst);
  }

  static KFK_ALWAYS_INLINE void pair(const PairJob<T>& job) {
    panels(job.kc, job.apanel, job.bpanel, job.wi, job.wj, job.diag, job.c, job.ldc);
  }
};

template <typename T>
struct KernelSet {
  void (*pack_columns)(const PackJob<T>&);
  void (*pair)(const PairJob<T>&);
  int64_t nr;  // the width the panels are packed in
};

// One set per ISA and type: the kernels are inlined into functions with the ISA's target.
#define KFK_KERNEL_SET(NAME, ATTR, T, MR, NR, VL)                                         \
  ATTR void NAME##_pack(const PackJob<T>& j) { Kernel<T, MR, NR, VL>::pack_columns(j); }   \
  ATTR void NAME##_pair(const PairJob<T>& j) { Kernel<T, MR, NR, VL>::pair(j); }           \
  constexpr KernelSet<T> NAME = {NAME##_pack, NAME##_pair, NR};

// Baseline (SSE2 on x86-64, NEON on aarch64, scalar elsewhere).
KFK_KERNEL_SET(generic_f32, , float, 4, 8, 4)
KFK_KERNEL_SET(generic_f64, , double, 4, 4, 2)
#if KFK_X86_DISPATCH
KFK_KERNEL_SET(avx2_f32, KFK_TARGET("avx2,fma"), float, 4, 16, 8)
KFK_KERNEL_SET(avx2_f64, KFK_TARGET("avx2,fma"), double, 4, 8, 4)
KFK_KERNEL_SET(avx512_f32, KFK_TARGET("avx512f,avx2,fma"), float, 8, 32, 16)
KFK_KERNEL_SET(avx512_f64, KFK_TARGET("avx512f,avx2,fma"), double, 8, 16, 8)
#endif
#undef KFK_KERNEL_SET

template <typename T>
const KernelSet<T>& kernel_set(int isa);

template <>
const KernelSet<float>& kernel_set<float>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return avx512_f32;
  if (isa == kIsaAvx2) return avx2_f32;
#endif
  (void)isa;
  return generic_f32;
}

template <>
const KernelSet<double>& kernel_set<double>(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return avx512_f64;
  if (isa == kIsaAvx2) return avx2_f64;
#endif
  (void)isa;
  return generic_f64;
}

// Write the tile's entries (upper triangle only on a diagonal tile) to out[i][j] and out[j][i],
// both along rows of out: out[j][i] from a transposed copy of the tile. Each entry is
// decay * factor + (alpha * sum), written as the same expression for both triangles, so equal
// factor entries give bitwise equal outputs (the output of a symmetric factor is exactly
// symmetric).
template <typename T>
void finalize(const SymmetricFactorUpdateParams<T>& p, int64_t b, const T* g, int64_t ci,
              int64_t wi, int64_t cj, int64_t wj, bool diag) {
  const int64_t d = p.d;
  T* outb = p.out + b * d * d;
  const T alpha = p.alpha, decay = p.decay;
  const T* fb = p.factor == nullptr ? nullptr : p.factor + b * p.factor_stride_batch;
  const int64_t sr = p.factor_stride_row, sc = p.factor_stride_col;
  // one row segment: out[i][j0 + c] for c in [c0, c1), from sums s[c * step]
  auto row = [&](int64_t i, int64_t j0, int64_t c0, int64_t c1, const T* s, int64_t step) {
    T* o = outb + i * d + j0;
    if (fb == nullptr) {
      for (int64_t c = c0; c < c1; ++c) o[c] = alpha * s[c * step];
    } else if (sc == 1) {
      const T* f = fb + i * sr + j0;
      for (int64_t c = c0; c < c1; ++c) {
        const T gv = alpha * s[c * step];
        o[c] = decay * f[c] + gv;
      }
    } else {
      const T* f = fb + i * sr + j0 * sc;
      for (int64_t c = c0; c < c1; ++c) {
        const T gv = alpha * s[c * step];
        o[c] = decay * f[c * sc] + gv;
      }
    }
  };
  for (int64_t r = 0; r < wi; ++r) row(ci + r, cj, diag ? r : 0, wj, g + r * kTile, 1);
  // the mirror: the tile transposed in blocks of 8 x 8 (in cache), then written along rows
  alignas(64) T gt[kTile * kTile];
  for (int64_t r0 = 0; r0 < wi; r0 += 8)
    for (int64_t c0 = 0; c0 < wj; c0 += 8)
      for (int64_t r = r0; r < std::min(wi, r0 + 8); ++r)
        for (int64_t c = c0; c < std::min(wj, c0 + 8); ++c) gt[c * kTile + r] = g[r * kTile + c];
  for (int64_t c = 0; c < wj; ++c) row(cj + c, ci, 0, diag ? c : wi, gt + c * kTile, 1);
}

// Rows r0 <= k < r1 of the chunk of kc rows from k0, columns from col0 on, packed into packed
// (row by row: x is read in order).
template <typename T>
inline void pack_rows(const KernelSet<T>& ks, const T* xb, int64_t srow, int64_t scol, int64_t d,
                      int64_t k0, int64_t kc, int64_t r0, int64_t r1, int64_t col0, T* packed) {
  PackJob<T> job{xb, srow, scol, k0, kc, r0, r1, col0, d - col0, packed};
  ks.pack_columns(job);
}

constexpr int64_t kPackRows = 16;  // rows of a chunk packed per work item

// The chunk of kc rows from k0, columns from col0 on, packed into the shared panel by the
// threads of the enclosing parallel region (an orphaned omp for: kPackRows rows per item).
template <typename T>
inline void pack_chunk(const SymmetricFactorUpdateParams<T>& p, const KernelSet<T>& ks,
                       const T* xb, int64_t k0, int64_t kc, int64_t col0, T* packed) {
#ifdef _OPENMP
#pragma omp for
#endif
  for (int64_t r0 = 0; r0 < kc; r0 += kPackRows)
    pack_rows(ks, xb, p.x_stride_row, p.x_stride_col, p.d, k0, kc, r0,
              std::min(kc, r0 + kPackRows), col0, packed);
}

// c += the tile pair (ti, tj)'s product over the kc rows packed from column col0 on (c: row
// stride ldc, kTile x kTile room unless the tile is full).
template <typename T>
inline void pair_on_packed(const KernelSet<T>& ks, int64_t kc, const T* packed, int64_t col0,
                           int64_t d, int64_t ti, int64_t tj, T* c, int64_t ldc = kTile) {
  const int64_t nr = ks.nr, ci = ti * kTile, cj = tj * kTile;
  PairJob<T> job{kc,     packed + (ci - col0) / nr * kc * nr,
                 packed + (cj - col0) / nr * kc * nr,
                 std::min(kTile, d - ci), std::min(kTile, d - cj), ti == tj, c, ldc};
  ks.pair(job);
}

constexpr int64_t kTileElems = kTile * kTile;

// Lists the tile pairs (ti, tj), ti <= tj, row-major, of the tile rows from t0 on, as many whole
// rows as max_pairs allows (one at least); returns the first row not listed and sets npairs.
inline int64_t list_pairs(int64_t t0, int64_t nt, int64_t max_pairs, int64_t* ti, int64_t* tj,
                          int64_t& npairs) {
  int64_t t1 = t0;
  npairs = 0;
  while (t1 < nt && (t1 == t0 || npairs + (nt - t1) <= max_pairs)) {
    for (int64_t j = t1; j < nt; ++j, ++npairs) {
      ti[npairs] = t1;
      tj[npairs] = j;
    }
    ++t1;
  }
  return t1;
}

// A thread's scratch kept between calls (grown, never shrunk): buffers of this size allocated
// per call come from mmap and fault their pages in again every time, which cost more than the
// product itself for small m (0.09 -> 0.15 ms at m = 8, d = 300). What a thread keeps: the
// packed chunk (kKc x d) and, on the calling thread, at most kBandBytes of tiles (run_banded)
// or the row slices' tiles of fewer than kTargetItems pairs (run_sliced).
template <typename T>
class Workspace {
 public:
  T* get(size_t n) {
    if (n > capacity_) {
      buffer_.reset();  // free the old one first: never both at once
      buffer_.reset(new Buffer<T>(n));
      capacity_ = n;
    }
    return buffer_->get();
  }

 private:
  std::unique_ptr<Buffer<T>> buffer_;
  size_t capacity_ = 0;
};

enum WorkspaceSlot { kPacked, kTiles, kAcc, kSlots };

template <typename T>
T* workspace(WorkspaceSlot slot, size_t n) {
  static thread_local Workspace<T> slots[kSlots];
  return slots[slot].get(n);
}

// Few tile pairs but many rows: work items are (batch element, slice of rows); each accumulates
// all pairs over its rows, and the slices' partial sums are added in slice order afterwards.
template <typename T>
void run_sliced(const SymmetricFactorUpdateParams<T>& p, const KernelSet<T>& ks, int64_t slices,
                int64_t rows_per_slice) {
  const int64_t batch = p.batch, m = p.m, d = p.d;
  const int64_t nt = ceil_div(d, kTile);
  const int64_t npairs = nt * (nt + 1) / 2;
  const int64_t base = batch * npairs;
  const int64_t items = batch * slices;
  T* partial = workspace<T>(kTiles, static_cast<size_t>(base * slices * kTileElems));

  Buffer<int64_t> pair_ti(static_cast<size_t>(npairs)), pair_tj(static_cast<size_t>(npairs));
  int64_t listed;
  list_pairs(0, nt, npairs, pair_ti.get(), pair_tj.get(), listed);
  const bool parallel = items > 1;
  (void)parallel;

#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    T* packed = workspace<T>(kPacked, static_cast<size_t>(kKc * round_up(d, ks.nr)));
    T* acc = workspace<T>(kAcc, static_cast<size_t>(kTileElems));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / slices, s = it % slices;
      const T* xb = p.x + b * p.x_stride_batch;
      T* tiles = partial + (b * npairs * slices + s) * kTileElems;  // pair q: q * slices
      for (int64_t q = 0; q < npairs; ++q)
        std::memset(tiles + q * slices * kTileElems, 0, sizeof(T) * kTileElems);
      const int64_t k_end = std::min(m, (s + 1) * rows_per_slice);
      for (int64_t k0 = s * rows_per_slice; k0 < k_end; k0 += kKc) {
        const int64_t kc = std::min(kKc, k_end - k0);
        pack_rows(ks, xb, p.x_stride_row, p.x_stride_col, d, k0, kc, 0, kc, 0, packed);
        for (int64_t q = 0; q < npairs; ++q)
          pair_on_packed(ks, kc, packed, 0, d, pair_ti.get()[q], pair_tj.get()[q],
                         tiles + q * slices * kTileElems);
      }
    }

#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t bp = 0; bp < base; ++bp) {
      const int64_t b = bp / npairs;
      const int64_t q = bp % npairs;
      const int64_t ti = pair_ti.get()[q], tj = pair_tj.get()[q];
      const int64_t ci = ti * kTile, cj = tj * kTile;
      const int64_t wi = std::min(kTile, d - ci), wj = std::min(kTile, d - cj);
      const T* first = partial + bp * slices * kTileElems;
      std::memcpy(acc, first, sizeof(T) * wi * kTile);
      for (int64_t s = 1; s < slices; ++s) {
        const T* part = first + s * kTileElems;
        for (int64_t e = 0; e < wi * kTile; ++e) acc[e] += part[e];
      }
      finalize(p, b, acc, ci, wi, cj, wj, ti == tj);
    }
  }
}

// Otherwise: bands of tile rows, each with its pairs' tiles in a scratch of at most kBandBytes
// (one tile row at least); threads share a chunk's packing and then its pairs.
constexpr int64_t kBandBytes = int64_t(1) << 20;

template <typename T>
void run_banded(const SymmetricFactorUpdateParams<T>& p, const KernelSet<T>& ks, bool parallel) {
  const int64_t m = p.m, d = p.d;
  const int64_t nt = ceil_div(d, kTile);
  const int64_t max_pairs =
      std::max<int64_t>(nt, kBandBytes / static_cast<int64_t>(kTileElems * sizeof(T)));
  T* packed = workspace<T>(kPacked, static_cast<size_t>(kKc * round_up(d, ks.nr)));
  T* scratch = workspace<T>(kTiles,
                            static_cast<size_t>(std::min(max_pairs, nt * (nt + 1) / 2) * kTileElems));
  Buffer<int64_t> band_ti(static_cast<size_t>(max_pairs)), band_tj(static_cast<size_t>(max_pairs));
  (void)parallel;

  for (int64_t b = 0; b < p.batch; ++b) {
    const T* xb = p.x + b * p.x_stride_batch;
    for (int64_t t0 = 0; t0 < nt;) {
      int64_t npairs;
      const int64_t t1 = list_pairs(t0, nt, max_pairs, band_ti.get(), band_tj.get(), npairs);
      const int64_t col0 = t0 * kTile;
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
      {
#ifdef _OPENMP
#pragma omp for
#endif
        for (int64_t q = 0; q < npairs; ++q)
          std::memset(scratch + q * kTileElems, 0, sizeof(T) * kTileElems);
        for (int64_t k0 = 0; k0 < m; k0 += kKc) {
          const int64_t kc = std::min(kKc, m - k0);
          pack_chunk(p, ks, xb, k0, kc, col0, packed);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t q = 0; q < npairs; ++q)
            pair_on_packed(ks, kc, packed, col0, d, band_ti.get()[q], band_tj.get()[q],
                           scratch + q * kTileElems);
        }
#ifdef _OPENMP
#pragma omp for
#endif
        for (int64_t q = 0; q < npairs; ++q) {
          const int64_t ci = band_ti.get()[q] * kTile, cj = band_tj.get()[q] * kTile;
          finalize(p, b, scratch + q * kTileElems, ci, std::min(kTile, d - ci), cj,
                   std::min(kTile, d - cj), ci == cj);
        }
      }
      t0 = t1;
    }
  }
}

// More tile pairs than one band holds: run_banded would pack every chunk of rows once per band,
// and with bands of one or two tile rows the packing costs about as much as the products. Here
// each chunk is packed once, whole, and every tile pair's chunk sum is added straight into its
// place in out's upper triangle (out exists anyway: no O(d^2) scratch). The pairs of a partial
// last tile column accumulate in kTile x kTile scratch tiles instead: the micro-kernel writes
// whole blocks, which would reach past the row's end. At the end each upper tile is read back
// and finalized with its mirror. Every entry is summed in run_banded's order (the chunk sums in
// chunk order), so the two give bitwise the same results.
template <typename T>
void run_direct(const SymmetricFactorUpdateParams<T>& p, const KernelSet<T>& ks, bool parallel) {
  const int64_t m = p.m, d = p.d;
  const int64_t nt = ceil_div(d, kTile);
  const int64_t npairs = nt * (nt + 1) / 2;
  const int64_t whole = d / kTile;  // tile columns tj < whole are kTile wide
  T* packed = workspace<T>(kPacked, static_cast<size_t>(kKc * round_up(d, ks.nr)));
  T* partial = workspace<T>(kTiles, static_cast<size_t>(nt * kTileElems));
  Buffer<int64_t> pair_ti(static_cast<size_t>(npairs)), pair_tj(static_cast<size_t>(npairs));
  int64_t listed;
  list_pairs(0, nt, npairs, pair_ti.get(), pair_tj.get(), listed);
  (void)parallel;

  for (int64_t b = 0; b < p.batch; ++b) {
    const T* xb = p.x + b * p.x_stride_batch;
    T* outb = p.out + b * d * d;
    // where pair q accumulates (row stride *ld)
    auto sums_of = [&](int64_t q, int64_t* ld) -> T* {
      const int64_t ti = pair_ti.get()[q], tj = pair_tj.get()[q];
      if (tj < whole) {
        *ld = d;
        return outb + ti * kTile * d + tj * kTile;
      }
      *ld = kTile;
      return partial + ti * kTileElems;
    };
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
    {
#ifdef _OPENMP
#pragma omp for
#endif
      for (int64_t q = 0; q < npairs; ++q) {
        int64_t ld;
        T* c = sums_of(q, &ld);
        for (int64_t r = 0; r < kTile; ++r) std::memset(c + r * ld, 0, sizeof(T) * kTile);
      }
      for (int64_t k0 = 0; k0 < m; k0 += kKc) {
        const int64_t kc = std::min(kKc, m - k0);
        pack_chunk(p, ks, xb, k0, kc, 0, packed);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t q = 0; q < npairs; ++q) {
          int64_t ld;
          T* c = sums_of(q, &ld);
          pair_on_packed(ks, kc, packed, 0, d, pair_ti.get()[q], pair_tj.get()[q], c, ld);
        }
      }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t q = 0; q < npairs; ++q) {
        int64_t ld;
        const T* c = sums_of(q, &ld);
        const int64_t ci = pair_ti.get()[q] * kTile, cj = pair_tj.get()[q] * kTile;
        const int64_t wi = std::min(kTile, d - ci), wj = std::min(kTile, d - cj);
        alignas(64) T g[kTileElems];  // the sums, before finalize overwrites them in out
        for (int64_t r = 0; r < wi; ++r) std::memcpy(g + r * kTile, c + r * ld, sizeof(T) * wj);
        finalize(p, b, g, ci, wi, cj, wj, ci == cj);
      }
    }
  }
}

template <typename T>
void run(const SymmetricFactorUpdateParams<T>& p) {
  const int64_t batch = p.batch, m = p.m, d = p.d;
  if (batch <= 0 || d <= 0) return;
  const KernelSet<T>& ks = kernel_set<T>(current_isa());
  const int64_t nt = ceil_div(d, kTile);
  const int64_t base = batch * nt * (nt + 1) / 2;
  // Few tile pairs but many rows: the rows are split into slices too (work for every thread).
  if (base < kTargetItems && m >= 2 * kMinRowsPerSlice) {
    int64_t slices = std::min(ceil_div(kTargetItems, base), m / kMinRowsPerSlice);
    const int64_t rows_per_slice = round_up(ceil_div(m, slices), kKc);
    slices = ceil_div(m, rows_per_slice);
    run_sliced(p, ks, slices, rows_per_slice);
    return;
  }
  const double flops = static_cast<double>(base) * kTile * kTile * static_cast<double>(m) +
                       static_cast<double>(batch) * d * d;
  const bool parallel = base > 1 && flops > 2.0e5;
  // More pairs than one band holds: run_direct (one thread, fp32, m = 2080: 0.58-0.60 of a full
  // gemm's time at d = 704..1536 where bands took 0.59-0.65, 0.60-0.65 at d = 3072 where they
  // took 0.75-0.90; bitwise the same results).
  if (nt * (nt + 1) / 2 > kBandBytes / static_cast<int64_t>(kTileElems * sizeof(T))) {
    run_direct(p, ks, parallel);
    return;
  }
  run_banded(p, ks, parallel);
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
