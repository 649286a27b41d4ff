// Glue shared by the CPU and CUDA implementations of kfac_kernels::singd_diagonal_step: argument
// checks and the tensor -> kernel-parameter conversion.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "singd_diagonal_step.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

// param, grad, buf: (rows, cols) with contiguous rows; c: (rows,), k: (cols,) contiguous.
inline void check_singd_diagonal_step(const at::Tensor& param, const at::Tensor& grad,
                                      const at::Tensor& c, const at::Tensor& k,
                                      const at::Tensor& buf, double lr, double momentum,
                                      double weight_decay, c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::singd_diagonal_step";
  TORCH_CHECK(param.dim() == 2, op, ": param must be 2-D (rows, cols), got shape ",
              param.sizes());
  const auto pt = param.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kDouble || pt == at::kBFloat16, op,
              ": param must be float32, float64 or bfloat16, got ", pt);
  const auto acc = pt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.sizes() == param.sizes() && grad.scalar_type() == pt, op,
              ": grad must have the shape and dtype of param ", param.sizes(), " ", pt,
              ", got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(buf.sizes() == param.sizes() && buf.scalar_type() == acc, op,
              ": buf must have shape ", param.sizes(), " and dtype ", acc, ", got ", buf.sizes(),
              " ", buf.scalar_type());
  TORCH_CHECK(c.dim() == 1 && c.size(0) == param.size(0) && c.scalar_type() == acc &&
                  c.is_contiguous(),
              op, ": c must be a contiguous ", acc, " vector of ", param.size(0),
              " entries, got ", c.sizes(), " ", c.scalar_type());
  TORCH_CHECK(k.dim() == 1 && k.size(0) == param.size(1) && k.scalar_type() == acc &&
                  k.is_contiguous(),
              op, ": k must be a contiguous ", acc, " vector of ", param.size(1),
              " entries, got ", k.sizes(), " ", k.scalar_type());
  for (const at::Tensor* t : {&param, &grad, &buf}) {
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, op,
                ": param, grad and buf must have contiguous rows (stride 1 along dim 1)");
  }
  for (const at::Tensor* t : {&param, &buf}) {  // written in place: no element twice
    TORCH_CHECK(t->numel() == 0 || t->size(0) == 1 || t->stride(0) >= t->size(1), op,
                ": param and buf must not overlap themselves (rows at least a row apart)");
  }
  for (const at::Tensor* t : {&param, &grad, &c, &k, &buf}) {
    TORCH_CHECK(t->device().type() == device_type && t->device() == param.device(), op,
                ": all tensors must be on the same ",
                c10::DeviceTypeName(device_type, /*lower_case=*/true), " device");
  }
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum) && std::isfinite(weight_decay), op,
              ": lr, momentum and weight_decay must be finite");
}

template <typename A>
SingdDiagonalStepParams<A> make_step_params(at::Tensor& param, const at::Tensor& grad,
                                            const at::Tensor& c, const at::Tensor& k,
                                            at::Tensor& buf, double lr, double momentum,
                                            double weight_decay, bool first) {
  SingdDiagonalStepParams<A> p;
  p.param = param.data_ptr();
  p.grad = grad.const_data_ptr();
  p.param_type = param.scalar_type() == at::kBFloat16 ? ElementType::kBFloat16
                                                      : element_type_of<A>;
  p.c = c.const_data_ptr<A>();
  p.k = k.const_data_ptr<A>();
  p.buf = buf.data_ptr<A>();
  p.rows = param.size(0);
  p.cols = param.size(1);
  p.param_stride_row = param.stride(0);
  p.grad_stride_row = grad.stride(0);
  p.buf_stride_row = buf.stride(0);
  p.lr = static_cast<A>(lr);
  p.momentum = static_cast<A>(momentum);
  p.weight_decay = static_cast<A>(weight_decay);
  p.first = first;
  return p;
}

// singd_diagonal_step_foreach: the lists have one entry per parameter, each entry as for
// check_singd_diagonal_step (on one device); `first` has one flag per entry.
inline void check_singd_diagonal_step_foreach(at::TensorList params, at::TensorList grads,
                                              at::TensorList cs, at::TensorList ks,
                                              at::TensorList bufs, double lr, double momentum,
                                              double weight_decay, const c10::List<bool>& first,
                                              c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::singd_diagonal_step_foreach";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && cs.size() == n && ks.size() == n && bufs.size() == n &&
                  first.size() == n,
              op, ": params, grads, cs, ks, bufs and first must have the same length, got ",
              n, ", ", grads.size(), ", ", cs.size(), ", ", ks.size(), ", ", bufs.size(), " and ",
              first.size());
  for (size_t t = 0; t < n; ++t) {
    check_singd_diagonal_step(params[t], grads[t], cs[t], ks[t], bufs[t], lr, momentum,
                              weight_decay, device_type);
    TORCH_CHECK(params[t].device() == params[0].device(), op,
                ": all tensors must be on one device, got ", params[0].device(), " and ",
                params[t].device());
  }
}

// The kernel parameters of the entries whose accumulation type is A (float: float32 and
// bfloat16 parameters; double: float64 ones).
template <typename A>
std::vector<SingdDiagonalStepParams<A>> make_step_list(at::TensorList params,
                                                       at::TensorList grads, at::TensorList cs,
                                                       at::TensorList ks, at::TensorList bufs,
                                                       double lr, double momentum,
                                                       double weight_decay,
                                                       const c10::List<bool>& first) {
  std::vector<SingdDiagonalStepParams<A>> out;
  const bool want_double = std::is_same_v<A, double>;
  for (size_t t = 0; t < params.size(); ++t) {
    if ((params[t].scalar_type() == at::kDouble) != want_double) continue;
    at::Tensor param = params[t], buf = bufs[t];  // handles: the data is written in place
    out.push_back(make_step_params<A>(param, grads[t], cs[t], ks[t], buf, lr, momentum,
                                      weight_decay, first.get(t)));
  }
  return out;
}

// The checked entries split by accumulation type, for the float and double kernels.
struct StepLists {
  std::vector<SingdDiagonalStepParams<float>> f;
  std::vector<SingdDiagonalStepParams<double>> d;
};

inline StepLists checked_step_lists(at::TensorList params, at::TensorList grads,
                                    at::TensorList cs, at::TensorList ks, at::TensorList bufs,
                                    double lr, double momentum, double weight_decay,
                                    const c10::List<bool>& first, c10::DeviceType device_type) {
  check_singd_diagonal_step_foreach(params, grads, cs, ks, bufs, lr, momentum, weight_decay,
                                    first, device_type);
  return {make_step_list<float>(params, grads, cs, ks, bufs, lr, momentum, weight_decay, first),
          make_step_list<double>(params, grads, cs, ks, bufs, lr, momentum, weight_decay, first)};
}

}  // namespace glue
}  // namespace kfac_kernels
