// CUDA kernel of the fused symmetric factor update (torch-free: raw pointers, sizes, strides and
// a stream; compiles with plain `nvcc -c -Icsrc/include`).
//
//     out[b] = decay * factor[b] + alpha * x[b]^T x[b]
//
// One thread block per upper-triangular 64 x 64 output tile (ti <= tj), per batch element. A
// linear block index is mapped to (ti, tj). Each step stages kK rows of the two column panels of
// x in shared memory (any strides: the load order follows whichever of x's strides is smaller);
// 256 threads each accumulate a 4 x 4 sub-tile in T (fp32 for float, fp64 for double). The tile
// is written to (i, j) directly and, through a shared-memory transpose, coalesced to (j, i).
// The final combination decay * f + alpha * g uses explicitly rounded operations, so the two
// writes of an entry are bitwise equal whenever factor[i][j] == factor[j][i].
//
// When there are few tiles and many rows, rows are split into slices: a first kernel writes each
// slice's partial tile to a workspace and a second adds them in a fixed order, so results are
// deterministic.
#include "symmetric_factor_update.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "gram_tiles.cuh"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kTile = 64;       // output tile edge
constexpr int kK = 16;          // rows of x staged per step
constexpr int kLd = kTile + 1;  // padded shared-memory row
constexpr int kThreads = 256;   // 16 x 16 threads, 4 x 4 outputs each
constexpr int kSub = 4;
constexpr int kChunkSteps = 8;  // kK-row steps per inner summation chunk
// Blocks per SM the register allocation must allow: fp64 needs more registers per thread.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 4 ? 2 : 1;
constexpr int64_t kMinRowsPerSlice = 1024;
constexpr int64_t kTargetBlocks = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct Smem {
  static constexpr int kLoadElems = 2 * kK * kLd;
  static constexpr int kTransposeElems = kTile * kLd;
  static constexpr int kElems = kLoadElems > kTransposeElems ? kLoadElems : kTransposeElems;
};

// out[b] from the raw sums of tile (ci, cj) staged in sh (row stride kLd); ends with a barrier.
template <typename T>
__device__ void write_to_output(const SymmetricFactorUpdateParams<T>& p, int64_t b, int64_t ci,
                                int64_t cj, bool diag, const T* sh) {
  const T* fb = p.factor ? p.factor + b * p.factor_stride_batch : nullptr;
  write_symmetric_tile<kTile, kThreads>(p.out + b * p.d * p.d, p.d, fb, p.factor_stride_row,
                                        p.factor_stride_col, p.alpha, p.decay, ci, cj, diag, sh,
                                        kLd);
}

// acc holds this thread's 4 x 4 entries of x^T x for tile (ti, tj): rows ty + 16 r, columns
// tx + 16 c. They are staged in shared memory (`sh`, kTile x kLd) and written by
// write_symmetric_tile (gram_tiles.cuh), which ends with a barrier, so `sh` may alias the staging
// buffers of the main loop. No barrier is needed before the stores into `sh`: the last accesses
// to shared memory before them are either the main loop's reads of the staged rows, which its
// last step's closing barrier ends, or (no rows: m == 0) the previous batch element's reads of
// its tile, which write_symmetric_tile's closing barrier ends.
template <typename T>
__device__ void write_tile(const SymmetricFactorUpdateParams<T>& p, int64_t b, int64_t ci,
                           int64_t cj, bool diag, const T (&acc)[kSub][kSub], T* sh) {
  store_tile(sh, kLd, acc);
  __syncthreads();
  write_to_output(p, b, ci, cj, diag, sh);
}

// grid.x = npairs * slices, grid.y strides over the batch. With kSplit each block writes its
// partial tile to `partial`; otherwise it writes the output.
template <typename T, bool kSplit>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    sfu_tile_kernel(SymmetricFactorUpdateParams<T> p, int64_t nt, int64_t slices,
                    int64_t rows_per_slice, T* __restrict__ partial) {
  __shared__ __align__(16) unsigned char smem_raw[Smem<T>::kElems * sizeof(T)];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* As = smem;             // kK x kLd
  T* Bs = smem + kK * kLd;  // kK x kLd

  const int64_t q = blockIdx.x / slices;
  const int64_t s = blockIdx.x % slices;
  int64_t ti, tj;
  tile_pair(q, nt, ti, tj);
  const int64_t ci = ti * kTile, cj = tj * kTile;
  const bool diag = ti == tj;
  const int64_t d = p.d;
  const int64_t k_begin = s * rows_per_slice;
  const int64_t k_end = min(p.m, k_begin + rows_per_slice);
  const int64_t sxm = p.x_stride_row, sxd = p.x_stride_col;
  const bool cols_fast = (sxd < 0 ? -sxd : sxd) <= (sxm < 0 ? -sxm : sxm);
  const T* Bsrc = diag ? As : Bs;
  const int64_t npairs = nt * (nt + 1) / 2;

  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const T* xb = p.x + b * p.x_stride_batch;
    T acc[kSub][kSub];
    zero_tile(acc);

    // Two-level summation: chunks of kK * kChunkSteps rows are summed from zero in `part`, then
    // added to `acc`, so the rounding error grows with the chunk length plus m / chunk, not m.
    for (int64_t kc0 = k_begin; kc0 < k_end; kc0 += kK * kChunkSteps) {
      const int64_t kc_end = min(k_end, kc0 + kK * kChunkSteps);
      T part[kSub][kSub];
      zero_tile(part);
      for (int64_t k0 = kc0; k0 < kc_end; k0 += kK) {
        for (int e = threadIdx.x; e < kK * kTile; e += kThreads) {
          int kk, c;
          if (cols_fast) {
            kk = e / kTile, c = e % kTile;
          } else {
            c = e / kK, kk = e % kK;
          }
          const int64_t k = k0 + kk;
          T va = T(0), vb = T(0);
          if (k < kc_end) {
            const T* row = xb + k * sxm;
            if (ci + c < d) va = row[(ci + c) * sxd];
            if (!diag && cj + c < d) vb = row[(cj + c) * sxd];
          }
          As[kk * kLd + c] = va;
          if (!diag) Bs[kk * kLd + c] = vb;
        }
        __syncthreads();
        fma_staged_rows<kK>(part, As, Bsrc, kLd);
        __syncthreads();
      }
      add_tile(acc, part);
    }

    if (kSplit) {
      store_tile(partial + ((b * npairs + q) * slices + s) * (kTile * kTile), kTile, acc);
    } else {
      write_tile<T>(p, b, ci, cj, diag, acc, smem);
    }
  }
}

// grid.x = npairs, grid.y strides over the batch: add the slices' partial tiles in order.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>)
    sfu_reduce_kernel(SymmetricFactorUpdateParams<T> p, int64_t nt, int64_t slices,
                      const T* __restrict__ partial) {
  __shared__ __align__(16) unsigned char smem_raw[Smem<T>::kTransposeElems * sizeof(T)];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t q = blockIdx.x;
  int64_t ti, tj;
  tile_pair(q, nt, ti, tj);
  const int64_t npairs = nt * (nt + 1) / 2;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const T* src = partial + (b * npairs + q) * slices * (kTile * kTile);
    sum_partial_tiles<kTile, kThreads>(src, slices, smem, kLd);
    write_to_output(p, b, ti * kTile, tj * kTile, ti == tj, smem);
  }
}

struct Plan {
  int64_t nt = 0, npairs = 0, slices = 1, rows_per_slice = 0;
  size_t workspace_bytes = 0;
};

template <typename T>
Plan make_plan(const SymmetricFactorUpdateParams<T>& p) {
  Plan plan;
  if (p.batch <= 0 || p.d <= 0) return plan;
  plan.nt = ceil_div(p.d, kTile);
  plan.npairs = plan.nt * (plan.nt + 1) / 2;
  plan.rows_per_slice = p.m > 0 ? p.m : 1;
  const int64_t base = p.batch * plan.npairs;
  if (base < kTargetBlocks && p.m >= 2 * kMinRowsPerSlice) {
    int64_t slices = ceil_div(kTargetBlocks, base);
    if (slices > p.m / kMinRowsPerSlice) slices = p.m / kMinRowsPerSlice;
    plan.rows_per_slice = ceil_div(ceil_div(p.m, slices), kK) * kK;
    plan.slices = ceil_div(p.m, plan.rows_per_slice);
  }
  if (plan.slices > 1) {
    plan.workspace_bytes = static_cast<size_t>(base * plan.slices) * kTile * kTile * sizeof(T);
  }
  return plan;
}

}  // namespace

template <typename T>
size_t symmetric_factor_update_workspace_bytes(const SymmetricFactorUpdateParams<T>& p) {
  return make_plan(p).workspace_bytes;
}

template <typename T>
cudaError_t symmetric_factor_update(const SymmetricFactorUpdateParams<T>& p, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  const Plan plan = make_plan(p);
  if (plan.npairs == 0) return cudaSuccess;
  if (p.x == nullptr && p.m > 0) return cudaErrorInvalidValue;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (plan.npairs * plan.slices > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 block(kThreads);
  const unsigned grid_y = static_cast<unsigned>(p.batch < kMaxGridY ? p.batch : kMaxGridY);
  if (plan.slices == 1) {
    const dim3 grid(static_cast<unsigned>(plan.npairs), grid_y);
    sfu_tile_kernel<T, false><<<grid, block, 0, stream>>>(p, plan.nt, 1, plan.rows_per_slice,
                                                          nullptr);
    return cudaGetLastError();
  }
  if (workspace == nullptr || workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  T* partial = static_cast<T*>(workspace);
  const dim3 grid(static_cast<unsigned>(plan.npairs * plan.slices), grid_y);
  sfu_tile_kernel<T, true><<<grid, block, 0, stream>>>(p, plan.nt, plan.slices,
                                                       plan.rows_per_slice, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid2(static_cast<unsigned>(plan.npairs), grid_y);
  sfu_reduce_kernel<T><<<grid2, block, 0, stream>>>(p, plan.nt, plan.slices, partial);
  return cudaGetLastError();
}

template size_t symmetric_factor_update_workspace_bytes<float>(
    const SymmetricFactorUpdateParams<float>&);
template size_t symmetric_factor_update_workspace_bytes<double>(
    const SymmetricFactorUpdateParams<double>&);
template cudaError_t symmetric_factor_update<float>(const SymmetricFactorUpdateParams<float>&,
                                                    void*, size_t, cudaStream_t);
template cudaError_t symmetric_factor_update<double>(const SymmetricFactorUpdateParams<double>&,
                                                     void*, size_t, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
