// CPU implementation of kfac_kernels::singd_diagonal_step (glue around the torch-free kernel in
// csrc/cpu/singd_diagonal_step.cpp). Updates param and buf in place.
#include "singd_diagonal_step_glue.h"

#include <torch/library.h>

namespace kfac_kernels {
namespace {

void singd_diagonal_step_cpu(at::Tensor param, const at::Tensor& grad, const at::Tensor& c,
                             const at::Tensor& k, at::Tensor buf, double lr, double momentum,
                             double weight_decay, bool first) {
  glue::check_singd_diagonal_step(param, grad, c, k, buf, lr, momentum, weight_decay,
                                  c10::kCPU);
  if (param.scalar_type() == at::kDouble) {
    cpu::singd_diagonal_step<double>(
        glue::make_step_params<double>(param, grad, c, k, buf, lr, momentum, weight_decay, first));
  } else {
    cpu::singd_diagonal_step<float>(
        glue::make_step_params<float>(param, grad, c, k, buf, lr, momentum, weight_decay, first));
  }
}

void singd_diagonal_step_foreach_cpu(at::TensorList params, at::TensorList grads,
                                     at::TensorList cs, at::TensorList ks, at::TensorList bufs,
                                     double lr, double momentum, double weight_decay,
                                     const c10::List<bool>& first) {
  const auto lists = glue::checked_step_lists(params, grads, cs, ks, bufs, lr, momentum,
                                              weight_decay, first, c10::kCPU);
  cpu::singd_diagonal_steps<float>(lists.f.data(), static_cast<int64_t>(lists.f.size()));
  cpu::singd_diagonal_steps<double>(lists.d.data(), static_cast<int64_t>(lists.d.size()));
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("singd_diagonal_step", &kfac_kernels::singd_diagonal_step_cpu);
  m.impl("singd_diagonal_step_foreach", &kfac_kernels::singd_diagonal_step_foreach_cpu);
}
