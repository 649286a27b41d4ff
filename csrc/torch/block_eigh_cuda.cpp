// CUDA implementation of kfac_kernels::block_eigh and kfac_kernels::block_damped_inverse (glue
// around the torch-free kernel in csrc/cuda/block_eigh.cu). Compiled only when the extension is
// built with CUDA (KFAC_KERNELS_WITH_CUDA is defined).
#include "block_eigh_glue.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace kfac_kernels {
namespace {

// Runs the kernel on a contiguous stack; `inverse`/`damping` undefined for the plain eigh.
void launch(const char* op, const at::Tensor& blocks, int64_t max_sweeps, double tol,
            const at::Tensor& vals, const at::Tensor& vecs, const at::Tensor& sweeps,
            const at::Tensor& damping, const at::Tensor& inverse) {
  TORCH_CHECK(blocks.size(1) <= cuda::kBlockEighMaxN, op, ": the CUDA kernel takes n <= ",
              cuda::kBlockEighMaxN, ", got n = ", blocks.size(1));
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "kfac_kernels::block_eigh_cuda", [&] {
    // none where the eigenvectors fit in shared memory (csrc/cuda/block_eigh.cu)
    const size_t bytes =
        cuda::block_eigh_workspace_bytes<scalar_t>(blocks.size(0), blocks.size(1));
    at::Tensor workspace;
    if (bytes)
      workspace = at::empty({static_cast<int64_t>(bytes)}, blocks.options().dtype(at::kByte));
    BlockEighParams<scalar_t> p;
    p.blocks = blocks.const_data_ptr<scalar_t>();
    p.batch = blocks.size(0);
    p.n = blocks.size(1);
    p.eigenvalues = vals.defined() ? vals.mutable_data_ptr<scalar_t>() : nullptr;
    p.eigenvectors = vecs.defined() ? vecs.mutable_data_ptr<scalar_t>() : nullptr;
    p.sweeps = sweeps.mutable_data_ptr<int32_t>();
    p.damping = damping.defined() ? damping.const_data_ptr<scalar_t>() : nullptr;
    p.inverse = inverse.defined() ? inverse.mutable_data_ptr<scalar_t>() : nullptr;
    p.max_sweeps = static_cast<int>(max_sweeps);
    p.tol = tol;
    const cudaError_t err = cuda::block_eigh<scalar_t>(
        p, bytes ? workspace.data_ptr() : nullptr,
        c10::cuda::getCurrentCUDAStream(blocks.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_eigh_cuda(const at::Tensor& blocks_in,
                                                               int64_t max_sweeps, double tol) {
  constexpr const char* op = "kfac_kernels::block_eigh";
  glue::check_block_eigh(op, blocks_in, max_sweeps, tol, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(blocks_in.device());
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t b = blocks.size(0), n = blocks.size(1);
  at::Tensor vals = at::empty({b, n}, blocks.options());
  at::Tensor vecs = at::empty({b, n, n}, blocks.options());
  at::Tensor sweeps = at::empty({b}, blocks.options().dtype(at::kInt));
  if (b > 0) launch(op, blocks, max_sweeps, tol, vals, vecs, sweeps, at::Tensor(), at::Tensor());
  return {vals, vecs, sweeps};
}

std::tuple<at::Tensor, at::Tensor> block_damped_inverse_cuda(const at::Tensor& blocks_in,
                                                             const at::Tensor& damping_in,
                                                             int64_t max_sweeps, double tol) {
  constexpr const char* op = "kfac_kernels::block_damped_inverse";
  glue::check_block_eigh(op, blocks_in, max_sweeps, tol, c10::kCUDA);
  glue::check_damping(op, blocks_in, damping_in);
  const c10::cuda::CUDAGuard guard(blocks_in.device());
  const at::Tensor blocks = blocks_in.contiguous();
  const at::Tensor damping = damping_in.contiguous();
  const int64_t b = blocks.size(0), n = blocks.size(1);
  at::Tensor inverse = at::empty({b, n, n}, blocks.options());
  at::Tensor sweeps = at::empty({b}, blocks.options().dtype(at::kInt));
  if (b > 0)
    launch(op, blocks, max_sweeps, tol, at::Tensor(), at::Tensor(), sweeps, damping, inverse);
  return {inverse, sweeps};
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("block_eigh", &kfac_kernels::block_eigh_cuda);
  m.impl("block_damped_inverse", &kfac_kernels::block_damped_inverse_cuda);
}
