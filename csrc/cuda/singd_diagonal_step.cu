// CUDA kernel of the fused SINGD parameter step for diagonal factors (torch-free); see
// csrc/include/singd_diagonal_step.h for the definition. One thread per element, rows on
// grid.y, so c_i is a broadcast load and k_j / P / G / B are coalesced.
#include "singd_diagonal_step.h"

#include <cstdint>

#include "bf16_bits.h"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cuda {
namespace {

template <typename A, bool kBf16>
__global__ void step_kernel(SingdDiagonalStepParams<A> p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = blockIdx.y;
  if (j >= p.cols || i >= p.rows) return;
  const int64_t pi = i * p.param_stride_row + j;
  const int64_t gi = i * p.grad_stride_row + j;
  A pij, gij;
  if (kBf16) {
    pij = A(bf16::to_float(static_cast<const uint16_t*>(p.param)[pi]));
    gij = A(bf16::to_float(static_cast<const uint16_t*>(p.grad)[gi]));
  } else {
    pij = static_cast<const A*>(p.param)[pi];
    gij = static_cast<const A*>(p.grad)[gi];
  }
  const A v = singd::diagonal_preconditioned_gradient(gij, p.c[i], p.k[j]);
  const A out = singd::step_entry(v, pij, p.buf[i * p.buf_stride_row + j], p.lr, p.momentum,
                                  p.weight_decay, p.first);
  if (kBf16) {
    static_cast<uint16_t*>(p.param)[pi] = bf16::from_float(static_cast<float>(out));
  } else {
    static_cast<A*>(p.param)[pi] = out;
  }
}

}  // namespace

template <typename A>
cudaError_t singd_diagonal_step(const SingdDiagonalStepParams<A>& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;  // grid.y limit; the glue splits rows
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>((p.cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(p.rows));
  if (p.param_type == ElementType::kBFloat16) {
    step_kernel<A, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    step_kernel<A, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template cudaError_t singd_diagonal_step<float>(const SingdDiagonalStepParams<float>&,
                                                cudaStream_t);
template cudaError_t singd_diagonal_step<double>(const SingdDiagonalStepParams<double>&,
                                                 cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
