// CUDA implementation of kfac_kernels::patch_covariance (glue around the torch-free kernels in
// csrc/cuda/patch_covariance.cu; the argument checks are shared with the CPU glue in
// patch_covariance_glue.h). Compiled only when the extension is built with CUDA
// (KFAC_KERNELS_WITH_CUDA is defined).
#include "patch_covariance_glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h: no cuBLAS/cuSPARSE headers needed.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace kfac_kernels {
namespace {

at::Tensor patch_covariance_cuda(const at::Tensor& x, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef dilation,
                                 at::IntArrayRef padding, at::IntArrayRef out_size,
                                 int64_t num_segments, int64_t segment_start,
                                 int64_t segment_step, int64_t segment_channels, bool reduce,
                                 bool bias, const std::optional<at::Tensor>& factor, double decay,
                                 double alpha) {
  PatchCovarianceParams p = glue::make_patch_covariance_params(
      x, kernel_size, stride, dilation, padding, out_size, num_segments, segment_start,
      segment_step, segment_channels, reduce, bias, factor, decay, alpha, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = glue::empty_patch_covariance_output(p, x);
  if (out.numel() == 0) return out;
  p.out = out.mutable_data_ptr();
  const size_t bytes = cuda::patch_covariance_workspace_bytes(p);
  at::Tensor workspace;  // from the caching allocator, stream-ordered
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  }
  const cudaError_t err = cuda::patch_covariance(
      p, bytes > 0 ? workspace.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "kfac_kernels::patch_covariance: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("patch_covariance", &kfac_kernels::patch_covariance_cuda);
}
