// Fused symmetric factor update, torch-free declarations.
//
//     out[b] = decay * factor[b] + alpha * x[b]^T x[b]        (b = 0 .. batch-1)
//
// x is (batch, m, d) with arbitrary element strides, factor is (batch, d, d) with arbitrary
// strides or null (a zero factor; decay is then ignored), out is a dense row-major
// (batch, d, d) buffer that must not overlap x or factor. A 2-D problem is batch = 1 with any
// batch stride (0 is fine).
//
// Only the upper triangle of x^T x is computed (output tiles (ti, tj) with ti <= tj); every
// entry g_ij of it is written to both out[i][j] and out[j][i] as
//     out[i][j] = decay * factor[i][j] + alpha * g_ij
//     out[j][i] = decay * factor[j][i] + alpha * g_ij
// so the result follows the definition for any factor and is exactly symmetric whenever the
// factor is (or is null). Accumulation is in T (fp32 or fp64).
//
// This header includes no torch header and is usable from plain C++; the CUDA declarations are
// visible when compiling with nvcc or with KFAC_KERNELS_WITH_CUDA defined (then
// cuda_runtime_api.h must be on the include path).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kfac_kernels {

template <typename T>
struct SymmetricFactorUpdateParams {
  // element (b, k, i) of x is x[b * x_stride_batch + k * x_stride_row + i * x_stride_col]
  const T* x = nullptr;
  int64_t batch = 1;
  int64_t m = 0;                // rows of x (may be 0: out = decay * factor, or zeros)
  int64_t d = 0;                // columns of x; out is d x d
  int64_t x_stride_batch = 0;
  int64_t x_stride_row = 0;
  int64_t x_stride_col = 1;
  const T* factor = nullptr;    // null: zero factor, decay ignored
  int64_t factor_stride_batch = 0;
  int64_t factor_stride_row = 0;
  int64_t factor_stride_col = 1;
  T* out = nullptr;             // dense (batch, d, d), row-major
  T decay = T(1);
  T alpha = T(1);
};

namespace cpu {

// Multithreaded (OpenMP, when compiled with it) CPU kernel; instantiated for float and double.
// The result does not depend on the number of threads.
template <typename T>
void symmetric_factor_update(const SymmetricFactorUpdateParams<T>& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// Bytes of device scratch memory the CUDA kernel needs for this problem (0 for most shapes; the
// split over m used when there are few output tiles and many rows needs partial sums).
template <typename T>
size_t symmetric_factor_update_workspace_bytes(const SymmetricFactorUpdateParams<T>& p);

// Enqueue the update on `stream`. All pointers are device pointers; `workspace` must hold at
// least symmetric_factor_update_workspace_bytes(p) bytes (may be null when that is 0) and stay
// alive until the work on `stream` is done. Returns the launch error, cudaSuccess otherwise.
// Deterministic: the same inputs give bitwise the same output.
template <typename T>
cudaError_t symmetric_factor_update(const SymmetricFactorUpdateParams<T>& p, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
