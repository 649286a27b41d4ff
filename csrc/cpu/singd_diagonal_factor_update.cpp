// CPU kernel of the many-layer diagonal SINGD factor update (torch-free); see
// csrc/include/singd_diagonal_factor_update.h. Layers run in parallel (OpenMP); within a layer
// the sums are sequential, so the result does not depend on the thread count.
#include "singd_diagonal_factor_update.h"

namespace kfac_kernels {
namespace cpu {

template <typename T>
void singd_diagonal_factor_update(const SingdDiagonalFactorUpdateParams<T>& p) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (p.layers > 1)
#endif
  for (int64_t l = 0; l < p.layers; ++l) {
    const int64_t k0 = p.k_off[l], k1 = p.k_off[l + 1];
    const int64_t c0 = p.c_off[l], c1 = p.c_off[l + 1];
    const T d_i = static_cast<T>(k1 - k0), d_o = static_cast<T>(c1 - c0);
    T tr_hk = 0, tr_kk = 0, tr_hc = 0, tr_cc = 0;
    for (int64_t j = k0; j < k1; ++j) {
      const T kk = p.k[j] * p.k[j];
      tr_kk += kk;
      tr_hk += kk * p.u[j];
    }
    for (int64_t i = c0; i < c1; ++i) {
      const T cc = p.c[i] * p.c[i];
      tr_cc += cc;
      tr_hc += cc * p.g[i];
    }
    T a_k = 1, b_k = p.damping, a_c = 1, b_c = p.damping;
    if (!p.kfac_like) {
      a_k = tr_hc / d_o;
      b_k = p.damping * tr_cc / d_o;
      a_c = tr_hk / d_i;
      b_c = p.damping * tr_kk / d_i;
    }
    for (int64_t j = k0; j < k1; ++j) {
      const T kk = p.k[j] * p.k[j];
      T s = T(0.5) * (a_k * (kk * p.u[j]) + b_k * kk - T(1));
      if (p.m_k != nullptr) {
        s = p.alpha1 * p.m_k[j] + s;
        p.m_k[j] = s;
      }
      p.k[j] = p.k[j] * (T(1) - p.lr_cov * s);
    }
    for (int64_t i = c0; i < c1; ++i) {
      const T cc = p.c[i] * p.c[i];
      T s = T(0.5) * (a_c * (cc * p.g[i]) + b_c * cc - T(1));
      if (p.m_c != nullptr) {
        s = p.alpha1 * p.m_c[i] + s;
        p.m_c[i] = s;
      }
      p.c[i] = p.c[i] * (T(1) - p.lr_cov * s);
    }
  }
}

template void singd_diagonal_factor_update<float>(const SingdDiagonalFactorUpdateParams<float>&);
template void singd_diagonal_factor_update<double>(
    const SingdDiagonalFactorUpdateParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
