// SINGD / IKFAC factor update of block-diagonal K and C for many layers in one call, torch-free
// declarations (Lin et al. (2024), Fig. 4 step 1 with Table 1's block-diagonal projection).
//
// Every diagonal block of every layer's K is stored in one array of `k_blocks` padded
// `bk x bk` matrices (row-major); block j is `k_dims[j] x k_dims[j]` (<= bk) in its top-left
// corner, the rest is neither read nor written. Layer l owns K blocks [k_layer[l], k_layer[l+1])
// and C blocks [c_layer[l], c_layer[l+1]) (C: `bc x bc`, c_dims). u holds the same diagonal
// blocks of U (Pi(U)), g those of G. For layer l with d_i = sum of its k_dims, d_o of its c_dims:
//
//     H_j = B_j^T U_j B_j (each K block B_j),   H_C likewise
//     INGD/SINGD: a_k = Tr(H_C)/d_o, b_k = lam Tr(C^T C)/d_o, a_c = Tr(H_K)/d_i,
//                 b_c = lam Tr(K^T K)/d_i;          IKFAC (kfac_like): a = 1, b = lam
//     S_j = (a_k H_j + b_k B_j^T B_j - I) / 2
//     with momentum: M_j = alpha1 M_j + S_j, S_j = M_j
//     B_j = B_j (I - lr_cov S_j)                   (the same for C)
//
// Traces are taken from the values before the update; they are summed per block and then per
// layer in block order, so the result does not depend on the thread count.
#pragma once

#include <cstdint>

namespace kfac_kernels {

template <typename T>
struct SingdBlockFactorUpdateParams {
  T* k = nullptr;                 // k_blocks x bk x bk
  T* c = nullptr;                 // c_blocks x bc x bc
  T* m_k = nullptr;               // null: no Riemannian momentum
  T* m_c = nullptr;
  const T* u = nullptr;           // same layout as k
  const T* g = nullptr;           // same layout as c
  const int64_t* k_dims = nullptr;   // k_blocks sizes (host memory for the CPU kernel,
  const int64_t* c_dims = nullptr;   // device memory for the CUDA kernel)
  const int64_t* k_layer = nullptr;  // layers + 1 block offsets
  const int64_t* c_layer = nullptr;
  int64_t k_blocks = 0;
  int64_t c_blocks = 0;
  int64_t bk = 0;
  int64_t bc = 0;
  int64_t layers = 0;
  T damping = T(0);
  T alpha1 = T(0);
  T lr_cov = T(0);
  bool kfac_like = false;
};

namespace cpu {

template <typename T>
void singd_block_factor_update(const SingdBlockFactorUpdateParams<T>& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// One thread block per layer (its blocks in order); enqueued on `stream`. `workspace` holds
// 2 * (k_blocks * bk * bk + c_blocks * bc * bc) values of T (device memory). Returns the launch
// error or cudaSuccess.
template <typename T>
cudaError_t singd_block_factor_update(const SingdBlockFactorUpdateParams<T>& p, T* workspace,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
