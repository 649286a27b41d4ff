// CPU implementation of kfac_kernels::symmetric_factor_update (glue around the torch-free kernel
// in csrc/cpu/symmetric_factor_update.cpp).
#include "symmetric_factor_update_glue.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace kfac_kernels {
namespace {

at::Tensor symmetric_factor_update_cpu(const std::optional<at::Tensor>& factor,
                                       const at::Tensor& x, double decay, double alpha) {
  const auto shape = glue::check_symmetric_factor_update(factor, x, decay, alpha, c10::kCPU);
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kfac_kernels::symmetric_factor_update", [&] {
    cpu::symmetric_factor_update<scalar_t>(
        glue::make_params<scalar_t>(factor, x, out, decay, alpha));
  });
  return out;
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("symmetric_factor_update", &kfac_kernels::symmetric_factor_update_cpu);
}
