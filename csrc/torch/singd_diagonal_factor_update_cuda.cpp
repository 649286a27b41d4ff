// CUDA implementation of kfac_kernels::singd_diagonal_factor_update (glue around the torch-free
// kernel in csrc/cuda/singd_diagonal_factor_update.cu). Compiled only with CUDA.
#include "singd_diagonal_factor_update_glue.h"

#include "device_metadata.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

namespace kfac_kernels {
namespace {

void singd_diagonal_factor_update_cuda(at::Tensor k, at::Tensor c,
                                       const std::optional<at::Tensor>& m_k,
                                       const std::optional<at::Tensor>& m_c, const at::Tensor& u,
                                       const at::Tensor& g, at::IntArrayRef k_offsets,
                                       at::IntArrayRef c_offsets, double damping, double alpha1,
                                       double lr_cov, bool kfac_like) {
  glue::check_singd_diagonal_factor_update(k, c, m_k, m_c, u, g, k_offsets, c_offsets,
                                           c10::kCUDA);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t layers = static_cast<int64_t>(k_offsets.size()) - 1;
  // offsets on the device (copied at the first call with this layout)
  std::vector<int64_t> host(k_offsets.begin(), k_offsets.end());
  host.insert(host.end(), c_offsets.begin(), c_offsets.end());
  const at::Tensor off = glue::device_metadata(host, k.device());  // cached per layout
  const int64_t* d_off = off.const_data_ptr<int64_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream(k.device().index()).stream();
  cudaError_t err;
  if (k.scalar_type() == at::kDouble) {
    err = cuda::singd_diagonal_factor_update<double>(glue::make_factor_params<double>(
        k, c, m_k, m_c, u, g, d_off, d_off + layers + 1, layers, damping, alpha1, lr_cov,
        kfac_like), stream);
  } else {
    err = cuda::singd_diagonal_factor_update<float>(glue::make_factor_params<float>(
        k, c, m_k, m_c, u, g, d_off, d_off + layers + 1, layers, damping, alpha1, lr_cov,
        kfac_like), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kfac_kernels::singd_diagonal_factor_update: CUDA kernel "
              "launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("singd_diagonal_factor_update", &kfac_kernels::singd_diagonal_factor_update_cuda);
}
