// CUDA implementation of kfac_kernels::singd_block_step (glue around the torch-free kernel in
// csrc/cuda/singd_block_step.cu). Compiled only with CUDA.
#include "singd_block_step_glue.h"

#include "device_metadata.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

namespace kfac_kernels {
namespace {

void singd_block_step_cuda(at::Tensor weight, const at::Tensor& weight_grad,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& bias_grad, const at::Tensor& c,
                           at::IntArrayRef c_dims, const at::Tensor& k, at::IntArrayRef k_dims,
                           at::Tensor weight_buf, const std::optional<at::Tensor>& bias_buf,
                           double lr, double momentum, double weight_decay, bool first) {
  glue::check_singd_block_step(weight, weight_grad, bias, bias_grad, c, c_dims, k, k_dims,
                               weight_buf, bias_buf, c10::kCUDA);
  TORCH_CHECK(c.size(1) <= 32 && k.size(1) <= 32, "kfac_kernels::singd_block_step: the CUDA "
              "kernel takes blocks of at most 32, got ", c.size(1), " and ", k.size(1));
  const c10::cuda::CUDAGuard guard(weight.device());
  // sizes, then row and column offsets, on the device (copied at the first call with this layout)
  std::vector<int64_t> host(c_dims.begin(), c_dims.end());
  host.insert(host.end(), k_dims.begin(), k_dims.end());
  host.push_back(0);
  for (const auto n : c_dims) host.push_back(host.back() + n);
  host.push_back(0);
  for (const auto n : k_dims) host.push_back(host.back() + n);
  const at::Tensor meta = glue::device_metadata(host, weight.device());  // cached per layout
  const int64_t* d = meta.const_data_ptr<int64_t>();
  const int64_t nc = c.size(0), nk = k.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  cudaError_t err;
  if (weight.scalar_type() == at::kDouble) {
    err = cuda::singd_block_step<double>(
        glue::make_block_step_params<double>(weight, weight_grad, bias, bias_grad, c, d, k,
                                             d + nc, weight_buf, bias_buf, lr, momentum,
                                             weight_decay, first),
        d + nc + nk, stream);
  } else {
    err = cuda::singd_block_step<float>(
        glue::make_block_step_params<float>(weight, weight_grad, bias, bias_grad, c, d, k,
                                            d + nc, weight_buf, bias_buf, lr, momentum,
                                            weight_decay, first),
        d + nc + nk, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kfac_kernels::singd_block_step: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("singd_block_step", &kfac_kernels::singd_block_step_cuda);
}
