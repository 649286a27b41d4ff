// CPU implementation of kfac_kernels::singd_block_step (glue around the torch-free kernel in
// csrc/cpu/singd_block_step.cpp). Updates the parameters and buffers in place.
#include "singd_block_step_glue.h"

#include <torch/library.h>

namespace kfac_kernels {
namespace {

void singd_block_step_cpu(at::Tensor weight, const at::Tensor& weight_grad,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& bias_grad, const at::Tensor& c,
                          at::IntArrayRef c_dims, const at::Tensor& k, at::IntArrayRef k_dims,
                          at::Tensor weight_buf, const std::optional<at::Tensor>& bias_buf,
                          double lr, double momentum, double weight_decay, bool first) {
  glue::check_singd_block_step(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims,
                               weight_buf, bias_buf, c10::kCPU);
  if (weight.scalar_type() == at::kDouble) {
    cpu::singd_block_step<double>(glue::make_block_step_params<double>(
        weight, weight_grad, bias, bias_grad, c, c_dims.data(), k, k_dims.data(), weight_buf,
        bias_buf, lr, momentum, weight_decay, first));
  } else {
    cpu::singd_block_step<float>(glue::make_block_step_params<float>(
        weight, weight_grad, bias, bias_grad, c, c_dims.data(), k, k_dims.data(), weight_buf,
        bias_buf, lr, momentum, weight_decay, first));
  }
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("singd_block_step", &kfac_kernels::singd_block_step_cpu);
}
