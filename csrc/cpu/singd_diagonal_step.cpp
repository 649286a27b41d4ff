// CPU kernel of the fused SINGD parameter step for diagonal factors (torch-free); see
// csrc/include/singd_diagonal_step.h for the definition.
#include "singd_diagonal_step.h"

#include <cstring>

#include "bf16_bits.h"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cpu {
namespace {

template <typename A, typename LoadP, typename LoadG, typename Store>
void run(const SingdDiagonalStepParams<A>& p, LoadP load_param, LoadG load_grad, Store store) {
  const A lr = p.lr, mom = p.momentum, wd = p.weight_decay;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (p.rows * p.cols > 32768)
#endif
  for (int64_t i = 0; i < p.rows; ++i) {
    const A ci = p.c[i];
    A* b = p.buf + i * p.buf_stride_row;
    for (int64_t j = 0; j < p.cols; ++j) {
      const A v = singd::diagonal_preconditioned_gradient(load_grad(i, j), ci, p.k[j]);
      store(i, j, singd::step_entry(v, load_param(i, j), b[j], lr, mom, wd, p.first));
    }
  }
}

}  // namespace

template <typename A>
void singd_diagonal_step(const SingdDiagonalStepParams<A>& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  if (p.param_type == ElementType::kBFloat16) {
    auto* param = static_cast<uint16_t*>(p.param);
    const auto* grad = static_cast<const uint16_t*>(p.grad);
    run(
        p,
        [&](int64_t i, int64_t j) { return A(bf16::to_float(param[i * p.param_stride_row + j])); },
        [&](int64_t i, int64_t j) { return A(bf16::to_float(grad[i * p.grad_stride_row + j])); },
        [&](int64_t i, int64_t j, A v) {
          param[i * p.param_stride_row + j] = bf16::from_float(static_cast<float>(v));
        });
    return;
  }
  auto* param = static_cast<A*>(p.param);
  const auto* grad = static_cast<const A*>(p.grad);
  run(
      p, [&](int64_t i, int64_t j) { return param[i * p.param_stride_row + j]; },
      [&](int64_t i, int64_t j) { return grad[i * p.grad_stride_row + j]; },
      [&](int64_t i, int64_t j, A v) { param[i * p.param_stride_row + j] = v; });
}

template <typename A>
void singd_diagonal_steps(const SingdDiagonalStepParams<A>* list, int64_t count) {
  for (int64_t t = 0; t < count; ++t) singd_diagonal_step<A>(list[t]);
}

template void singd_diagonal_step<float>(const SingdDiagonalStepParams<float>&);
template void singd_diagonal_step<double>(const SingdDiagonalStepParams<double>&);
template void singd_diagonal_steps<float>(const SingdDiagonalStepParams<float>*, int64_t);
template void singd_diagonal_steps<double>(const SingdDiagonalStepParams<double>*, int64_t);

}  // namespace cpu
}  // namespace kfac_kernels
