// Internal header of the CUDA kernels (csrc/cuda/*.cu only): the sum of one value per thread over
// a thread block, by a shared-memory tree in a fixed order, so the result does not depend on the
// threads' timing (the SINGD factor updates' per-layer traces).
#pragma once

#include <cuda_runtime.h>

namespace kfac_kernels {
namespace cuda {

// Every one of the kThreads threads (a power of two) calls it with its v; all get the sum.
// `shared` holds kThreads values of the caller's shared memory; it may be reused on return.
template <int kThreads, typename T>
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

}  // namespace cuda
}  // namespace kfac_kernels
