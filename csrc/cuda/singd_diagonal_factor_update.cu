// CUDA kernel of the many-layer diagonal SINGD factor update (torch-free); see
// csrc/include/singd_diagonal_factor_update.h. One block per layer: strided partial sums per
// thread, a fixed-order shared-memory tree reduction (deterministic), then the element update.
#include "singd_diagonal_factor_update.h"

#include "block_sum.cuh"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void factor_update_kernel(SingdDiagonalFactorUpdateParams<T> p) {
  __shared__ T shared[kThreads];
  const int64_t l = blockIdx.x;
  const int64_t k0 = p.k_off[l], k1 = p.k_off[l + 1];
  const int64_t c0 = p.c_off[l], c1 = p.c_off[l + 1];
  T hk = 0, kk = 0, hc = 0, cc = 0;
  for (int64_t j = k0 + threadIdx.x; j < k1; j += kThreads) {
    const T v = p.k[j] * p.k[j];
    kk += v;
    hk += v * p.u[j];
  }
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kThreads) {
    const T v = p.c[i] * p.c[i];
    cc += v;
    hc += v * p.g[i];
  }
  const T tr_hk = block_sum<kThreads>(hk, shared), tr_kk = block_sum<kThreads>(kk, shared);
  const T tr_hc = block_sum<kThreads>(hc, shared), tr_cc = block_sum<kThreads>(cc, shared);
  const T d_i = static_cast<T>(k1 - k0), d_o = static_cast<T>(c1 - c0);
  const auto co = singd::factor_coefficients(tr_hk, tr_kk, d_i, tr_hc, tr_cc, d_o, p.damping,
                                             p.kfac_like);
  for (int64_t j = k0 + threadIdx.x; j < k1; j += kThreads) {
    p.k[j] = singd::diagonal_factor_entry(p.k[j], p.u[j], co.a_k, co.b_k, p.alpha1, p.lr_cov,
                                          p.m_k ? p.m_k + j : nullptr);
  }
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kThreads) {
    p.c[i] = singd::diagonal_factor_entry(p.c[i], p.g[i], co.a_c, co.b_c, p.alpha1, p.lr_cov,
                                          p.m_c ? p.m_c + i : nullptr);
  }
}

}  // namespace

template <typename T>
cudaError_t singd_diagonal_factor_update(const SingdDiagonalFactorUpdateParams<T>& p,
                                         cudaStream_t stream) {
  if (p.layers <= 0) return cudaSuccess;
  factor_update_kernel<T><<<static_cast<unsigned>(p.layers), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t singd_diagonal_factor_update<float>(
    const SingdDiagonalFactorUpdateParams<float>&, cudaStream_t);
template cudaError_t singd_diagonal_factor_update<double>(
    const SingdDiagonalFactorUpdateParams<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
