// Glue shared by the CPU and CUDA implementations of kfac_kernels::singd_diagonal_factor_update.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "singd_diagonal_factor_update.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

inline void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                         const at::Tensor& ref) {
  constexpr const char* op = "kfac_kernels::singd_diagonal_factor_update";
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), op, ": ", name,
              " must be a contiguous vector of ", n, " entries, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": all tensors must be on ", ref.device());
}

inline void check_offsets(at::IntArrayRef off, int64_t n, const char* name) {
  constexpr const char* op = "kfac_kernels::singd_diagonal_factor_update";
  TORCH_CHECK(off.size() >= 1 && off.front() == 0 && off.back() == n, op, ": ", name,
              " must start at 0 and end at ", n);
  for (size_t i = 1; i < off.size(); ++i) {
    TORCH_CHECK(off[i] > off[i - 1], op, ": ", name, " must be strictly increasing");
  }
}

inline void check_singd_diagonal_factor_update(
    const at::Tensor& k, const at::Tensor& c, const std::optional<at::Tensor>& m_k,
    const std::optional<at::Tensor>& m_c, const at::Tensor& u, const at::Tensor& g,
    at::IntArrayRef k_off, at::IntArrayRef c_off, c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::singd_diagonal_factor_update";
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": k must be float32 or float64, got ",
              dt);
  TORCH_CHECK(k.device().type() == device_type, op, ": tensors must be on a ",
              c10::DeviceTypeName(device_type, true), " device");
  TORCH_CHECK(k_off.size() == c_off.size(), op,
              ": k_offsets and c_offsets must have the same length (layers + 1)");
  check_offsets(k_off, k.numel(), "k_offsets");
  check_offsets(c_off, c.numel(), "c_offsets");
  check_vector(k, "k", k.numel(), dt, k);
  check_vector(c, "c", c.numel(), dt, k);
  check_vector(u, "u", k.numel(), dt, k);
  check_vector(g, "g", c.numel(), dt, k);
  const bool mk = m_k.has_value() && m_k->defined(), mc = m_c.has_value() && m_c->defined();
  TORCH_CHECK(mk == mc, op, ": m_k and m_c must both be given or both be None");
  if (mk) {
    check_vector(*m_k, "m_k", k.numel(), dt, k);
    check_vector(*m_c, "m_c", c.numel(), dt, k);
  }
}

template <typename T>
SingdDiagonalFactorUpdateParams<T> make_factor_params(
    at::Tensor& k, at::Tensor& c, const std::optional<at::Tensor>& m_k,
    const std::optional<at::Tensor>& m_c, const at::Tensor& u, const at::Tensor& g,
    const int64_t* k_off, const int64_t* c_off, int64_t layers, double damping, double alpha1,
    double lr_cov, bool kfac_like) {
  SingdDiagonalFactorUpdateParams<T> p;
  p.k = k.data_ptr<T>();
  p.c = c.data_ptr<T>();
  if (m_k.has_value() && m_k->defined()) {
    p.m_k = m_k->data_ptr<T>();
    p.m_c = m_c->data_ptr<T>();
  }
  p.u = u.const_data_ptr<T>();
  p.g = g.const_data_ptr<T>();
  p.k_off = k_off;
  p.c_off = c_off;
  p.layers = layers;
  p.damping = static_cast<T>(damping);
  p.alpha1 = static_cast<T>(alpha1);
  p.lr_cov = static_cast<T>(lr_cov);
  p.kfac_like = kfac_like;
  return p;
}

}  // namespace glue
}  // namespace kfac_kernels
