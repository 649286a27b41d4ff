// CUDA kernels of the patch covariance (torch-free: raw pointers, sizes, strides and a stream;
// compiles with plain `nvcc -c -Icsrc/include`). See csrc/include/patch_covariance.h for the
// definition.
//
// expand: an implicit-im2col Gram matrix. The patch matrix (rows r = (n, oh, ow), columns
// d = (c, i, j)) is never stored: element (r, d) is read from x at
//     n * sN + (c0 + c) * sC + (oh * stride_h + i * dil_h - pad_top) * sH + (...) * sW
// which is a row offset (n, oh, ow) plus a column offset (c, i, j), with a bounds test for the
// padding. Two kernels, chosen by D:
//   * tiles (D > small): one thread block per (segment, upper-triangular 64 x 64 output tile
//     ti <= tj[, row slice]). For each chunk of 128 rows the row coordinates are computed once
//     into shared memory (column coordinates once per block), then each stage gathers the two
//     column panels of the tile straight from x into shared memory and accumulates them:
//       - fp32 / fp64 (and fp16 / bf16 before sm_80): 256 threads with a 4 x 4 register tile each,
//         panels converted to the accumulation type on load;
//       - fp16 / bf16 on sm_80 and later: tensor cores (wmma 16x16x16, inputs in their own type,
//         fp32 accumulation); 8 warps, each 16 x 32 of the tile.
//     Each chunk is summed from zero and then added to the running total (two-level summation).
//   * small (D <= 16, fp64: D <= 10; e.g. depthwise 3x3 + bias = 10): one warp per
//     (segment[, row slice]), eight segments per block; each lane walks every 32nd row, gathers
//     its patch (D values) into registers and updates the D (D + 1) / 2 upper entries in
//     registers; a butterfly shuffle reduction in a fixed order ends the warp's sum.
// When there are few output blocks and many rows, the rows are split into slices: the first kernel
// writes each slice's partial sums to the workspace and a second kernel adds them in slice order.
// Only the upper triangle is computed; each value alpha * g is written to (i, j) and (j, i) as
// decay * factor + alpha * g with explicitly rounded operations, so the output is exactly symmetric
// whenever the factor is. Every summation order is fixed by the problem's shape: deterministic.
//
// reduce: kernel 1 computes the mean patches abar (N, S, Dn) (Dn = D without the bias coordinate)
// into the workspace. While a plane has at most 512 rows and columns and the kernel at most 31 of
// each, the plane kernels read each pixel once per 16 kernel offsets, adding it to the offsets that
// see its row and its column (tabulated per block): one warp per (n, segment, channel), lanes over
// pixels, or one thread per (n, segment, channel) when channels are the fastest-varying dimension
// of x (channels_last). Otherwise a warp per (n, segment, channel) sums, for each offset (i, j),
// the input over the output grid (each pixel read once per offset). The factor is then the expand
// kernel applied to abar seen as an (N, S * Dn, 1, 1) input with 1 x 1 patches and S segments of
// Dn channels: sum_n [abar_n, 1] [abar_n, 1]^T.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "gram_tiles.cuh"
#include "patch_covariance.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;        // output tile edge (tile kernels)
constexpr int kSub = 4;          // SIMT: each thread accumulates kSub x kSub entries
constexpr int kK = 16;           // SIMT: rows staged per step
constexpr int kLd = kTile + 1;   // SIMT: padded shared-memory row
constexpr int kChunkRows = 128;  // rows summed from zero before being added to the total
constexpr int kSmallMax = 16;    // largest D of the small kernel
constexpr int64_t kTargetTileBlocks = 264;
constexpr int64_t kMinRowsPerSlice = 1024;
constexpr int64_t kTargetWarps = 8192;
constexpr int64_t kMinRowsPerWarp = 128;
constexpr int64_t kMinThreadItems = 16384;  // mean patches: one thread per item from here
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 0x7fffffffLL;
constexpr int64_t kGeomLimit = int64_t{1} << 28;  // spatial extents, pads, kernel spans
// Sentinels of the coordinate tables. Real row starts lie in [0, 2^28), real column offsets in
// (-2^28, 2^28), so y = y0 + dy never overflows and is negative for a sentinel.
constexpr int32_t kZeroDy = -(1 << 29);      // a column beyond D: always 0
constexpr int32_t kBiasDy = -(1 << 29) - 1;  // the bias column: 1 on every valid row
constexpr int32_t kInvalidY = -(1 << 29);    // a row past the end of the range: all 0

// The problem in the form the kernels use. The reduce pass runs the expand kernels on a Problem
// whose input is the mean-patch buffer.
struct Problem {
  const void* x;
  int64_t sn, sc, sh, sw;  // element strides of x
  int32_t H, W;
  int32_t kh, kw, str_h, str_w, dil_h, dil_w, pt, pl, out_h, out_w;
  int64_t R;  // out_h * out_w
  int64_t M;  // rows of the Gram sum: N * R
  int64_t S, c_start, c_step;
  int32_t cs;       // channels per segment
  int32_t Dn, D;    // D = Dn + bias
  bool bias;
  bool rows_fast;   // gather panels with consecutive threads on consecutive rows
  const void* factor;
  int64_t fsb, fsr, fsc;
  void* out;
  double decay, alpha;
};

// Element offset and padding test of one patch row (n, oh, ow) and one patch column (c, i, j).
struct Row {
  int64_t off;  // n * sn + y0 * sh + x0 * sw
  int32_t y0, x0;  // oh * stride_h, ow * stride_w; y0 == kInvalidY past the end
};
struct Col {
  int64_t off;  // c * sc + dy * sh + dx * sw (relative to the segment's first channel)
  int32_t dy, dx;  // i * dil_h - pad_top, j * dil_w - pad_left; or kZeroDy / kBiasDy
};

template <typename In>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename In>
using Acc = typename AccOf<In>::type;

template <typename T>
struct Is16Bit : std::integral_constant<bool, std::is_same<T, __half>::value ||
                                                  std::is_same<T, __nv_bfloat16>::value> {};

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Conversions between the input types and float / double.
template <typename To>
__device__ __forceinline__ To convert(float v);
template <>
__device__ __forceinline__ float convert<float>(float v) { return v; }
template <>
__device__ __forceinline__ double convert<double>(float v) { return static_cast<double>(v); }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// (only the tensor-core path keeps 16-bit values)
template <>
__device__ __forceinline__ __half convert<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

template <typename To, typename In>
__device__ __forceinline__ To load_as(const In* p) {
  if constexpr (std::is_same<To, In>::value) {
    return *p;
  } else if constexpr (std::is_same<In, __half>::value) {
    return static_cast<To>(__half2float(*p));
  } else if constexpr (std::is_same<In, __nv_bfloat16>::value) {
    return static_cast<To>(__bfloat162float(*p));
  } else {
    return static_cast<To>(*p);
  }
}

__device__ __forceinline__ Col make_col(const Problem& P, int64_t d) {
  Col c;
  if (d < P.Dn) {
    const int32_t kk = P.kh * P.kw;
    const int32_t di = static_cast<int32_t>(d);
    const int32_t ch = di / kk;
    const int32_t rem = di - ch * kk;
    const int32_t i = rem / P.kw;
    const int32_t j = rem - i * P.kw;
    c.dy = i * P.dil_h - P.pt;
    c.dx = j * P.dil_w - P.pl;
    c.off = ch * P.sc + static_cast<int64_t>(c.dy) * P.sh + static_cast<int64_t>(c.dx) * P.sw;
  } else {
    c.dy = (d == P.Dn && P.bias) ? kBiasDy : kZeroDy;
    c.dx = 0;
    c.off = 0;
  }
  return c;
}

__device__ __forceinline__ Row make_row(const Problem& P, int64_t k, int64_t end) {
  Row r;
  if (k < end) {
    const int64_t n = k / P.R;
    const int64_t p = k - n * P.R;
    const int32_t oh = static_cast<int32_t>(p / P.out_w);
    const int32_t ow = static_cast<int32_t>(p - static_cast<int64_t>(oh) * P.out_w);
    r.y0 = oh * P.str_h;
    r.x0 = ow * P.str_w;
    r.off = n * P.sn + static_cast<int64_t>(r.y0) * P.sh + static_cast<int64_t>(r.x0) * P.sw;
  } else {
    r.y0 = kInvalidY;
    r.x0 = 0;
    r.off = 0;
  }
  return r;
}

// Patch element (row r, column c) of the segment whose first channel is at xs, as type V.
template <typename V, typename In>
__device__ __forceinline__ V gather(const In* xs, const Row& r, const Col& c, int32_t H,
                                    int32_t W) {
  if (c.dy == kBiasDy) return convert<V>(r.y0 != kInvalidY ? 1.0f : 0.0f);
  const int32_t y = r.y0 + c.dy;
  const int32_t xx = r.x0 + c.dx;
  if (static_cast<uint32_t>(y) < static_cast<uint32_t>(H) &&
      static_cast<uint32_t>(xx) < static_cast<uint32_t>(W)) {
    return load_as<V>(xs + (r.off + c.off));
  }
  return convert<V>(0.0f);
}

template <typename In>
__device__ __forceinline__ const In* segment_base(const Problem& P, int64_t s) {
  return static_cast<const In*>(P.x) + (P.c_start + s * P.c_step) * P.sc;
}

// out[s][i][j] and out[s][j][i] from the raw sum g of entry (i, j), i <= j.
template <typename A>
__device__ __forceinline__ void store_pair(const Problem& P, int64_t s, int64_t i, int64_t j,
                                           A sum) {
  const int64_t D = P.D;
  A* out = static_cast<A*>(P.out) + s * D * D;
  const A g = mul_rn(static_cast<A>(P.alpha), sum);
  const A decay = static_cast<A>(P.decay);
  if (P.factor) {
    const A* f = static_cast<const A*>(P.factor) + s * P.fsb;
    out[i * D + j] = add_rn(mul_rn(decay, f[i * P.fsr + j * P.fsc]), g);
    if (i != j) out[j * D + i] = add_rn(mul_rn(decay, f[j * P.fsr + i * P.fsc]), g);
  } else {
    out[i * D + j] = g;
    if (i != j) out[j * D + i] = g;
  }
}

// Writes the raw sums of tile (ci, cj) of segment s, staged in shared memory (row stride ld), to
// out[s] (write_symmetric_tile, gram_tiles.cuh). Ends with a barrier.
template <typename A>
__device__ void write_staged_tile(const Problem& P, int64_t s, int64_t ci, int64_t cj, bool diag,
                                  const A* stage, int ld) {
  const int64_t D = P.D;
  const A* f = P.factor ? static_cast<const A*>(P.factor) + s * P.fsb : nullptr;
  write_symmetric_tile<kTile, kThreads>(static_cast<A*>(P.out) + s * D * D, D, f, P.fsr, P.fsc,
                                        static_cast<A>(P.alpha), static_cast<A>(P.decay), ci, cj,
                                        diag, stage, ld);
}

// ------------------------------------------------------------------------------------------------
// Tile kernels. grid.x = npairs * slices (tile pair q = blockIdx.x / slices, slice =
// blockIdx.x % slices), grid.y strides over the segments. With kSplit the raw sums of each slice
// go to partial[((s * npairs + q) * slices + slice) * kTile * kTile + row * kTile + col].

template <typename A>
struct SimtSmem {
  union {
    A panels[2][kK][kLd];
    A stage[kTile][kLd];
  } u;
  Col cols[2][kTile];
  Row rows[kChunkRows];
};

template <typename In, bool kSplit>
__device__ void tile_body_simt(const Problem& P, int64_t nt, int64_t slices,
                               int64_t rows_per_slice, Acc<In>* partial) {
  using A = Acc<In>;
  __shared__ SimtSmem<A> sm;
  const int t = threadIdx.x;
  const int64_t q = blockIdx.x / slices;
  const int64_t sl = blockIdx.x % slices;
  int64_t ti, tj;
  tile_pair(q, nt, ti, tj);
  const int64_t ci = ti * kTile, cj = tj * kTile;
  const bool diag = ti == tj;
  const int64_t npairs = nt * (nt + 1) / 2;
  const int64_t k_begin = sl * rows_per_slice;
  const int64_t k_end = imin(P.M, k_begin + rows_per_slice);
  if (t < kTile) {
    sm.cols[0][t] = make_col(P, ci + t);
  } else if (t < 2 * kTile) {
    sm.cols[1][t - kTile] = make_col(P, cj + t - kTile);
  }
  const int bsel = diag ? 0 : 1;

  for (int64_t s = blockIdx.y; s < P.S; s += gridDim.y) {
    const In* xs = segment_base<In>(P, s);
    A acc[kSub][kSub];
    zero_tile(acc);

    for (int64_t kc0 = k_begin; kc0 < k_end; kc0 += kChunkRows) {
      const int64_t kc_end = imin(k_end, kc0 + kChunkRows);
      // No barrier before the row table is rewritten: only the gathers read it, and every
      // chunk's last gather is followed by two barriers (a chunk has at least one step).
      if (t < kChunkRows) sm.rows[t] = make_row(P, kc0 + t, kc_end);
      __syncthreads();  // also: the previous segment's tile is read (the panels alias it)
      A part[kSub][kSub];
      zero_tile(part);
      const int steps = static_cast<int>(kc_end - kc0);
      for (int k0 = 0; k0 < steps; k0 += kK) {
        for (int e = t; e < kK * kTile; e += kThreads) {
          int kk, c;
          if (P.rows_fast) {
            c = e / kK, kk = e % kK;
          } else {
            kk = e / kTile, c = e % kTile;
          }
          const Row& r = sm.rows[k0 + kk];
          sm.u.panels[0][kk][c] = gather<A>(xs, r, sm.cols[0][c], P.H, P.W);
          if (!diag) sm.u.panels[1][kk][c] = gather<A>(xs, r, sm.cols[1][c], P.H, P.W);
        }
        __syncthreads();
        fma_staged_rows<kK>(part, &sm.u.panels[0][0][0], &sm.u.panels[bsel][0][0], kLd);
        __syncthreads();
      }
      add_tile(acc, part);
    }

    if (kSplit) {
      store_tile(partial + ((s * npairs + q) * slices + sl) * (kTile * kTile), kTile, acc);
    } else {
      // No barrier before the stage (aliasing the panels) is written: the last reads of the
      // panels end with the last step's barrier, and a segment without rows (M == 0) follows
      // the previous segment's write_staged_tile, which ends with a barrier.
      store_tile(&sm.u.stage[0][0], kLd, acc);
      __syncthreads();
      write_staged_tile<A>(P, s, ci, cj, diag, &sm.u.stage[0][0], kLd);
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr int kKw = 32;          // rows staged per step
constexpr int kLdw = kTile + 8;  // panel row: a multiple of 8 elements (16 bytes)
constexpr int kLdc = kTile + 4;  // accumulator staging row: a multiple of 4 floats

template <typename In>
struct alignas(128) WmmaSmem {
  union {
    In panels[2][kKw][kLdw];  // 16-bit inputs; every 16 x 16 fragment starts 32-byte aligned
    float stage[kTile][kLdc];
  } u;
  Col cols[2][kTile];
  Row rows[kChunkRows];
};

// Tensor-core body for fp16 / bf16 inputs (sm_80+): warp w computes the 16 x 32 block of rows
// 16 * (w / 2) and columns 32 * (w % 2) of the tile, as two 16 x 16 fp32 accumulators.
template <typename In, bool kSplit>
__device__ void tile_body_wmma(const Problem& P, int64_t nt, int64_t slices,
                               int64_t rows_per_slice, float* partial) {
  namespace wmma = nvcuda::wmma;
  __shared__ WmmaSmem<In> sm;
  const int t = threadIdx.x;
  const int warp = t / 32;
  const int fr = warp / 2;        // fragment row (0..3)
  const int fc0 = (warp % 2) * 2;  // first of two fragment columns (0 or 2)
  const int64_t q = blockIdx.x / slices;
  const int64_t sl = blockIdx.x % slices;
  int64_t ti, tj;
  tile_pair(q, nt, ti, tj);
  const int64_t ci = ti * kTile, cj = tj * kTile;
  const bool diag = ti == tj;
  // On a diagonal tile the fragments strictly below the diagonal are never written out.
  const bool active = !diag || fc0 + 1 >= fr;
  const int64_t npairs = nt * (nt + 1) / 2;
  const int64_t k_begin = sl * rows_per_slice;
  const int64_t k_end = imin(P.M, k_begin + rows_per_slice);
  if (t < kTile) {
    sm.cols[0][t] = make_col(P, ci + t);
  } else if (t < 2 * kTile) {
    sm.cols[1][t - kTile] = make_col(P, cj + t - kTile);
  }
  const int bsel = diag ? 0 : 1;

  for (int64_t s = blockIdx.y; s < P.S; s += gridDim.y) {
    const In* xs = segment_base<In>(P, s);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2], part[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t kc0 = k_begin; kc0 < k_end; kc0 += kChunkRows) {
      const int64_t kc_end = imin(k_end, kc0 + kChunkRows);
      // No barrier before the row table is rewritten (as in tile_body_simt).
      if (t < kChunkRows) sm.rows[t] = make_row(P, kc0 + t, kc_end);
      __syncthreads();  // also: the previous segment's stage is read (the panels alias it)
      wmma::fill_fragment(part[0], 0.0f);
      wmma::fill_fragment(part[1], 0.0f);
      const int steps = static_cast<int>(kc_end - kc0);
      for (int k0 = 0; k0 < steps; k0 += kKw) {
        for (int e = t; e < kKw * kTile; e += kThreads) {
          int kk, c;
          if (P.rows_fast) {
            c = e / kKw, kk = e % kKw;
          } else {
            kk = e / kTile, c = e % kTile;
          }
          const Row& r = sm.rows[k0 + kk];
          sm.u.panels[0][kk][c] = gather<In>(xs, r, sm.cols[0][c], P.H, P.W);
          if (!diag) sm.u.panels[1][kk][c] = gather<In>(xs, r, sm.cols[1][c], P.H, P.W);
        }
        __syncthreads();
        if (active) {
#pragma unroll
          for (int kk = 0; kk < kKw; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, In, wmma::col_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, In, wmma::row_major> b;
            wmma::load_matrix_sync(a, &sm.u.panels[0][kk][16 * fr], kLdw);
#pragma unroll
            for (int f = 0; f < 2; ++f) {
              wmma::load_matrix_sync(b, &sm.u.panels[bsel][kk][16 * (fc0 + f)], kLdw);
              wmma::mma_sync(part[f], a, b, part[f]);
            }
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int f = 0; f < 2; ++f)
        for (int e = 0; e < part[f].num_elements; ++e)
          acc[f].x[e] = add_rn(acc[f].x[e], part[f].x[e]);
    }
    // No barrier before the stage (aliasing the panels) is written: the last reads of the panels
    // end with the last step's barrier; a segment without rows (M == 0, never split) follows
    // the previous segment's write_staged_tile, which ends with a barrier.
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(&sm.u.stage[16 * fr][16 * (fc0 + f)], acc[f], kLdc,
                              wmma::mem_row_major);
    __syncthreads();
    if (kSplit) {
      float* dst = partial + ((s * npairs + q) * slices + sl) * (kTile * kTile);
      // No barrier after these reads of the stage: the next segment rewrites shared memory only
      // after its first chunk's barrier (every slice of the split kernel has rows).
      for (int e = t; e < kTile * kTile; e += kThreads) dst[e] = sm.u.stage[e / kTile][e % kTile];
    } else {
      write_staged_tile<float>(P, s, ci, cj, diag, &sm.u.stage[0][0], kLdc);
    }
  }
}
#endif

template <typename In>
constexpr int kTileMinBlocks = sizeof(Acc<In>) == 4 ? 2 : 1;

template <typename In, bool kSplit>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks<In>)
    pc_tile_kernel(Problem P, int64_t nt, int64_t slices, int64_t rows_per_slice,
                   Acc<In>* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Is16Bit<In>::value) {
    tile_body_wmma<In, kSplit>(P, nt, slices, rows_per_slice, partial);
  } else {
    tile_body_simt<In, kSplit>(P, nt, slices, rows_per_slice, partial);
  }
#else
  tile_body_simt<In, kSplit>(P, nt, slices, rows_per_slice, partial);
#endif
}

// grid.x = npairs, grid.y strides over the segments: adds the slices' partial tiles in order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    pc_tile_reduce_kernel(Problem P, int64_t nt, int64_t slices, const A* __restrict__ partial) {
  __shared__ A stage[kTile * kLd];
  const int64_t q = blockIdx.x;
  int64_t ti, tj;
  tile_pair(q, nt, ti, tj);
  const int64_t npairs = nt * (nt + 1) / 2;
  for (int64_t s = blockIdx.y; s < P.S; s += gridDim.y) {
    const A* src = partial + (s * npairs + q) * slices * (kTile * kTile);
    sum_partial_tiles<kTile, kThreads>(src, slices, stage, kLd);
    write_staged_tile<A>(P, s, ti * kTile, tj * kTile, ti == tj, stage, kLd);
  }
}

// ------------------------------------------------------------------------------------------------
// Small kernel (D <= DMAX <= 16). Warp item = blockIdx.x * kWarps + warp over S * slices
// (segment s = item % S, slice = item / S: neighbouring warps take neighbouring segments). With
// kSplit the raw sums go to partial[(s * slices + slice) * E + e], e the upper-triangle index.

template <int DMAX>
__host__ __device__ constexpr int upper_index(int i, int j) {
  return i * DMAX - i * (i - 1) / 2 + (j - i);
}

// Blocks per SM the register allocation must allow (the accumulators live in registers).
template <typename In, int DMAX>
constexpr int kSmallMinBlocks = sizeof(Acc<In>) == 8 ? (DMAX <= 4 ? 3 : 1)
                                                     : (DMAX <= 4 ? 4 : DMAX <= 10 ? 2 : 1);

template <typename In, int DMAX, bool kSplit>
__global__ void __launch_bounds__(kThreads, (kSmallMinBlocks<In, DMAX>))
    pc_small_kernel(Problem P, int64_t slices, int64_t rows_per_slice,
                    Acc<In>* __restrict__ partial) {
  using A = Acc<In>;
  constexpr int E = DMAX * (DMAX + 1) / 2;
  __shared__ Col cols[DMAX];
  if (threadIdx.x < DMAX) cols[threadIdx.x] = make_col(P, threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= P.S * slices) return;  // whole warps; no barrier follows
  const int64_t s = item % P.S;
  const int64_t sl = item / P.S;
  const int64_t k_begin = sl * rows_per_slice;
  const int64_t k_end = imin(P.M, k_begin + rows_per_slice);
  const In* xs = segment_base<In>(P, s);
  const int D = P.D;

  A acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = A(0);

  int64_t k = k_begin + lane;
  if (k < k_end) {
    // (n, oh, ow) of row k, then advanced by 32 rows per step without divisions
    int64_t n = k / P.R;
    const int64_t p = k - n * P.R;
    int32_t oh = static_cast<int32_t>(p / P.out_w);
    int32_t ow = static_cast<int32_t>(p - static_cast<int64_t>(oh) * P.out_w);
    const int32_t dow = 32 % P.out_w;
    const int32_t qh = 32 / P.out_w;
    const int32_t doh = qh % P.out_h;
    const int32_t dn = qh / P.out_h;
    for (; k < k_end; k += 32) {
      Row r;
      r.y0 = oh * P.str_h;
      r.x0 = ow * P.str_w;
      r.off = n * P.sn + static_cast<int64_t>(r.y0) * P.sh + static_cast<int64_t>(r.x0) * P.sw;
      A v[DMAX];
#pragma unroll
      for (int d = 0; d < DMAX; ++d) v[d] = d < D ? gather<A>(xs, r, cols[d], P.H, P.W) : A(0);
#pragma unroll
      for (int i = 0; i < DMAX; ++i)
#pragma unroll
        for (int j = i; j < DMAX; ++j)
          acc[upper_index<DMAX>(i, j)] = fma_(v[i], v[j], acc[upper_index<DMAX>(i, j)]);
      ow += dow;
      if (ow >= P.out_w) ow -= P.out_w, ++oh;
      oh += doh;
      if (oh >= P.out_h) oh -= P.out_h, ++n;
      n += dn;
    }
  }

  // Butterfly reduction: every lane ends with the same sums, in an order fixed by the lanes.
#pragma unroll
  for (int e = 0; e < E; ++e)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      acc[e] = add_rn(acc[e], __shfl_xor_sync(0xffffffffu, acc[e], o));

#pragma unroll
  for (int i = 0; i < DMAX; ++i)
#pragma unroll
    for (int j = i; j < DMAX; ++j) {
      const int e = upper_index<DMAX>(i, j);
      if (e % 32 == lane && j < D) {
        if (kSplit) {
          partial[(s * slices + sl) * E + e] = acc[e];
        } else {
          store_pair<A>(P, s, i, j, acc[e]);
        }
      }
    }
}

// One thread per (segment, upper entry): adds the slices' partial sums in order.
template <typename A, int DMAX>
__global__ void __launch_bounds__(kThreads)
    pc_small_reduce_kernel(Problem P, int64_t slices, const A* __restrict__ partial) {
  constexpr int E = DMAX * (DMAX + 1) / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= P.S * E) return;
  const int64_t s = idx / E;
  const int e = static_cast<int>(idx - s * E);
  int i = 0;
  while (upper_index<DMAX>(i + 1, i + 1) <= e && i + 1 < DMAX) ++i;
  const int j = i + (e - upper_index<DMAX>(i, i));
  if (j >= P.D) return;
  const A* src = partial + s * slices * E + e;
  A sum = src[0];
  for (int64_t k = 1; k < slices; ++k) sum = add_rn(sum, src[k * E]);
  store_pair<A>(P, s, i, j, sum);
}

// ------------------------------------------------------------------------------------------------
// Mean patches (reduce): abar[(n * S + s) * Dn + c * kh * kw + i * kw + j]
//     = (1 / R) * sum_{oh, ow} x[n, c0(s) + c, oh * str_h + i * dil_h - pt, ow * str_w + ...].

// One warp per item (n, s, c) = (item / cs / S, item / cs % S, item % cs); lanes over positions.
template <typename In>
__global__ void __launch_bounds__(kThreads)
    pc_mean_warp_kernel(Problem P, int64_t n_items, Acc<In>* __restrict__ abar) {
  using A = Acc<In>;
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= n_items) return;
  const int64_t c = item % P.cs;
  const int64_t ns = item / P.cs;
  const int64_t s = ns % P.S;
  const int64_t n = ns / P.S;
  const In* xc = segment_base<In>(P, s) + n * P.sn + c * P.sc;
  A* dst = abar + ns * P.Dn + c * P.kh * P.kw;
  const A inv_count = P.R > 0 ? A(1) / static_cast<A>(P.R) : A(0);
  const int32_t dow = 32 % P.out_w;
  const int32_t doh = 32 / P.out_w;
  const int32_t oh0 = lane / P.out_w;
  const int32_t ow0 = lane % P.out_w;
  for (int32_t ij = 0; ij < P.kh * P.kw; ++ij) {
    const int32_t i = ij / P.kw, j = ij - (ij / P.kw) * P.kw;
    const int32_t dy = i * P.dil_h - P.pt, dx = j * P.dil_w - P.pl;
    A sum = A(0);
    int32_t oh = oh0, ow = ow0;
    for (int64_t p = lane; p < P.R; p += 32) {
      const int32_t y = oh * P.str_h + dy;
      const int32_t xx = ow * P.str_w + dx;
      if (static_cast<uint32_t>(y) < static_cast<uint32_t>(P.H) &&
          static_cast<uint32_t>(xx) < static_cast<uint32_t>(P.W)) {
        sum = add_rn(sum, load_as<A>(xc + (static_cast<int64_t>(y) * P.sh +
                                           static_cast<int64_t>(xx) * P.sw)));
      }
      ow += dow;
      if (ow >= P.out_w) ow -= P.out_w, ++oh;
      oh += doh;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum = add_rn(sum, __shfl_xor_sync(0xffffffffu, sum, o));
    if (lane == ij % 32) dst[ij] = mul_rn(sum, inv_count);
  }
}

// Mean patches read from x once (the plane kernels, used while a plane's rows and columns fit the
// shared tables and the kernel is at most 31 wide). Kernel offset t = (i, j) sees pixel (y, x)
// exactly when y + pt - i * dil_h = oh * str_h with 0 <= oh < out_h and x + pl - j * dil_w =
// ow * str_w with 0 <= ow < out_w, so its window sum is the sum of the plane's pixels whose row i
// sees and whose column j sees. A block first tabulates these tests per row y and per column x
// (the same tables serve every plane of the launch):
//   * up to kTaps offsets (1x1 .. 4x4 kernels): as masks over the offsets, bit t of row[y] set
//     when y passes t's row test and bit t of col[x] when x passes its column test; a pixel's
//     offsets are then row[y] & col[x], and the plane is walked once;
//   * more offsets: as the bits of the kernel rows i (row[y]) and columns j (col[x]) that see
//     the coordinate; the plane is walked once per kTaps offsets, each offset testing its own
//     two bits (bit 31 is never set, kh, kw <= 31: offsets past kh * kw point at it).
constexpr int kSeenTable = 512;  // rows / columns a plane may have for the shared tables
constexpr int kTaps = 16;        // kernel offsets summed per pass over a plane
constexpr int kNoTap = 31;

__host__ __device__ __forceinline__ bool plane_kernels_fit(const Problem& P) {
  return P.H <= kSeenTable && P.W <= kSeenTable && P.kh < 32 && P.kw < 32;
}

// Bits a < k of the kernel rows (or columns) that see input coordinate v along one axis.
__device__ __forceinline__ uint32_t seen_bits(int32_t v, int32_t pad, int32_t dil, int32_t str,
                                              int32_t out, int32_t k) {
  uint32_t bits = 0;
  for (int32_t a = 0; a < k; ++a) {
    const int32_t u = v + pad - a * dil;
    if (u >= 0 && u % str == 0 && u / str < out) bits |= 1u << a;
  }
  return bits;
}

// The mask over offsets t < kh * kw whose kernel row (by_row) or column is in bits.
__device__ __forceinline__ uint32_t offset_mask(uint32_t bits, const Problem& P, bool by_row) {
  uint32_t mask = 0;
  for (int32_t t = 0; t < P.kh * P.kw; ++t) {
    const int32_t a = by_row ? t / P.kw : t % P.kw;
    mask |= ((bits >> a) & 1u) << t;
  }
  return mask;
}

// Every thread of the block takes part (call before any early return).
__device__ __forceinline__ void fill_seen_tables(const Problem& P, uint32_t* row,
                                                 uint32_t* col) {
  const bool masks = P.kh * P.kw <= kTaps;
  for (int32_t y = threadIdx.x; y < P.H; y += blockDim.x) {
    const uint32_t bits = seen_bits(y, P.pt, P.dil_h, P.str_h, P.out_h, P.kh);
    row[y] = masks ? offset_mask(bits, P, true) : bits;
  }
  for (int32_t x = threadIdx.x; x < P.W; x += blockDim.x) {
    const uint32_t bits = seen_bits(x, P.pl, P.dil_w, P.str_w, P.out_w, P.kw);
    col[x] = masks ? offset_mask(bits, P, false) : bits;
  }
  __syncthreads();
}

// The kernel row and column of offsets t0 .. t0 + kTaps - 1 (kNoTap past the last one).
__device__ __forceinline__ void tap_coordinates(const Problem& P, int32_t t0, int32_t* ti,
                                                int32_t* tj) {
  const int32_t kk = P.kh * P.kw;
#pragma unroll
  for (int u = 0; u < kTaps; ++u) {
    const int32_t t = t0 + u;
    ti[u] = t < kk ? t / P.kw : kNoTap;
    tj[u] = t < kk ? t - (t / P.kw) * P.kw : kNoTap;
  }
}

// The pass's offsets t0 + u (u < kTaps) that see a pixel, from its row and column table entries
// (kMasks: the tables hold offset masks, one pass).
template <bool kMasks>
__device__ __forceinline__ uint32_t pass_mask(uint32_t row, uint32_t col, const int32_t* ti,
                                              const int32_t* tj) {
  if constexpr (kMasks) {
    return row & col;
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int u = 0; u < kTaps; ++u) m |= ((row >> ti[u]) & (col >> tj[u]) & 1u) << u;
    return m;
  }
}

template <typename A>
__device__ __forceinline__ void add_masked(A* sum, A v, uint32_t mask) {
#pragma unroll
  for (int u = 0; u < kTaps; ++u)
    if ((mask >> u) & 1u) sum[u] = add_rn(sum[u], v);
}

// One pass of a warp over the plane at xc: dst[t0 + u] = mean of offset t0 + u. Lanes over the
// pixels p = y * W + x (advanced by carries); pixels no offset of the pass sees (strides,
// dilations) are not read.
template <bool kMasks, typename In>
__device__ __forceinline__ void warp_plane_pass(const Problem& P, const In* xc,
                                                const uint32_t* row_tab, const uint32_t* col_tab,
                                                int32_t t0, Acc<In>* dst, Acc<In> inv_count) {
  using A = Acc<In>;
  const int lane = threadIdx.x % 32;
  int32_t ti[kTaps], tj[kTaps];
  tap_coordinates(P, t0, ti, tj);
  A sum[kTaps];
#pragma unroll
  for (int u = 0; u < kTaps; ++u) sum[u] = A(0);
  const int32_t plane = P.H * P.W, dx = 32 % P.W, dy = 32 / P.W;
  int32_t y = lane / P.W, x = lane % P.W;
  for (int32_t p = lane; p < plane; p += 32) {
    const uint32_t mask = pass_mask<kMasks>(row_tab[y], col_tab[x], ti, tj);
    if (mask != 0) {
      const int64_t off = static_cast<int64_t>(y) * P.sh + static_cast<int64_t>(x) * P.sw;
      add_masked(sum, load_as<A>(xc + off), mask);
    }
    x += dx;
    if (x >= P.W) x -= P.W, ++y;
    y += dy;
  }
  const int32_t kk = P.kh * P.kw;
#pragma unroll
  for (int u = 0; u < kTaps; ++u) {
    A total = sum[u];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total = add_rn(total, __shfl_xor_sync(0xffffffffu, total, o));
    if (lane == u && t0 + u < kk) dst[t0 + u] = mul_rn(total, inv_count);
  }
}

// One pass of a thread over the plane at xc (as above, row by row).
template <bool kMasks, typename In>
__device__ __forceinline__ void thread_plane_pass(const Problem& P, const In* xc,
                                                  const uint32_t* row_tab,
                                                  const uint32_t* col_tab, int32_t t0,
                                                  Acc<In>* dst, Acc<In> inv_count) {
  using A = Acc<In>;
  int32_t ti[kTaps], tj[kTaps];
  tap_coordinates(P, t0, ti, tj);
  A sum[kTaps];
#pragma unroll
  for (int u = 0; u < kTaps; ++u) sum[u] = A(0);
  for (int32_t y = 0; y < P.H; ++y) {
    const uint32_t row = row_tab[y];
    if (row == 0) continue;  // a row no offset sees
    const In* xr = xc + static_cast<int64_t>(y) * P.sh;
    for (int32_t x = 0; x < P.W; ++x) {
      const uint32_t mask = pass_mask<kMasks>(row, col_tab[x], ti, tj);
      if (mask != 0) add_masked(sum, load_as<A>(xr + static_cast<int64_t>(x) * P.sw), mask);
    }
  }
  const int32_t kk = P.kh * P.kw;
#pragma unroll
  for (int u = 0; u < kTaps; ++u)
    if (t0 + u < kk) dst[t0 + u] = mul_rn(sum[u], inv_count);
}

// One warp per item (n, s, c) (kWarp) or one thread per item (channels_last: consecutive threads
// take consecutive channels).
template <typename In, bool kWarp>
__global__ void __launch_bounds__(kThreads)
    pc_mean_plane_kernel(Problem P, int64_t n_items, Acc<In>* __restrict__ abar) {
  using A = Acc<In>;
  __shared__ uint32_t row_tab[kSeenTable];
  __shared__ uint32_t col_tab[kSeenTable];
  fill_seen_tables(P, row_tab, col_tab);
  const int64_t item = kWarp ? static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32
                             : static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= n_items) return;
  const int64_t c = item % P.cs;
  const int64_t ns = item / P.cs;
  const In* xc = segment_base<In>(P, ns % P.S) + (ns / P.S) * P.sn + c * P.sc;
  A* dst = abar + ns * P.Dn + c * P.kh * P.kw;
  const A inv_count = P.R > 0 ? A(1) / static_cast<A>(P.R) : A(0);
  const int32_t kk = P.kh * P.kw;
  for (int32_t t0 = 0; t0 < kk; t0 += kTaps) {
    if (kWarp) {
      if (kk <= kTaps)
        warp_plane_pass<true>(P, xc, row_tab, col_tab, t0, dst, inv_count);
      else
        warp_plane_pass<false>(P, xc, row_tab, col_tab, t0, dst, inv_count);
    } else {
      if (kk <= kTaps)
        thread_plane_pass<true>(P, xc, row_tab, col_tab, t0, dst, inv_count);
      else
        thread_plane_pass<false>(P, xc, row_tab, col_tab, t0, dst, inv_count);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: problem set-up, plans and launches.

inline int64_t iabs(int64_t v) { return v < 0 ? -v : v; }

// Validates p (false: invalid) and fills P.
bool make_problem(const PatchCovarianceParams& p, Problem& P) {
  if (p.n < 0 || p.channels < 0 || p.height < 0 || p.width < 0) return false;
  if (p.kernel_h < 1 || p.kernel_w < 1 || p.stride_h < 1 || p.stride_w < 1 ||
      p.dilation_h < 1 || p.dilation_w < 1 || p.pad_top < 0 || p.pad_left < 0 ||
      p.out_h < 1 || p.out_w < 1)
    return false;
  if (p.num_segments < 0 || p.segment_start < 0 || p.segment_step < 0 ||
      p.segment_channels < 0)
    return false;
  if (p.height >= kGeomLimit || p.width >= kGeomLimit || p.pad_top >= kGeomLimit ||
      p.pad_left >= kGeomLimit || p.kernel_h >= kGeomLimit || p.kernel_w >= kGeomLimit ||
      p.out_h >= kGeomLimit || p.out_w >= kGeomLimit || p.stride_h >= kGeomLimit ||
      p.stride_w >= kGeomLimit || p.dilation_h >= kGeomLimit || p.dilation_w >= kGeomLimit)
    return false;
  if ((p.out_h - 1) * p.stride_h >= kGeomLimit || (p.out_w - 1) * p.stride_w >= kGeomLimit ||
      (p.kernel_h - 1) * p.dilation_h >= kGeomLimit ||
      (p.kernel_w - 1) * p.dilation_w >= kGeomLimit)
    return false;
  const int64_t kk = p.kernel_h * p.kernel_w;
  if (kk >= kGeomLimit || p.segment_channels >= kGeomLimit / kk) return false;
  const int64_t dn = p.segment_channels * kk;
  P.x = p.x;
  P.sn = p.x_stride_n, P.sc = p.x_stride_c, P.sh = p.x_stride_h, P.sw = p.x_stride_w;
  P.H = static_cast<int32_t>(p.height), P.W = static_cast<int32_t>(p.width);
  P.kh = static_cast<int32_t>(p.kernel_h), P.kw = static_cast<int32_t>(p.kernel_w);
  P.str_h = static_cast<int32_t>(p.stride_h), P.str_w = static_cast<int32_t>(p.stride_w);
  P.dil_h = static_cast<int32_t>(p.dilation_h), P.dil_w = static_cast<int32_t>(p.dilation_w);
  P.pt = static_cast<int32_t>(p.pad_top), P.pl = static_cast<int32_t>(p.pad_left);
  P.out_h = static_cast<int32_t>(p.out_h), P.out_w = static_cast<int32_t>(p.out_w);
  P.R = p.out_h * p.out_w;
  P.M = p.n * P.R;
  P.S = p.num_segments, P.c_start = p.segment_start, P.c_step = p.segment_step;
  P.cs = static_cast<int32_t>(p.segment_channels);
  P.Dn = static_cast<int32_t>(dn);
  P.bias = p.bias;
  P.D = P.Dn + (p.bias ? 1 : 0);
  P.factor = p.factor;
  P.fsb = p.factor_stride_batch, P.fsr = p.factor_stride_row, P.fsc = p.factor_stride_col;
  P.out = p.out;
  P.decay = p.decay;
  P.alpha = p.alpha;
  // Gather order of the tile kernels: along rows (consecutive ow) or along columns (consecutive
  // kernel columns j, else rows i, else channels), whichever is closer together in memory.
  const int64_t col_step = p.kernel_w > 1   ? p.dilation_w * p.x_stride_w
                           : p.kernel_h > 1 ? p.dilation_h * p.x_stride_h
                                            : p.x_stride_c;
  const int64_t row_step = p.out_w > 1   ? p.stride_w * p.x_stride_w
                           : p.out_h > 1 ? p.stride_h * p.x_stride_h
                                         : p.x_stride_n;
  P.rows_fast = iabs(row_step) <= iabs(col_step);
  return true;
}

// The expand problem of the reduce pass: the mean patches abar (N, S, Dn) as an input.
Problem mean_patch_problem(const Problem& P, const void* abar, int64_t n) {
  Problem Q = P;
  Q.x = abar;
  Q.sn = P.S * P.Dn, Q.sc = 1, Q.sh = 0, Q.sw = 0;
  Q.H = 1, Q.W = 1;
  Q.kh = Q.kw = 1, Q.str_h = Q.str_w = 1, Q.dil_h = Q.dil_w = 1, Q.pt = Q.pl = 0;
  Q.out_h = Q.out_w = 1;
  Q.R = 1;
  Q.M = n;
  Q.c_start = 0, Q.c_step = P.Dn;
  Q.cs = P.Dn;
  Q.rows_fast = false;
  return Q;
}

int small_dmax(const Problem& P, size_t acc_size) {
  if (P.D <= 4) return 4;
  if (P.D <= 10) return 10;
  if (P.D <= kSmallMax && acc_size == 4) return 16;
  return 0;
}

struct ExpandPlan {
  int dmax = 0;  // small kernel's DMAX, 0: tile kernel
  int64_t nt = 0, npairs = 0, slices = 1, rows_per_slice = 1;
  size_t workspace_bytes = 0;
};

ExpandPlan plan_expand(const Problem& P, size_t acc_size) {
  ExpandPlan plan;
  if (P.S <= 0 || P.D <= 0) return plan;
  plan.dmax = small_dmax(P, acc_size);
  plan.rows_per_slice = P.M > 0 ? P.M : 1;
  if (plan.dmax > 0) {
    if (P.S < kTargetWarps && P.M >= 2 * kMinRowsPerWarp) {
      int64_t slices = ceil_div(kTargetWarps, P.S);
      if (slices > P.M / kMinRowsPerWarp) slices = P.M / kMinRowsPerWarp;
      plan.rows_per_slice = ceil_div(P.M, slices);
      plan.slices = ceil_div(P.M, plan.rows_per_slice);
    }
    if (plan.slices > 1) {
      const int64_t e = static_cast<int64_t>(plan.dmax) * (plan.dmax + 1) / 2;
      plan.workspace_bytes = static_cast<size_t>(P.S * plan.slices * e) * acc_size;
    }
    return plan;
  }
  plan.nt = ceil_div(P.D, kTile);
  plan.npairs = plan.nt * (plan.nt + 1) / 2;
  const int64_t base = P.S * plan.npairs;
  if (base < kTargetTileBlocks && P.M >= 2 * kMinRowsPerSlice) {
    int64_t slices = ceil_div(kTargetTileBlocks, base);
    if (slices > P.M / kMinRowsPerSlice) slices = P.M / kMinRowsPerSlice;
    plan.rows_per_slice = ceil_div(ceil_div(P.M, slices), kChunkRows) * kChunkRows;
    plan.slices = ceil_div(P.M, plan.rows_per_slice);
  }
  if (plan.slices > 1) {
    plan.workspace_bytes =
        static_cast<size_t>(base * plan.slices) * kTile * kTile * acc_size;
  }
  return plan;
}

constexpr size_t kAlign = 256;
inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

size_t mean_bytes(const Problem& P, int64_t n, size_t acc_size) {
  return static_cast<size_t>(n * P.S * P.Dn) * acc_size;
}

template <typename In, int DMAX>
cudaError_t launch_small(const Problem& P, const ExpandPlan& plan, void* workspace,
                         cudaStream_t stream) {
  using A = Acc<In>;
  const int64_t warps = P.S * plan.slices;
  const int64_t blocks = ceil_div(warps, kWarps);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (plan.slices == 1) {
    pc_small_kernel<In, DMAX, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        P, 1, plan.rows_per_slice, nullptr);
    return cudaGetLastError();
  }
  A* partial = static_cast<A*>(workspace);
  pc_small_kernel<In, DMAX, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      P, plan.slices, plan.rows_per_slice, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t entries = P.S * (DMAX * (DMAX + 1) / 2);
  const int64_t blocks2 = ceil_div(entries, kThreads);
  if (blocks2 > kMaxGridX) return cudaErrorInvalidConfiguration;
  pc_small_reduce_kernel<A, DMAX><<<static_cast<unsigned>(blocks2), kThreads, 0, stream>>>(
      P, plan.slices, partial);
  return cudaGetLastError();
}

template <typename In>
cudaError_t launch_expand(const Problem& P, const ExpandPlan& plan, void* workspace,
                          cudaStream_t stream) {
  using A = Acc<In>;
  if (P.S <= 0 || P.D <= 0) return cudaSuccess;
  if (plan.slices > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (plan.dmax) {
    case 4:
      return launch_small<In, 4>(P, plan, workspace, stream);
    case 10:
      return launch_small<In, 10>(P, plan, workspace, stream);
    case 16:
      if constexpr (sizeof(A) == 4) {
        return launch_small<In, 16>(P, plan, workspace, stream);
      } else {
        return cudaErrorInvalidValue;
      }
    default:
      break;
  }
  if (plan.npairs * plan.slices > kMaxGridX) return cudaErrorInvalidConfiguration;
  const unsigned grid_y = static_cast<unsigned>(P.S < kMaxGridY ? P.S : kMaxGridY);
  if (plan.slices == 1) {
    const dim3 grid(static_cast<unsigned>(plan.npairs), grid_y);
    pc_tile_kernel<In, false><<<grid, kThreads, 0, stream>>>(P, plan.nt, 1, plan.rows_per_slice,
                                                             nullptr);
    return cudaGetLastError();
  }
  A* partial = static_cast<A*>(workspace);
  const dim3 grid(static_cast<unsigned>(plan.npairs * plan.slices), grid_y);
  pc_tile_kernel<In, true><<<grid, kThreads, 0, stream>>>(P, plan.nt, plan.slices,
                                                          plan.rows_per_slice, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid2(static_cast<unsigned>(plan.npairs), grid_y);
  pc_tile_reduce_kernel<A><<<grid2, kThreads, 0, stream>>>(P, plan.nt, plan.slices, partial);
  return cudaGetLastError();
}

template <typename In>
cudaError_t launch_mean(const Problem& P, int64_t n, Acc<In>* abar, cudaStream_t stream) {
  const int64_t items = n * P.S * P.cs;
  if (items == 0) return cudaSuccess;
  // Planes and kernels that fit the shared tables: each pixel read once per 16 offsets, by a
  // thread per item where channels are fastest in memory (channels_last: neighbouring threads
  // read neighbouring channels) and there are enough items, else by a warp per item. Otherwise
  // each pixel is read once per offset (pc_mean_warp_kernel).
  if (plane_kernels_fit(P) && iabs(P.sc) < iabs(P.sw) && P.W > 1 && items >= kMinThreadItems) {
    const int64_t blocks = ceil_div(items, kThreads);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    pc_mean_plane_kernel<In, false>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(P, items, abar);
    return cudaGetLastError();
  }
  const int64_t blocks = ceil_div(items, kWarps);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (plane_kernels_fit(P))
    pc_mean_plane_kernel<In, true>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(P, items, abar);
  else
    pc_mean_warp_kernel<In><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(P, items,
                                                                                    abar);
  return cudaGetLastError();
}

size_t acc_size_of(ElementType t) { return t == ElementType::kFloat64 ? 8 : 4; }

bool valid_type(ElementType t) {
  return t == ElementType::kFloat32 || t == ElementType::kFloat64 || t == ElementType::kFloat16 ||
         t == ElementType::kBFloat16;
}

// Workspace layout: reduce: [abar (aligned)][expand partials]; expand: [expand partials].
struct Plan {
  bool ok = false;
  Problem P{};
  Problem Q{};  // the problem the Gram kernels run on (P itself, or the mean patches)
  ExpandPlan expand;
  size_t abar_bytes = 0;
  size_t workspace_bytes = 0;
};

Plan make_plan(const PatchCovarianceParams& p) {
  Plan plan;
  if (!valid_type(p.x_type) || !make_problem(p, plan.P)) return plan;
  plan.ok = true;
  const size_t acc = acc_size_of(p.x_type);
  if (p.reduce) {
    plan.abar_bytes = align_up(mean_bytes(plan.P, p.n, acc));
    plan.Q = mean_patch_problem(plan.P, nullptr, p.n);
  } else {
    plan.Q = plan.P;
  }
  plan.expand = plan_expand(plan.Q, acc);
  plan.workspace_bytes = plan.abar_bytes + plan.expand.workspace_bytes;
  return plan;
}

template <typename In>
cudaError_t run(const PatchCovarianceParams& p, Plan& plan, void* workspace,
                cudaStream_t stream) {
  using A = Acc<In>;
  if (!p.reduce) return launch_expand<In>(plan.P, plan.expand, workspace, stream);
  A* abar = static_cast<A*>(workspace);
  cudaError_t err = launch_mean<In>(plan.P, p.n, abar, stream);
  if (err != cudaSuccess) return err;
  plan.Q.x = abar;
  void* rest = plan.expand.workspace_bytes > 0
                   ? static_cast<void*>(static_cast<unsigned char*>(workspace) + plan.abar_bytes)
                   : nullptr;
  return launch_expand<A>(plan.Q, plan.expand, rest, stream);
}

}  // namespace

size_t patch_covariance_workspace_bytes(const PatchCovarianceParams& p) {
  const Plan plan = make_plan(p);
  return plan.ok ? plan.workspace_bytes : 0;
}

cudaError_t patch_covariance(const PatchCovarianceParams& p, void* workspace,
                             cudaStream_t stream) {
  Plan plan = make_plan(p);
  if (!plan.ok) return cudaErrorInvalidValue;
  if (plan.P.S == 0 || plan.P.D == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (p.x == nullptr && plan.P.M > 0 && plan.P.Dn > 0) return cudaErrorInvalidValue;
  if (plan.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (p.x_type) {
    case ElementType::kFloat32:
      return run<float>(p, plan, workspace, stream);
    case ElementType::kFloat64:
      return run<double>(p, plan, workspace, stream);
    case ElementType::kFloat16:
      return run<__half>(p, plan, workspace, stream);
    case ElementType::kBFloat16:
      return run<__nv_bfloat16>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kfac_kernels
