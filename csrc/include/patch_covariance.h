// Patch covariance (the A factor of a convolution) without im2col, torch-free declarations.
//
// x is (N, C, H, W), read through element strides; a 1-d convolution is H = 1. A patch of
// example n at output position (oh, ow) and a channel segment s has coordinates (c, i, j),
// flattened as d = (c * kernel_h + i) * kernel_w + j (the order of weight.reshape(C_out, -1)),
// with value
//     x[n, c0(s) + c, oh * stride_h + i * dilation_h - pad_top, ow * stride_w + j * dilation_w - pad_left]
// or 0 where that position lies in the zero padding. With `bias`, a last coordinate equal to 1
// is appended, so D = segment_channels * kernel_h * kernel_w + (bias ? 1 : 0).
//
// Segment s covers channels [c0(s), c0(s) + segment_channels) with
// c0(s) = segment_start + s * segment_step: one segment per convolution group (step = C/groups),
// or one per diagonal block of a block-diagonal factor (BD-KFAC).
//
// For every segment s:
//     expand (reduce = false): out[s] = decay * factor[s] + alpha * sum_{n, oh, ow} a a^T
//     reduce (reduce = true):  out[s] = decay * factor[s] + alpha * sum_n abar_n abar_n^T,
//         abar_n = mean over the out_h * out_w positions of the patches of example n
//         (its bias coordinate is 1).
// Callers pass alpha = 1 / (N * out_h * out_w) (expand) or 1 / N (reduce) for the average.
// factor may be null (zero; decay ignored). out is dense row-major (num_segments, D, D) of the
// accumulation type and must not overlap x or factor. Only one triangle is computed; each value
// is written to (i, j) and (j, i), so out is exactly symmetric when factor is (or is null).
//
// Accumulation type: double for kFloat64 input, float for every other input type; factor and out
// have the accumulation type. fp16/bf16 inputs are converted to float as they are loaded.
#pragma once

#include <cstddef>
#include <cstdint>

#include "element_type.h"

namespace kfac_kernels {

struct PatchCovarianceParams {
  const void* x = nullptr;
  ElementType x_type = ElementType::kFloat32;
  int64_t n = 0, channels = 0, height = 0, width = 0;
  int64_t x_stride_n = 0, x_stride_c = 0, x_stride_h = 0, x_stride_w = 0;  // in elements

  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t pad_top = 0, pad_left = 0;  // zero padding before the first row / column
  int64_t out_h = 0, out_w = 0;       // output positions (pad_bottom / pad_right are implied)

  int64_t num_segments = 1, segment_start = 0, segment_step = 0, segment_channels = 0;
  bool reduce = false;
  bool bias = false;

  const void* factor = nullptr;  // accumulation type, (num_segments, D, D) through strides
  int64_t factor_stride_batch = 0, factor_stride_row = 0, factor_stride_col = 1;
  void* out = nullptr;           // accumulation type, dense (num_segments, D, D)
  double decay = 1.0;
  double alpha = 1.0;

  int64_t dim() const { return segment_channels * kernel_h * kernel_w + (bias ? 1 : 0); }
};

namespace cpu {

// Multithreaded (OpenMP) CPU kernel; never materialises the unfolded input. Deterministic: the
// result does not depend on the number of threads.
void patch_covariance(const PatchCovarianceParams& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// Bytes of device scratch memory patch_covariance needs for p (e.g. mean patches in reduce mode,
// partial sums of a split over examples); 0 when none.
size_t patch_covariance_workspace_bytes(const PatchCovarianceParams& p);

// Launches on `stream`; `workspace` has at least patch_covariance_workspace_bytes(p) bytes.
cudaError_t patch_covariance(const PatchCovarianceParams& p, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
