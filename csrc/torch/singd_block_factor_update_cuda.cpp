// CUDA implementation of kfac_kernels::singd_block_factor_update (glue around the torch-free
// kernel in csrc/cuda/singd_block_factor_update.cu). Compiled only with CUDA.
#include "singd_block_factor_update_glue.h"

#include "device_metadata.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

namespace kfac_kernels {
namespace {

void singd_block_factor_update_cuda(at::Tensor k, at::Tensor c,
                                    const std::optional<at::Tensor>& m_k,
                                    const std::optional<at::Tensor>& m_c, const at::Tensor& u,
                                    const at::Tensor& g, at::IntArrayRef k_dims,
                                    at::IntArrayRef c_dims, at::IntArrayRef k_layer_offsets,
                                    at::IntArrayRef c_layer_offsets, double damping,
                                    double alpha1, double lr_cov, bool kfac_like) {
  glue::check_singd_block_factor_update(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets,
                                        c_layer_offsets, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t layers = static_cast<int64_t>(k_layer_offsets.size()) - 1;
  // sizes and offsets on the device (copied at the first call with this layout)
  std::vector<int64_t> host(k_dims.begin(), k_dims.end());
  host.insert(host.end(), c_dims.begin(), c_dims.end());
  host.insert(host.end(), k_layer_offsets.begin(), k_layer_offsets.end());
  host.insert(host.end(), c_layer_offsets.begin(), c_layer_offsets.end());
  const at::Tensor meta = glue::device_metadata(host, k.device());  // cached per layout
  const int64_t* d = meta.const_data_ptr<int64_t>();
  const int64_t nk = k.size(0), nc = c.size(0);
  const int64_t* d_kdims = d;
  const int64_t* d_cdims = d + nk;
  const int64_t* d_klayer = d + nk + nc;
  const int64_t* d_clayer = d + nk + nc + layers + 1;
  at::Tensor ws = at::empty({2 * (k.numel() + c.numel())}, k.options());
  const auto stream = c10::cuda::getCurrentCUDAStream(k.device().index()).stream();
  cudaError_t err;
  if (k.scalar_type() == at::kDouble) {
    err = cuda::singd_block_factor_update<double>(
        glue::make_block_factor_params<double>(k, c, m_k, m_c, u, g, d_kdims, d_cdims, d_klayer,
                                               d_clayer, layers, damping, alpha1, lr_cov,
                                               kfac_like),
        ws.data_ptr<double>(), stream);
  } else {
    err = cuda::singd_block_factor_update<float>(
        glue::make_block_factor_params<float>(k, c, m_k, m_c, u, g, d_kdims, d_cdims, d_klayer,
                                              d_clayer, layers, damping, alpha1, lr_cov,
                                              kfac_like),
        ws.data_ptr<float>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kfac_kernels::singd_block_factor_update: CUDA kernel launch "
              "failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("singd_block_factor_update", &kfac_kernels::singd_block_factor_update_cuda);
}
