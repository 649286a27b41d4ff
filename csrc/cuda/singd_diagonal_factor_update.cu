// CUDA kernel of the many-layer diagonal SINGD factor update (torch-free); see
// csrc/include/singd_diagonal_factor_update.h. One block per layer: strided partial sums per
// thread, a fixed-order shared-memory tree reduction (deterministic), then the element update.
#include "singd_diagonal_factor_update.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}

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
  const T tr_hk = block_sum(hk, shared), tr_kk = block_sum(kk, shared);
  const T tr_hc = block_sum(hc, shared), tr_cc = block_sum(cc, shared);
  const T d_i = static_cast<T>(k1 - k0), d_o = static_cast<T>(c1 - c0);
  T a_k = 1, b_k = p.damping, a_c = 1, b_c = p.damping;
  if (!p.kfac_like) {
    a_k = tr_hc / d_o;
    b_k = p.damping * tr_cc / d_o;
    a_c = tr_hk / d_i;
    b_c = p.damping * tr_kk / d_i;
  }
  for (int64_t j = k0 + threadIdx.x; j < k1; j += kThreads) {
    const T v = p.k[j] * p.k[j];
    T s = T(0.5) * (a_k * (v * p.u[j]) + b_k * v - T(1));
    if (p.m_k != nullptr) {
      s = p.alpha1 * p.m_k[j] + s;
      p.m_k[j] = s;
    }
    p.k[j] = p.k[j] * (T(1) - p.lr_cov * s);
  }
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kThreads) {
    const T v = p.c[i] * p.c[i];
    T s = T(0.5) * (a_c * (v * p.g[i]) + b_c * v - T(1));
    if (p.m_c != nullptr) {
      s = p.alpha1 * p.m_c[i] + s;
      p.m_c[i] = s;
    }
    p.c[i] = p.c[i] * (T(1) - p.lr_cov * s);
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
