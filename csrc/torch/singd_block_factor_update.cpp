// CPU implementation of kfac_kernels::singd_block_factor_update (glue around the torch-free
// kernel in csrc/cpu/singd_block_factor_update.cpp). In place on k, c, m_k, m_c.
#include "singd_block_factor_update_glue.h"

#include <torch/library.h>

namespace kfac_kernels {
namespace {

void singd_block_factor_update_cpu(at::Tensor k, at::Tensor c,
                                   const std::optional<at::Tensor>& m_k,
                                   const std::optional<at::Tensor>& m_c, const at::Tensor& u,
                                   const at::Tensor& g, at::IntArrayRef k_dims,
                                   at::IntArrayRef c_dims, at::IntArrayRef k_layer_offsets,
                                   at::IntArrayRef c_layer_offsets, double damping,
                                   double alpha1, double lr_cov, bool kfac_like) {
  glue::check_singd_block_factor_update(k, c, m_k, m_c, u, g, k_dims, c_dims, k_layer_offsets,
                                        c_layer_offsets, c10::kCPU);
  const int64_t layers = static_cast<int64_t>(k_layer_offsets.size()) - 1;
  if (k.scalar_type() == at::kDouble) {
    cpu::singd_block_factor_update<double>(glue::make_block_factor_params<double>(
        k, c, m_k, m_c, u, g, k_dims.data(), c_dims.data(), k_layer_offsets.data(),
        c_layer_offsets.data(), layers, damping, alpha1, lr_cov, kfac_like));
  } else {
    cpu::singd_block_factor_update<float>(glue::make_block_factor_params<float>(
        k, c, m_k, m_c, u, g, k_dims.data(), c_dims.data(), k_layer_offsets.data(),
        c_layer_offsets.data(), layers, damping, alpha1, lr_cov, kfac_like));
  }
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("singd_block_factor_update", &kfac_kernels::singd_block_factor_update_cpu);
}
