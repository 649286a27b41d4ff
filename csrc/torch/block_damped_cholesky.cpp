// CPU implementation of kfac_kernels::block_damped_cholesky (glue around the torch-free kernel
// in csrc/cpu/block_damped_cholesky.cpp), calling the LAPACK that torch links.
//
// The LAPACK routines are weak references: a torch built without an exported LAPACK leaves them
// null, the op then has no CPU kernel, and kfac_kernels.ops.block_damped_cholesky runs
// torch.linalg.cholesky_ex instead (the dispatcher says which: ops._library.has_kernel).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <climits>

#include "block_damped_cholesky.h"  // csrc/include: the torch-free kernel declarations
#include "block_eigh_glue.h"        // the damping checks shared with block_damped_inverse

extern "C" {
// LAPACK (Fortran calling convention, 32-bit integers: the interface torch itself declares).
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
}

namespace kfac_kernels {
namespace {

template <typename T>
PotrfFn<T> lapack_potrf();
template <>
PotrfFn<float> lapack_potrf<float>() { return &spotrf_; }
template <>
PotrfFn<double> lapack_potrf<double>() { return &dpotrf_; }

at::Tensor block_damped_cholesky_cpu(const at::Tensor& blocks_in, const at::Tensor& damping_in) {
  constexpr const char* op = "kfac_kernels::block_damped_cholesky";
  TORCH_CHECK(blocks_in.defined() && blocks_in.dim() == 3 &&
                  blocks_in.size(1) == blocks_in.size(2),
              op, ": blocks must be a (B, n, n) stack of square matrices, got shape ",
              blocks_in.sizes());
  TORCH_CHECK(blocks_in.scalar_type() == at::kFloat || blocks_in.scalar_type() == at::kDouble, op,
              ": blocks must be float32 or float64, got ", blocks_in.scalar_type());
  TORCH_CHECK(blocks_in.device().is_cpu(), op,
              ": blocks must be a cpu tensor for this kernel, got blocks on ", blocks_in.device());
  TORCH_CHECK(blocks_in.size(1) <= INT_MAX, op, ": blocks of order ", blocks_in.size(1),
              " exceed LAPACK's 32-bit sizes");
  glue::check_damping(op, blocks_in, damping_in);
  const at::Tensor blocks = blocks_in.contiguous();
  const at::Tensor damping = damping_in.contiguous();
  at::Tensor factors = at::empty(blocks.sizes(), blocks.options());
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), op, [&] {
    BlockDampedCholeskyParams<scalar_t> p;
    p.blocks = blocks.const_data_ptr<scalar_t>();
    p.damping = damping.const_data_ptr<scalar_t>();
    p.factors = factors.mutable_data_ptr<scalar_t>();
    p.batch = blocks.size(0);
    p.n = blocks.size(1);
    p.potrf = lapack_potrf<scalar_t>();
    cpu::block_damped_cholesky<scalar_t>(p);
  });
  return factors;
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  if (spotrf_ != nullptr && dpotrf_ != nullptr) {
    m.impl("block_damped_cholesky", &kfac_kernels::block_damped_cholesky_cpu);
  }
}
