// Batched symmetric eigendecomposition by Jacobi rotations, torch-free declarations.
//
// For every block b of a dense row-major (batch, n, n) stack, with A = the symmetric matrix
// whose lower triangle is blocks[b] (only entries i >= j are read):
//
//     A = Q diag(lambda) Q^T,   lambda ascending,   eigenvectors[b][i][k] = Q[i][k]
//
// and optionally the damped inverse
//
//     inverse[b] = Q diag(1 / (max(lambda, 0) + damping[b])) Q^T   (exactly symmetric).
//
// Convergence: a sweep rotates every off-diagonal pair once (with the stable formulas
// theta = (a_qq - a_pp) / (2 a_pq), t = sign(theta) / (|theta| + sqrt(theta^2 + 1)),
// c = 1 / sqrt(1 + t^2), s = t c, which zero a_pq; in the first 3 sweeps only pairs with
// |a_pq| >= 0.2 sum_{i>j} |a_ij| / n^2, threshold Jacobi). Before each sweep the off-diagonal
// norm is compared with tol * ||A||_F and every pair with its own diagonal (|a_ij| <=
// tol * max(sqrt(r_i r_j), tol ||A||_F), r_i = max(|a_ii|, |a_ii of the input|)); the solver stops
// when both hold, or after max_sweeps sweeps (csrc/cpu/block_eigh.cpp says why).
// sweeps[b] is the number of sweeps applied (0: already diagonal). A block with a non-finite
// entry in its lower triangle gets NaN outputs and sweeps[b] = -1; other blocks are unaffected.
//
// This header includes no torch header; the CUDA declarations are visible when compiling with
// nvcc or with KFAC_KERNELS_WITH_CUDA defined.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kfac_kernels {

template <typename T>
struct BlockEighParams {
  const T* blocks = nullptr;  // dense (batch, n, n), row-major; lower triangle read
  int64_t batch = 0;
  int64_t n = 0;
  T* eigenvalues = nullptr;   // (batch, n), or null (not written)
  T* eigenvectors = nullptr;  // (batch, n, n), row-major, columns are eigenvectors; or null
  int32_t* sweeps = nullptr;  // (batch), or null
  const T* damping = nullptr; // (batch); with `inverse`, the damped inverse is computed
  T* inverse = nullptr;       // (batch, n, n), or null
  int max_sweeps = 30;
  double tol = 0.0;           // relative to ||A||_F
};

namespace cpu {

// Cyclic (row-by-row) Jacobi, one block per OpenMP iteration; instantiated for float and double,
// computed in T. Deterministic: the result does not depend on the number of threads.
template <typename T>
void block_eigh(const BlockEighParams<T>& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// Largest n the CUDA kernel accepts (the block lives in shared memory: 128 KiB in fp64).
constexpr int64_t kBlockEighMaxN = 128;

// Bytes of device workspace block_eigh<T> needs on the current device: 0 where the double
// eigenvectors fit in shared memory next to the block, else batch * np * (np + 1) doubles.
template <typename T>
size_t block_eigh_workspace_bytes(int64_t batch, int64_t n);

// Parallel-order (round-robin) Jacobi, one thread block per matrix, the matrix in shared memory.
// All pointers are device pointers; `workspace` holds block_eigh_workspace_bytes<T>(batch, n)
// bytes (sized on the same device; may be null when that is 0) and must stay alive until the
// work on `stream` is done. Returns cudaErrorInvalidValue for n > kBlockEighMaxN or a missing
// workspace, the launch error, or cudaSuccess. Deterministic.
template <typename T>
cudaError_t block_eigh(const BlockEighParams<T>& p, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
