// CUDA kernels of the fused SINGD parameter step for diagonal factors (torch-free); see
// csrc/include/singd_diagonal_step.h for the definition.
//
// - One parameter (step_kernel): one thread per element, rows on grid.y, so c_i is a broadcast
//   load and k_j / P / G / B are coalesced.
// - Many parameters (steps_kernel, singd_diagonal_step_foreach): one launch for up to
//   kMaxTensorsPerLaunch parameters, their structs passed by value in the kernel's parameter
//   space (no copy to the device, no allocation). Each block takes kItems x kThreads consecutive
//   elements of one parameter in row-major order (a bias of one column is as dense as a weight);
//   the block finds its parameter by a scan of the first blocks (uniform across the block).
#include "singd_diagonal_step.h"

#include <cstdint>

#include "bf16_bits.h"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // elements per thread in steps_kernel
constexpr int64_t kElementsPerBlock = int64_t{kThreads} * kItems;

// Entry (i, j) of one parameter's step: the formula of both kernels, written once.
template <typename A, bool kBf16>
__device__ __forceinline__ void step_element(const SingdDiagonalStepParams<A>& p, int64_t i,
                                             int64_t j) {
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

template <typename A, bool kBf16>
__global__ void step_kernel(SingdDiagonalStepParams<A> p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = blockIdx.y;
  if (j >= p.cols || i >= p.rows) return;
  step_element<A, kBf16>(p, i, j);
}

// Up to kMaxTensorsPerLaunch parameters of one launch, and the first block of each
// (first_block[count] = the grid's size).
template <typename A>
struct StepBatch {
  SingdDiagonalStepParams<A> entry[kMaxTensorsPerLaunch];
  int64_t first_block[kMaxTensorsPerLaunch + 1];
  int count;
};
// A kernel's parameters may take 4 KiB on every architecture this library builds for.
static_assert(sizeof(StepBatch<double>) <= 4096, "StepBatch exceeds the kernel-parameter space");

template <typename A, bool kBf16>
__device__ __forceinline__ void steps_of_block(const SingdDiagonalStepParams<A>& p,
                                               int64_t base) {
  const int64_t n = p.rows * p.cols;
  for (int r = 0; r < kItems; ++r) {
    const int64_t e = base + int64_t{r} * kThreads + threadIdx.x;
    if (e >= n) return;
    const int64_t i = e / p.cols;
    step_element<A, kBf16>(p, i, e - i * p.cols);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) steps_kernel(StepBatch<A> batch) {
  const int64_t block = blockIdx.x;
  int t = 0;
  while (t + 1 < batch.count && block >= batch.first_block[t + 1]) ++t;
  const SingdDiagonalStepParams<A>& p = batch.entry[t];
  const int64_t base = (block - batch.first_block[t]) * kElementsPerBlock;
  if (p.param_type == ElementType::kBFloat16) {
    steps_of_block<A, true>(p, base);
  } else {
    steps_of_block<A, false>(p, base);
  }
}

}  // namespace

template <typename A>
cudaError_t singd_diagonal_step(const SingdDiagonalStepParams<A>& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;  // grid.y limit; the glue splits rows
  const dim3 grid(static_cast<unsigned>((p.cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(p.rows));
  if (p.param_type == ElementType::kBFloat16) {
    step_kernel<A, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    step_kernel<A, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename A>
cudaError_t singd_diagonal_steps(const SingdDiagonalStepParams<A>* list, int64_t count,
                                 cudaStream_t stream) {
  constexpr int64_t kMaxGrid = 0x7fffffff;  // grid.x
  int64_t t = 0;
  while (t < count) {
    StepBatch<A> batch;
    batch.count = 0;
    int64_t blocks = 0;
    // Fill a launch: up to kMaxTensorsPerLaunch non-empty entries within grid.x.
    for (; t < count && batch.count < kMaxTensorsPerLaunch; ++t) {
      const SingdDiagonalStepParams<A>& p = list[t];
      if (p.rows <= 0 || p.cols <= 0) continue;
      const int64_t need = (p.rows * p.cols + kElementsPerBlock - 1) / kElementsPerBlock;
      if (need > kMaxGrid) return cudaErrorInvalidValue;
      if (blocks + need > kMaxGrid) break;
      batch.entry[batch.count] = p;
      batch.first_block[batch.count] = blocks;
      ++batch.count;
      blocks += need;
    }
    if (batch.count == 0) continue;
    batch.first_block[batch.count] = blocks;
    steps_kernel<A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template cudaError_t singd_diagonal_step<float>(const SingdDiagonalStepParams<float>&,
                                                cudaStream_t);
template cudaError_t singd_diagonal_step<double>(const SingdDiagonalStepParams<double>&,
                                                 cudaStream_t);
template cudaError_t singd_diagonal_steps<float>(const SingdDiagonalStepParams<float>*, int64_t,
                                                 cudaStream_t);
template cudaError_t singd_diagonal_steps<double>(const SingdDiagonalStepParams<double>*,
                                                  int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
