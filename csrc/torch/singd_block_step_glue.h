// Glue shared by the CPU and CUDA implementations of kfac_kernels::singd_block_step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "singd_block_step.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

inline void check_singd_block_step(const at::Tensor& weight, const at::Tensor& weight_grad,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& bias_grad,
                                   const at::Tensor& c, at::IntArrayRef c_dims,
                                   const at::Tensor& k, at::IntArrayRef k_dims,
                                   const at::Tensor& weight_buf,
                                   const std::optional<at::Tensor>& bias_buf,
                                   c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::singd_block_step";
  const auto pt = weight.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kDouble || pt == at::kBFloat16, op,
              ": weight must be float32, float64 or bfloat16, got ", pt);
  const auto acc = pt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.device().type() == device_type, op, ": tensors must be on a ",
              c10::DeviceTypeName(device_type, true), " device");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op,
              ": weight must be a contiguous 2-D tensor");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(weight_grad.sizes() == weight.sizes() && weight_grad.scalar_type() == pt &&
                  weight_grad.is_contiguous(),
              op, ": weight_grad must be contiguous with the shape and dtype of weight");
  TORCH_CHECK(weight_buf.sizes() == weight.sizes() && weight_buf.scalar_type() == acc &&
                  weight_buf.is_contiguous(),
              op, ": weight_buf must be a contiguous ", acc, " tensor of the shape of weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    for (const auto* t : {&*bias, &*bias_grad}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == pt &&
                      t->is_contiguous(),
                  op, ": bias and bias_grad must be contiguous vectors of ", rows, " ", pt);
    }
    TORCH_CHECK(bias_buf.has_value() && bias_buf->defined() && bias_buf->dim() == 1 &&
                    bias_buf->size(0) == rows && bias_buf->scalar_type() == acc &&
                    bias_buf->is_contiguous(),
                op, ": bias_buf must be a contiguous vector of ", rows, " ", acc);
  }
  const int64_t width = cols + (has_bias ? 1 : 0);
  for (const auto& [x, dims, total, name] :
       {std::tuple<const at::Tensor&, at::IntArrayRef, int64_t, const char*>{c, c_dims, rows,
                                                                             "c"},
        std::tuple<const at::Tensor&, at::IntArrayRef, int64_t, const char*>{k, k_dims, width,
                                                                             "k"}}) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == x.size(2) && x.scalar_type() == acc &&
                    x.is_contiguous(),
                op, ": ", name, " must be a contiguous (blocks, b, b) ", acc, " tensor");
    TORCH_CHECK(static_cast<int64_t>(dims.size()) == x.size(0), op, ": ", name,
                "_dims needs one size per block");
    int64_t sum = 0;
    for (const auto n : dims) {
      TORCH_CHECK(n >= 1 && n <= x.size(1), op, ": ", name, "_dims must be in [1, ", x.size(1),
                  "]");
      sum += n;
    }
    TORCH_CHECK(sum == total, op, ": ", name, "_dims must sum to ", total);
    TORCH_CHECK(x.device() == weight.device(), op, ": all tensors must be on ", weight.device());
  }
}

template <typename A>
SingdBlockStepParams<A> make_block_step_params(
    at::Tensor& weight, const at::Tensor& weight_grad, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_grad, const at::Tensor& c, const int64_t* c_dims,
    const at::Tensor& k, const int64_t* k_dims, at::Tensor& weight_buf,
    const std::optional<at::Tensor>& bias_buf, double lr, double momentum,
    double weight_decay, bool first) {
  SingdBlockStepParams<A> p;
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  p.param_type = bf16 ? ElementType::kBFloat16 : element_type_of<A>;
  p.weight = weight.data_ptr();
  p.weight_grad = weight_grad.const_data_ptr();
  if (bias.has_value() && bias->defined()) {
    p.bias = bias->data_ptr();
    p.bias_grad = bias_grad->const_data_ptr();
    p.bias_buf = bias_buf->data_ptr<A>();
  }
  p.c = c.const_data_ptr<A>();
  p.c_dims = c_dims;
  p.k = k.const_data_ptr<A>();
  p.k_dims = k_dims;
  p.weight_buf = weight_buf.data_ptr<A>();
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  p.c_blocks = c.size(0);
  p.k_blocks = k.size(0);
  p.bc = c.size(1);
  p.bk = k.size(1);
  p.lr = static_cast<A>(lr);
  p.momentum = static_cast<A>(momentum);
  p.weight_decay = static_cast<A>(weight_decay);
  p.first = first;
  return p;
}

}  // namespace glue
}  // namespace kfac_kernels
