// The per-element formulas of the fused SINGD kernels (Lin et al. (2024), Fig. 4), written once for
// the CPU kernels (csrc/cpu/singd_*.cpp) and the CUDA kernels (csrc/cuda/singd_*.cu): both evaluate
// the same operations in the same order. The sums over a layer (traces) and the matrix products of
// the block-diagonal structure stay in the kernels: their order is each kernel's own.
//
// Factor update of a layer with factors K (d_i x d_i, statistic U) and C (d_o x d_o, statistic G):
//     H_K = K^T U K, Q_K = K^T K, H_C = C^T G C, Q_C = C^T C
//     INGD/SINGD: a_K = Tr(H_C) / d_o, b_K = lam Tr(Q_C) / d_o, a_C = Tr(H_K) / d_i,
//                 b_C = lam Tr(Q_K) / d_i;              IKFAC (kfac_like): a = 1, b = lam
//     S = (a H + b Q - I) / 2,  with Riemannian momentum: M = alpha1 M + S, S = M
//     K = K (I - lr_cov S_K),   C = C (I - lr_cov S_C)
// (diagonal factors: every product is element-wise).
//
// Parameter step with preconditioned gradient V (C C^T G K K^T):
//     D = V + weight_decay P   (only when weight_decay != 0)
//     B = first ? D : momentum B + D
//     P = P - lr B
#pragma once

#include "host_device.h"

namespace kfac_kernels {
namespace singd {

template <typename T>
struct FactorCoefficients {
  T a_k, b_k, a_c, b_c;
};

// a and b of both factors of one layer from the traces of H and Q and the dimensions d_i, d_o.
template <typename T>
KFAC_HD inline FactorCoefficients<T> factor_coefficients(T tr_hk, T tr_qk, T d_i, T tr_hc,
                                                         T tr_qc, T d_o, T damping,
                                                         bool kfac_like) {
  if (kfac_like) return {T(1), damping, T(1), damping};
  return {tr_hc / d_o, damping * tr_qc / d_o, tr_hk / d_i, damping * tr_qk / d_i};
}

// Entry (r, c) of S = (a H + b Q - I) / 2 from H_rc = h and Q_rc = q (on_diagonal: r == c), with
// Riemannian momentum when m is not null (*m = alpha1 *m + S_rc, which is then S_rc).
template <typename T>
KFAC_HD inline T factor_direction(T a, T h, T b, T q, bool on_diagonal, T alpha1, T* m) {
  T s = T(0.5) * (a * h + b * q - (on_diagonal ? T(1) : T(0)));
  if (m != nullptr) {
    s = alpha1 * *m + s;
    *m = s;
  }
  return s;
}

// A diagonal factor's entry x (statistic u) after its update x (1 - lr_cov s).
template <typename T>
KFAC_HD inline T diagonal_factor_entry(T x, T u, T a, T b, T alpha1, T lr_cov, T* m) {
  const T xx = x * x;
  const T s = factor_direction(a, xx * u, b, xx, true, alpha1, m);
  return x * (T(1) - lr_cov * s);
}

// The diagonal step's preconditioned gradient c_i^2 k_j^2 g_ij, as c_i (c_i ((g_ij k_j) k_j)).
template <typename A>
KFAC_HD inline A diagonal_preconditioned_gradient(A g, A c_i, A k_j) {
  return c_i * (c_i * ((g * k_j) * k_j));
}

// One parameter entry p with preconditioned gradient v and momentum entry b (updated in place);
// returns the new parameter value.
template <typename A>
KFAC_HD inline A step_entry(A v, A p, A& b, A lr, A momentum, A weight_decay, bool first) {
  const A d = weight_decay != A(0) ? v + weight_decay * p : v;
  const A b_new = first ? d : momentum * b + d;
  b = b_new;
  return p - lr * b_new;
}

}  // namespace singd
}  // namespace kfac_kernels
