// CUDA kernel of the many-layer block-diagonal SINGD factor update (torch-free); see
// csrc/include/singd_block_factor_update.h. One thread block per layer walks the layer's K and
// C blocks in order: U B into the workspace and strided partial traces per thread, a fixed-order
// shared-memory tree reduction (deterministic), then per block S, the momentum and B (I - lr S)
// (new values staged in the workspace so no thread reads an entry another already replaced).
#include "singd_block_factor_update.h"

#include "block_sum.cuh"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Partial Tr(B^T S B) and Tr(B^T B) of this thread over blocks [j0, j1); S B stays in ws.
template <typename T>
__device__ void side_traces(const T* x, const T* stat, const int64_t* dims, int64_t j0,
                            int64_t j1, int64_t ld, T* ws, T& th, T& tq, T& dim) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = dims[j];
    const T* b = x + j * ld * ld;
    const T* s = stat + j * ld * ld;
    T* sb = ws + j * ld * ld;
    dim += static_cast<T>(n);
    for (int64_t e = threadIdx.x; e < n * n; e += kThreads) {
      const int64_t r = e / n, c = e % n;
      T acc = 0;
      for (int64_t t = 0; t < n; ++t) acc += s[r * ld + t] * b[t * ld + c];
      sb[r * ld + c] = acc;
      th += b[r * ld + c] * acc;  // Tr(B^T (S B)) = sum of B .* (S B)
      tq += b[r * ld + c] * b[r * ld + c];
    }
  }
}

template <typename T>
__device__ void side_update(T* x, T* m, const int64_t* dims, int64_t j0, int64_t j1, int64_t ld,
                            T* ws_sb, T* ws_s, T a, T bcoef, T alpha1, T lr_cov) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = dims[j];
    T* b = x + j * ld * ld;
    T* sb = ws_sb + j * ld * ld;  // S B from side_traces, then the new B
    T* st = ws_s + j * ld * ld;
    for (int64_t e = threadIdx.x; e < n * n; e += kThreads) {
      const int64_t r = e / n, c = e % n;
      T h = 0, q = 0;
      for (int64_t t = 0; t < n; ++t) {
        h += b[t * ld + r] * sb[t * ld + c];
        q += b[t * ld + r] * b[t * ld + c];
      }
      st[r * ld + c] = singd::factor_direction(a, h, bcoef, q, r == c, alpha1,
                                               m ? m + j * ld * ld + r * ld + c : nullptr);
    }
    __syncthreads();  // every S entry (and every read of S B) done
    for (int64_t e = threadIdx.x; e < n * n; e += kThreads) {
      const int64_t r = e / n, c = e % n;
      T acc = 0;
      for (int64_t t = 0; t < n; ++t) acc += b[r * ld + t] * st[t * ld + c];
      sb[r * ld + c] = b[r * ld + c] - lr_cov * acc;
    }
    __syncthreads();  // every read of B done
    // No barrier after the copy: it is the last access to block j's storage (B, S B, S and the
    // momentum at j * ld^2 in their arrays), and the next block (or the other side's) reads and
    // writes only its own.
    for (int64_t e = threadIdx.x; e < n * n; e += kThreads) {
      const int64_t r = e / n, c = e % n;
      b[r * ld + c] = sb[r * ld + c];
    }
  }
}

template <typename T>
__global__ void block_factor_update_kernel(SingdBlockFactorUpdateParams<T> p, T* ws) {
  __shared__ T shared[kThreads];
  const int64_t l = blockIdx.x;
  const int64_t kj0 = p.k_layer[l], kj1 = p.k_layer[l + 1];
  const int64_t cj0 = p.c_layer[l], cj1 = p.c_layer[l + 1];
  T* ws_k = ws;                                   // k_blocks * bk^2: S B, then new B
  T* ws_c = ws_k + p.k_blocks * p.bk * p.bk;      // c_blocks * bc^2
  T* ws_sk = ws_c + p.c_blocks * p.bc * p.bc;     // S of the K blocks
  T* ws_sc = ws_sk + p.k_blocks * p.bk * p.bk;    // S of the C blocks
  T hk = 0, qk = 0, hc = 0, qc = 0, d_i = 0, d_o = 0;
  side_traces(p.k, p.u, p.k_dims, kj0, kj1, p.bk, ws_k, hk, qk, d_i);
  side_traces(p.c, p.g, p.c_dims, cj0, cj1, p.bc, ws_c, hc, qc, d_o);
  const T tr_hk = block_sum<kThreads>(hk, shared), tr_qk = block_sum<kThreads>(qk, shared);
  const T tr_hc = block_sum<kThreads>(hc, shared), tr_qc = block_sum<kThreads>(qc, shared);
  const auto co = singd::factor_coefficients(tr_hk, tr_qk, d_i, tr_hc, tr_qc, d_o, p.damping,
                                             p.kfac_like);
  side_update(p.k, p.m_k, p.k_dims, kj0, kj1, p.bk, ws_k, ws_sk, co.a_k, co.b_k, p.alpha1,
              p.lr_cov);
  side_update(p.c, p.m_c, p.c_dims, cj0, cj1, p.bc, ws_c, ws_sc, co.a_c, co.b_c, p.alpha1,
              p.lr_cov);
}

}  // namespace

template <typename T>
cudaError_t singd_block_factor_update(const SingdBlockFactorUpdateParams<T>& p, T* workspace,
                                      cudaStream_t stream) {
  if (p.layers <= 0) return cudaSuccess;
  block_factor_update_kernel<T>
      <<<static_cast<unsigned>(p.layers), kThreads, 0, stream>>>(p, workspace);
  return cudaGetLastError();
}

template cudaError_t singd_block_factor_update<float>(const SingdBlockFactorUpdateParams<float>&,
                                                      float*, cudaStream_t);
template cudaError_t singd_block_factor_update<double>(
    const SingdBlockFactorUpdateParams<double>&, double*, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
