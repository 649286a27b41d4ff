// Fused SINGD parameter step for diagonal Kronecker factors, torch-free declarations.
//
// For a parameter matrix P (rows x cols) with gradient G, diagonal factors C = diag(c) (rows)
// and K = diag(k) (cols), and a momentum buffer B (all element-wise, one pass):
//
//     v        = c_i (c_i ((g_ij k_j) k_j))            (C C^T G K K^T, in this order)
//     d        = v + weight_decay * p_ij               (only when weight_decay != 0)
//     b_ij     = first ? d : momentum * b_ij + d
//     p_ij     = p_ij - lr * b_ij
//
// c, k and B are in the accumulation type A (float, or double for double parameters); P and G
// are A or bfloat16 (raw bits, round-to-nearest-even on store). Every operation is evaluated in
// A and P is rounded once. Rows may be strided; the elements of a row are contiguous.
//
// This header includes no torch header; the CUDA declarations are visible when compiling with
// nvcc or with KFAC_KERNELS_WITH_CUDA defined.
#pragma once

#include <cstdint>

#include "element_type.h"

namespace kfac_kernels {

template <typename A>
struct SingdDiagonalStepParams {
  void* param = nullptr;          // rows x cols, element type A or bfloat16 (param_type)
  const void* grad = nullptr;     // same element type and shape as param
  ElementType param_type = element_type_of<A>;  // or ElementType::kBFloat16
  const A* c = nullptr;           // rows
  const A* k = nullptr;           // cols
  A* buf = nullptr;               // rows x cols
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t param_stride_row = 0;   // in elements
  int64_t grad_stride_row = 0;
  int64_t buf_stride_row = 0;
  A lr = A(0);
  A momentum = A(0);
  A weight_decay = A(0);
  bool first = false;             // initialise the buffer with d instead of accumulating
};

// The step of many parameters in one call (singd_diagonal_step_foreach): each entry of `list` is
// one parameter's step, as above; the entries must not overlap. One call, and on a GPU one
// launch per kMaxTensorsPerLaunch entries: a network's fused step is bound by the host's time
// per call otherwise (one call per weight and bias).
constexpr int kMaxTensorsPerLaunch = 24;  // the entries fit a kernel's 4 KiB of parameters

namespace cpu {

// OpenMP over rows when compiled with it; the result does not depend on the thread count.
template <typename A>
void singd_diagonal_step(const SingdDiagonalStepParams<A>& p);

// Every entry of `list` (count entries) in turn.
template <typename A>
void singd_diagonal_steps(const SingdDiagonalStepParams<A>* list, int64_t count);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// Enqueue the step on `stream` (device pointers). Returns the launch error or cudaSuccess.
template <typename A>
cudaError_t singd_diagonal_step(const SingdDiagonalStepParams<A>& p, cudaStream_t stream);

// Enqueue every entry of `list` (a host array of count entries holding device pointers): one
// launch per kMaxTensorsPerLaunch entries, the entries passed by value (no copy to the device,
// no allocation). Any number of rows. Returns the first launch error or cudaSuccess.
template <typename A>
cudaError_t singd_diagonal_steps(const SingdDiagonalStepParams<A>* list, int64_t count,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
