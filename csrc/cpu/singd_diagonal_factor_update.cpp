// CPU kernel of the many-layer diagonal SINGD factor update (torch-free); see
// csrc/include/singd_diagonal_factor_update.h. Layers run in parallel (OpenMP); within a layer
// the sums are sequential, so the result does not depend on the thread count.
#include "singd_diagonal_factor_update.h"

#include "singd_formulas.h"

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
    const auto co = singd::factor_coefficients(tr_hk, tr_kk, d_i, tr_hc, tr_cc, d_o, p.damping,
                                               p.kfac_like);
    for (int64_t j = k0; j < k1; ++j) {
      p.k[j] = singd::diagonal_factor_entry(p.k[j], p.u[j], co.a_k, co.b_k, p.alpha1, p.lr_cov,
                                            p.m_k ? p.m_k + j : nullptr);
    }
    for (int64_t i = c0; i < c1; ++i) {
      p.c[i] = singd::diagonal_factor_entry(p.c[i], p.g[i], co.a_c, co.b_c, p.alpha1, p.lr_cov,
                                            p.m_c ? p.m_c + i : nullptr);
    }
  }
}

template void singd_diagonal_factor_update<float>(const SingdDiagonalFactorUpdateParams<float>&);
template void singd_diagonal_factor_update<double>(
    const SingdDiagonalFactorUpdateParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
