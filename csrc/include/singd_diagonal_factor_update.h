// SINGD / IKFAC factor update of diagonal K and C for many layers in one call, torch-free
// declarations. Layer l owns k[k_off[l] : k_off[l+1]] (d_i entries) and c[c_off[l] : c_off[l+1]]
// (d_o entries) with the diagonals u of its U and g of its G, and (Riemannian momentum) m_k, m_c:
//
//     h_k = k^2 u,  h_c = c^2 g                              (Pi(K^T U K), Pi(C^T G C))
//     INGD/SINGD: a_k = sum(h_c)/d_o, b_k = lam sum(c^2)/d_o, a_c = sum(h_k)/d_i,
//                 b_c = lam sum(k^2)/d_i;           IKFAC (kfac_like): a = 1, b = lam
//     s_k = (a_k h_k + b_k k^2 - 1) / 2,   s_c = (a_c h_c + b_c c^2 - 1) / 2
//     with momentum: m_k = alpha1 m_k + s_k, s_k = m_k (same for C)
//     k = k (1 - lr_cov s_k),   c = c (1 - lr_cov s_c)
//
// All sums of one layer are taken from the values before its update. Vectors are contiguous
// and of type T (float or double); k, c, m_k, m_c are updated in place (m_k, m_c may be null
// when there is no momentum).
#pragma once

#include <cstdint>

namespace kfac_kernels {

template <typename T>
struct SingdDiagonalFactorUpdateParams {
  T* k = nullptr;
  T* c = nullptr;
  T* m_k = nullptr;            // null: no Riemannian momentum
  T* m_c = nullptr;
  const T* u = nullptr;        // diagonal of U, same layout as k
  const T* g = nullptr;        // diagonal of G, same layout as c
  const int64_t* k_off = nullptr;  // layers + 1 offsets (host memory for the CPU kernel,
  const int64_t* c_off = nullptr;  // device memory for the CUDA kernel)
  int64_t layers = 0;
  T damping = T(0);
  T alpha1 = T(0);
  T lr_cov = T(0);
  bool kfac_like = false;
};

namespace cpu {

template <typename T>
void singd_diagonal_factor_update(const SingdDiagonalFactorUpdateParams<T>& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// One thread block per layer; enqueued on `stream`. Returns the launch error or cudaSuccess.
template <typename T>
cudaError_t singd_diagonal_factor_update(const SingdDiagonalFactorUpdateParams<T>& p,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
