// Glue shared by the CPU and CUDA implementations of kfac_kernels::symmetric_factor_update:
// argument checks and the tensor -> kernel-parameter conversion.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "symmetric_factor_update.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

// Checks the arguments of symmetric_factor_update for the kernel running on `device_type` and
// returns the output shape (..., d, d).
inline std::vector<int64_t> check_symmetric_factor_update(const std::optional<at::Tensor>& factor,
                                                          const at::Tensor& x, double decay,
                                                          double alpha,
                                                          c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::symmetric_factor_update";
  TORCH_CHECK(x.defined(), op, ": x must be a defined tensor");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
              ": x must be 2-D (m, d) or 3-D (batch, m, d), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(std::isfinite(decay), op, ": decay must be finite, got ", decay);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  const int64_t d = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(d);
  shape.push_back(d);
  if (factor.has_value() && factor->defined()) {
    const at::Tensor& f = *factor;
    TORCH_CHECK(f.sizes() == at::IntArrayRef(shape), op, ": factor must have shape ",
                at::IntArrayRef(shape), " to match x of shape ", x.sizes(), ", got ", f.sizes());
    TORCH_CHECK(f.scalar_type() == x.scalar_type(), op,
                ": factor and x must have the same dtype, got factor ", f.scalar_type(),
                " and x ", x.scalar_type());
    TORCH_CHECK(f.device() == x.device(), op,
                ": factor and x must be on the same device, got factor on ", f.device(),
                " and x on ", x.device());
  }
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensor for this kernel, got x on ", x.device());
  return shape;
}

// Kernel parameters for a contiguous `out` of shape (..., d, d) created for x.
template <typename T>
SymmetricFactorUpdateParams<T> make_params(const std::optional<at::Tensor>& factor,
                                           const at::Tensor& x, const at::Tensor& out,
                                           double decay, double alpha) {
  SymmetricFactorUpdateParams<T> p;
  const bool batched = x.dim() == 3;
  p.x = x.const_data_ptr<T>();
  p.batch = batched ? x.size(0) : 1;
  p.m = x.size(-2);
  p.d = x.size(-1);
  p.x_stride_batch = batched ? x.stride(0) : 0;
  p.x_stride_row = x.stride(-2);
  p.x_stride_col = x.stride(-1);
  if (factor.has_value() && factor->defined()) {
    const at::Tensor& f = *factor;
    p.factor = f.const_data_ptr<T>();
    p.factor_stride_batch = batched ? f.stride(0) : 0;
    p.factor_stride_row = f.stride(-2);
    p.factor_stride_col = f.stride(-1);
  }
  p.out = out.mutable_data_ptr<T>();
  p.decay = static_cast<T>(decay);
  p.alpha = static_cast<T>(alpha);
  return p;
}

}  // namespace glue
}  // namespace kfac_kernels
