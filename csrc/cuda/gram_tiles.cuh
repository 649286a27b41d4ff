// Internal header of the CUDA kernels (csrc/cuda/*.cu only; not part of the public declarations
// in csrc/include): what the two Gram kernels, symmetric_factor_update.cu and
// patch_covariance.cu, share. Both compute only the upper-triangular tiles (ti <= tj) of a
// symmetric D x D sum, write each tile to (i, j) and mirrored to (j, i) as
// decay * factor + alpha * g, and, when rows are split into slices, add the slices' partial tiles
// in a fixed order (deterministic results). The CPU counterpart is csrc/cpu/gram_tiles.h.
//
// The final combination uses explicitly rounded operations (mul_rn / add_rn: nvcc never contracts
// them into an fma), so the two writes of an entry are bitwise equal whenever
// factor[i][j] == factor[j][i].
//
// Nothing here declares shared memory: the callers own it (the CUDA emulation rewrites shared
// declarations in the .cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kfac_kernels {
namespace cuda {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Rounded arithmetic in the accumulation type (float or double).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }

// Linear index q over the upper triangle (row-major) of an nt x nt tile grid -> (ti, tj).
// Row ti starts at ti * (2 nt - ti + 1) / 2.
__device__ __forceinline__ void tile_pair(int64_t q, int64_t nt, int64_t& ti, int64_t& tj) {
  const double b = 2.0 * static_cast<double>(nt) + 1.0;
  int64_t t = static_cast<int64_t>(floor((b - sqrt(b * b - 8.0 * static_cast<double>(q))) * 0.5));
  if (t < 0) t = 0;
  if (t > nt - 1) t = nt - 1;
  while (t > 0 && t * (2 * nt - t + 1) / 2 > q) --t;
  while (t + 1 < nt && (t + 1) * (2 * nt - t) / 2 <= q) ++t;
  ti = t;
  tj = t + (q - t * (2 * nt - t + 1) / 2);
}

// SIMT register tiles: the 256 threads of a block as 16 x 16, thread (tx, ty) = (threadIdx.x % 16,
// threadIdx.x / 16) holding the kSub x kSub entries (ty + 16 r, tx + 16 c) of a 16 kSub square tile.
template <int kSub, typename A>
__device__ __forceinline__ void zero_tile(A (&t)[kSub][kSub]) {
#pragma unroll
  for (int r = 0; r < kSub; ++r)
#pragma unroll
    for (int c = 0; c < kSub; ++c) t[r][c] = A(0);
}

// part[r][c] += a[kk][ty + 16 r] * b[kk][tx + 16 c] for the kK staged rows kk in order (fma); the
// panels a and b (b == a on a diagonal tile) are in shared memory with row stride ld.
template <int kK, int kSub, typename A>
__device__ __forceinline__ void fma_staged_rows(A (&part)[kSub][kSub], const A* a, const A* b,
                                                int ld) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    A av[kSub], bv[kSub];
#pragma unroll
    for (int r = 0; r < kSub; ++r) av[r] = a[kk * ld + ty + 16 * r];
#pragma unroll
    for (int c = 0; c < kSub; ++c) bv[c] = b[kk * ld + tx + 16 * c];
#pragma unroll
    for (int r = 0; r < kSub; ++r)
#pragma unroll
      for (int c = 0; c < kSub; ++c) part[r][c] = fma_(av[r], bv[c], part[r][c]);
  }
}

// acc += part entry by entry, rounded: the second level of the two-level summation (each chunk of
// rows is summed from zero in part, so the rounding error grows with the chunk length plus the
// number of chunks rather than with the number of rows).
template <int kSub, typename A>
__device__ __forceinline__ void add_tile(A (&acc)[kSub][kSub], const A (&part)[kSub][kSub]) {
#pragma unroll
  for (int r = 0; r < kSub; ++r)
#pragma unroll
    for (int c = 0; c < kSub; ++c) acc[r][c] = add_rn(acc[r][c], part[r][c]);
}

// dst[(ty + 16 r) * ld + tx + 16 c] = t[r][c].
template <int kSub, typename A>
__device__ __forceinline__ void store_tile(A* dst, int ld, const A (&t)[kSub][kSub]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kSub; ++r)
#pragma unroll
    for (int c = 0; c < kSub; ++c) dst[(ty + 16 * r) * ld + tx + 16 * c] = t[r][c];
}

// Writes the raw sums of the kTile x kTile tile at (ci, cj), staged in shared memory (`stage`, row
// stride ld), to out[i][j] (consecutive threads on consecutive j) and out[j][i] (consecutive i) of
// the dense d x d matrix `out`, as decay * factor + alpha * sum (alpha * sum where factor is null;
// factor is read through strides fsr, fsc). On a diagonal tile only the upper entries are used.
// kThreads threads take part; ends with a barrier, so `stage` may be overwritten afterwards.
template <int kTile, int kThreads, typename A>
__device__ void write_symmetric_tile(A* out, int64_t d, const A* factor, int64_t fsr,
                                     int64_t fsc, A alpha, A decay, int64_t ci, int64_t cj,
                                     bool diag, const A* stage, int ld) {
  const int wi = static_cast<int>(d - ci < kTile ? d - ci : kTile);
  const int wj = static_cast<int>(d - cj < kTile ? d - cj : kTile);
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int lr = e / kTile, lc = e % kTile;
    if (lr < wi && lc < wj && (!diag || lr <= lc)) {
      const int64_t i = ci + lr, j = cj + lc;
      const A g = mul_rn(alpha, stage[lr * ld + lc]);
      out[i * d + j] = factor ? add_rn(mul_rn(decay, factor[i * fsr + j * fsc]), g) : g;
    }
  }
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int lc = e / kTile, lr = e % kTile;
    if (lr < wi && lc < wj && (!diag || lr < lc)) {
      const int64_t i = ci + lr, j = cj + lc;
      const A g = mul_rn(alpha, stage[lr * ld + lc]);
      out[j * d + i] = factor ? add_rn(mul_rn(decay, factor[j * fsr + i * fsc]), g) : g;
    }
  }
  __syncthreads();
}

// The sum over `slices` partial tiles (src[slice * kTile * kTile + row * kTile + col], added in
// slice order) staged to stage[row * ld + col]. Ends with a barrier: the stage is complete.
template <int kTile, int kThreads, typename A>
__device__ void sum_partial_tiles(const A* src, int64_t slices, A* stage, int ld) {
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    A sum = src[e];
    for (int64_t k = 1; k < slices; ++k) sum = add_rn(sum, src[k * (kTile * kTile) + e]);
    stage[(e / kTile) * ld + e % kTile] = sum;
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace kfac_kernels
