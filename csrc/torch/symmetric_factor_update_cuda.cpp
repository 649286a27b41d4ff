// CUDA implementation of kfac_kernels::symmetric_factor_update (glue around the torch-free kernel
// in csrc/cuda/symmetric_factor_update.cu). Compiled only when the extension is built with CUDA
// (KFAC_KERNELS_WITH_CUDA is defined).
#include "symmetric_factor_update_glue.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h: no cuBLAS/cuSPARSE headers needed.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace kfac_kernels {
namespace {

at::Tensor symmetric_factor_update_cuda(const std::optional<at::Tensor>& factor,
                                        const at::Tensor& x, double decay, double alpha) {
  const auto shape = glue::check_symmetric_factor_update(factor, x, decay, alpha, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kfac_kernels::symmetric_factor_update", [&] {
    const auto params = glue::make_params<scalar_t>(factor, x, out, decay, alpha);
    const size_t bytes = cuda::symmetric_factor_update_workspace_bytes<scalar_t>(params);
    at::Tensor workspace;  // from the caching allocator, stream-ordered
    if (bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    }
    const cudaError_t err = cuda::symmetric_factor_update<scalar_t>(
        params, bytes > 0 ? workspace.data_ptr() : nullptr, bytes,
        c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess,
                "kfac_kernels::symmetric_factor_update: CUDA kernel launch failed: ",
                cudaGetErrorString(err));
  });
  return out;
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("symmetric_factor_update", &kfac_kernels::symmetric_factor_update_cuda);
}
