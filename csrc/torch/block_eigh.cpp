// CPU implementation of kfac_kernels::block_eigh and kfac_kernels::block_damped_inverse (glue
// around the torch-free kernel in csrc/cpu/block_eigh.cpp).
#include "block_eigh_glue.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace kfac_kernels {
namespace {

template <typename T>
BlockEighParams<T> params(const at::Tensor& blocks, int64_t max_sweeps, double tol,
                          const at::Tensor& sweeps) {
  BlockEighParams<T> p;
  p.blocks = blocks.const_data_ptr<T>();
  p.batch = blocks.size(0);
  p.n = blocks.size(1);
  p.sweeps = sweeps.mutable_data_ptr<int32_t>();
  p.max_sweeps = static_cast<int>(max_sweeps);
  p.tol = tol;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_eigh_cpu(const at::Tensor& blocks_in,
                                                              int64_t max_sweeps, double tol) {
  glue::check_block_eigh("kfac_kernels::block_eigh", blocks_in, max_sweeps, tol, c10::kCPU);
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t b = blocks.size(0), n = blocks.size(1);
  at::Tensor vals = at::empty({b, n}, blocks.options());
  at::Tensor vecs = at::empty({b, n, n}, blocks.options());
  at::Tensor sweeps = at::empty({b}, blocks.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "kfac_kernels::block_eigh", [&] {
    auto p = params<scalar_t>(blocks, max_sweeps, tol, sweeps);
    p.eigenvalues = vals.mutable_data_ptr<scalar_t>();
    p.eigenvectors = vecs.mutable_data_ptr<scalar_t>();
    cpu::block_eigh<scalar_t>(p);
  });
  return {vals, vecs, sweeps};
}

std::tuple<at::Tensor, at::Tensor> block_damped_inverse_cpu(const at::Tensor& blocks_in,
                                                            const at::Tensor& damping_in,
                                                            int64_t max_sweeps, double tol) {
  constexpr const char* op = "kfac_kernels::block_damped_inverse";
  glue::check_block_eigh(op, blocks_in, max_sweeps, tol, c10::kCPU);
  glue::check_damping(op, blocks_in, damping_in);
  const at::Tensor blocks = blocks_in.contiguous();
  const at::Tensor damping = damping_in.contiguous();
  const int64_t b = blocks.size(0), n = blocks.size(1);
  at::Tensor inverse = at::empty({b, n, n}, blocks.options());
  at::Tensor sweeps = at::empty({b}, blocks.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "kfac_kernels::block_damped_inverse", [&] {
    auto p = params<scalar_t>(blocks, max_sweeps, tol, sweeps);
    p.damping = damping.const_data_ptr<scalar_t>();
    p.inverse = inverse.mutable_data_ptr<scalar_t>();
    cpu::block_eigh<scalar_t>(p);
  });
  return {inverse, sweeps};
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CPU, m) {
  m.impl("block_eigh", &kfac_kernels::block_eigh_cpu);
  m.impl("block_damped_inverse", &kfac_kernels::block_damped_inverse_cpu);
}
