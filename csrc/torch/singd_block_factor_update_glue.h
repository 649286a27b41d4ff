// Glue shared by the CPU and CUDA implementations of kfac_kernels::singd_block_factor_update.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "singd_block_factor_update.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

inline void check_blocks(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  constexpr const char* op = "kfac_kernels::singd_block_factor_update";
  TORCH_CHECK(t.dim() == 3 && t.sizes() == ref.sizes() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous tensor of shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must be ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": all tensors must be on ", ref.device());
}

inline void check_layout(const at::Tensor& x, at::IntArrayRef dims, at::IntArrayRef layer,
                         const char* name) {
  constexpr const char* op = "kfac_kernels::singd_block_factor_update";
  TORCH_CHECK(x.dim() == 3 && x.size(1) == x.size(2), op, ": ", name,
              " must be (blocks, b, b), got ", x.sizes());
  TORCH_CHECK(static_cast<int64_t>(dims.size()) == x.size(0), op, ": ", name,
              " needs one size per block");
  for (const auto n : dims) {
    TORCH_CHECK(n >= 1 && n <= x.size(1), op, ": block sizes of ", name, " must be in [1, ",
                x.size(1), "]");
  }
  TORCH_CHECK(layer.size() >= 1 && layer.front() == 0 && layer.back() == x.size(0), op,
              ": layer offsets of ", name, " must start at 0 and end at ", x.size(0));
  for (size_t i = 1; i < layer.size(); ++i) {
    TORCH_CHECK(layer[i] > layer[i - 1], op, ": layer offsets of ", name,
                " must be strictly increasing");
  }
}

inline void check_singd_block_factor_update(
    const at::Tensor& k, const at::Tensor& c, const std::optional<at::Tensor>& m_k,
    const std::optional<at::Tensor>& m_c, const at::Tensor& u, const at::Tensor& g,
    at::IntArrayRef k_dims, at::IntArrayRef c_dims, at::IntArrayRef k_layer,
    at::IntArrayRef c_layer, c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::singd_block_factor_update";
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": k must be float32 or float64, got ",
              dt);
  TORCH_CHECK(k.device().type() == device_type, op, ": tensors must be on a ",
              c10::DeviceTypeName(device_type, true), " device");
  TORCH_CHECK(k_layer.size() == c_layer.size(), op,
              ": k_layer_offsets and c_layer_offsets must have the same length (layers + 1)");
  check_layout(k, k_dims, k_layer, "k");
  check_layout(c, c_dims, c_layer, "c");
  TORCH_CHECK(c.scalar_type() == dt, op, ": c must be ", dt, " like k, got ", c.scalar_type());
  check_blocks(u, "u", k);
  check_blocks(g, "g", c);
  const bool mk = m_k.has_value() && m_k->defined(), mc = m_c.has_value() && m_c->defined();
  TORCH_CHECK(mk == mc, op, ": m_k and m_c must both be given or both be None");
  if (mk) {
    check_blocks(*m_k, "m_k", k);
    check_blocks(*m_c, "m_c", c);
  }
}

template <typename T>
SingdBlockFactorUpdateParams<T> make_block_factor_params(
    at::Tensor& k, at::Tensor& c, const std::optional<at::Tensor>& m_k,
    const std::optional<at::Tensor>& m_c, const at::Tensor& u, const at::Tensor& g,
    const int64_t* k_dims, const int64_t* c_dims, const int64_t* k_layer,
    const int64_t* c_layer, int64_t layers, double damping, double alpha1, double lr_cov,
    bool kfac_like) {
  SingdBlockFactorUpdateParams<T> p;
  p.k = k.data_ptr<T>();
  p.c = c.data_ptr<T>();
  if (m_k.has_value() && m_k->defined()) {
    p.m_k = m_k->data_ptr<T>();
    p.m_c = m_c->data_ptr<T>();
  }
  p.u = u.const_data_ptr<T>();
  p.g = g.const_data_ptr<T>();
  p.k_dims = k_dims;
  p.c_dims = c_dims;
  p.k_layer = k_layer;
  p.c_layer = c_layer;
  p.k_blocks = k.size(0);
  p.c_blocks = c.size(0);
  p.bk = k.size(1);
  p.bc = c.size(1);
  p.layers = layers;
  p.damping = static_cast<T>(damping);
  p.alpha1 = static_cast<T>(alpha1);
  p.lr_cov = static_cast<T>(lr_cov);
  p.kfac_like = kfac_like;
  return p;
}

}  // namespace glue
}  // namespace kfac_kernels
