// CPU implementation of kfac_kernels::patch_covariance (glue around the torch-free kernel in
// csrc/cpu/patch_covariance.cpp; the checks are in patch_covariance_glue.h).
#include "patch_covariance_glue.h"

#include <torch/library.h>

namespace kfac_kernels {
namespace {

at::Tensor patch_covariance_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef dilation,
                                at::IntArrayRef padding, at::IntArrayRef out_size,
                                int64_t num_segments, int64_t segment_start, int64_t segment_step,
                                int64_t segment_channels, bool reduce, bool bias,
                                const std::optional<at::Tensor>& factor, double decay,
                                double alpha) {
  PatchCovarianceParams p = glue::make_patch_covariance_params(
      x, kernel_size, stride, dilation, padding, out_size, num_segments, segment_start,
      segment_step, segment_channels, reduce, bias, factor, decay, alpha, c10::kCPU);
  at::Tensor out = glue::empty_patch_covariance_output(p, x);
  if (out.numel() == 0) return out;
  p.out = out.mutable_data_ptr();
  cpu::patch_covariance(p);
  return out;
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("patch_covariance", &kfac_kernels::patch_covariance_cpu);
}
