// CUDA kernel of the fused SINGD parameter step for block-diagonal factors (torch-free); see
// csrc/include/singd_block_step.h. One thread block per tile (C row block i, K column block j):
// the threads form C_i C_i^T, K_j K_j^T and (C_i C_i^T) M_ij in shared memory (blocks of up to
// kMaxBlock), then each entry of the tile is finished and written once.
#include "singd_block_step.h"

#include <cstdint>

#include "bf16_bits.h"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlock = 32;  // shared memory: 4 tiles of 32 x 32 doubles = 32 KiB

template <typename A, typename Elem>
__global__ void block_step_kernel(SingdBlockStepParams<A> p, const int64_t* ro,
                                  const int64_t* co) {
  __shared__ A cc[kMaxBlock * kMaxBlock];
  __shared__ A kk[kMaxBlock * kMaxBlock];
  __shared__ A m[kMaxBlock * kMaxBlock];
  __shared__ A a1[kMaxBlock * kMaxBlock];
  const int64_t i = blockIdx.x / p.k_blocks, j = blockIdx.x % p.k_blocks;
  const int64_t ni = p.c_dims[i], nj = p.k_dims[j];
  const int64_t r0 = ro[i], c0 = co[j];
  const A* cb = p.c + i * p.bc * p.bc;
  const A* kb = p.k + j * p.bk * p.bk;
  auto* weight = static_cast<Elem*>(p.weight);
  const auto* wgrad = static_cast<const Elem*>(p.weight_grad);
  auto* bias = static_cast<Elem*>(p.bias);
  const auto* bgrad = static_cast<const Elem*>(p.bias_grad);
  for (int64_t e = threadIdx.x; e < ni * ni; e += kThreads) {
    const int64_t r = e / ni, c = e % ni;
    A s = 0;
    for (int64_t t = 0; t < ni; ++t) s += cb[r * p.bc + t] * cb[c * p.bc + t];
    cc[r * kMaxBlock + c] = s;
  }
  for (int64_t e = threadIdx.x; e < nj * nj; e += kThreads) {
    const int64_t r = e / nj, c = e % nj;
    A s = 0;
    for (int64_t t = 0; t < nj; ++t) s += kb[r * p.bk + t] * kb[c * p.bk + t];
    kk[r * kMaxBlock + c] = s;
  }
  for (int64_t e = threadIdx.x; e < ni * nj; e += kThreads) {
    const int64_t r = e / nj, c = e % nj, gr = r0 + r, gc = c0 + c;
    m[r * kMaxBlock + c] =
        gc < p.cols ? bf16::load_as<A>(wgrad, gr * p.cols + gc) : bf16::load_as<A>(bgrad, gr);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < ni * nj; e += kThreads) {
    const int64_t r = e / nj, c = e % nj;
    A s = 0;
    for (int64_t t = 0; t < ni; ++t) s += cc[r * kMaxBlock + t] * m[t * kMaxBlock + c];
    a1[r * kMaxBlock + c] = s;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < ni * nj; e += kThreads) {
    const int64_t r = e / nj, c = e % nj, gr = r0 + r, gc = c0 + c;
    A d = 0;
    for (int64_t t = 0; t < nj; ++t) d += a1[r * kMaxBlock + t] * kk[t * kMaxBlock + c];
    const bool is_w = gc < p.cols;
    Elem* pp = is_w ? weight : bias;
    A* bp = is_w ? p.weight_buf : p.bias_buf;
    const int64_t idx = is_w ? gr * p.cols + gc : gr;
    bf16::store_as(pp, idx, singd::step_entry(d, bf16::load_as<A>(pp, idx), bp[idx], p.lr,
                                              p.momentum, p.weight_decay, p.first));
  }
}

}  // namespace

template <typename A>
cudaError_t singd_block_step(const SingdBlockStepParams<A>& p, const int64_t* offsets,
                             cudaStream_t stream) {
  if (p.rows <= 0 || p.c_blocks <= 0 || p.k_blocks <= 0) return cudaSuccess;
  if (p.bc > kMaxBlock || p.bk > kMaxBlock) return cudaErrorInvalidValue;
  const auto grid = static_cast<unsigned>(p.c_blocks * p.k_blocks);
  const int64_t* ro = offsets;
  const int64_t* co = offsets + p.c_blocks + 1;
  if (p.param_type == ElementType::kBFloat16) {
    block_step_kernel<A, uint16_t><<<grid, kThreads, 0, stream>>>(p, ro, co);
  } else {
    block_step_kernel<A, A><<<grid, kThreads, 0, stream>>>(p, ro, co);
  }
  return cudaGetLastError();
}

template cudaError_t singd_block_step<float>(const SingdBlockStepParams<float>&,
                                             const int64_t*, cudaStream_t);
template cudaError_t singd_block_step<double>(const SingdBlockStepParams<double>&,
                                              const int64_t*, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
