// Fused SINGD parameter step for block-diagonal Kronecker factors, torch-free declarations
// (Lin et al. (2024), Fig. 4, steps 2-3).
//
// The layer's parameter matrix is [W | b] (rows x (cols + 1) with a bias, rows x cols without):
// W is `weight` (rows x cols, contiguous), b the optional `bias` (rows). With block-diagonal
// C (blocks c, sizes c_dims summing to rows) and K (blocks k, sizes k_dims summing to the
// number of columns incl. the bias), gradient M = [dW | db] and momentum buffers of the same
// layout (weight_buf, bias_buf), in one pass over the tiles (C row block i, K column block j):
//
//     P_ij  = (C_i C_i^T) M_ij (K_j K_j^T)
//     D     = P + weight_decay * [W | b]                (only when weight_decay != 0)
//     B     = first ? D : momentum * B + D
//     [W|b] = [W|b] - lr * B
//
// c, k (row-major padded slots of bc x bc / bk x bk, the used block in the top-left corner)
// and the buffers are in the accumulation type A (float, or double for double parameters);
// parameters and gradients are A or bfloat16 (raw bits, rounded to nearest even once on store).
#pragma once

#include <cstdint>

#include "singd_diagonal_step.h"  // StepParamType

namespace kfac_kernels {

template <typename A>
struct SingdBlockStepParams {
  void* weight = nullptr;            // rows x cols
  const void* weight_grad = nullptr;
  void* bias = nullptr;              // rows, or null: no bias column
  const void* bias_grad = nullptr;
  StepParamType param_type = StepParamType::kSame;
  const A* c = nullptr;              // c_blocks x bc x bc
  const int64_t* c_dims = nullptr;   // host memory for the CPU kernel, device for CUDA
  const A* k = nullptr;              // k_blocks x bk x bk
  const int64_t* k_dims = nullptr;
  A* weight_buf = nullptr;           // rows x cols
  A* bias_buf = nullptr;             // rows (with a bias)
  int64_t rows = 0;
  int64_t cols = 0;                  // columns of the weight (without the bias)
  int64_t c_blocks = 0;
  int64_t k_blocks = 0;
  int64_t bc = 0;
  int64_t bk = 0;
  A lr = A(0);
  A momentum = A(0);
  A weight_decay = A(0);
  bool first = false;
};

namespace cpu {

// OpenMP over row blocks; the result does not depend on the thread count.
template <typename A>
void singd_block_step(const SingdBlockStepParams<A>& p);

}  // namespace cpu
}  // namespace kfac_kernels

#if defined(__CUDACC__) || defined(KFAC_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kfac_kernels {
namespace cuda {

// One thread block per tile; `offsets` (device) holds the c_blocks + 1 row offsets followed by
// the k_blocks + 1 column offsets. Blocks of at most 32 (bc, bk <= 32: the tiles live in shared
// memory); cudaErrorInvalidValue otherwise. Returns the launch error or cudaSuccess.
template <typename A>
cudaError_t singd_block_step(const SingdBlockStepParams<A>& p, const int64_t* offsets,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace kfac_kernels
#endif
