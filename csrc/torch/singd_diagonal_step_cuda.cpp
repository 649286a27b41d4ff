// CUDA implementation of kfac_kernels::singd_diagonal_step (glue around the torch-free kernel in
// csrc/cuda/singd_diagonal_step.cu). Compiled only when the extension is built with CUDA.
#include "singd_diagonal_step_glue.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace kfac_kernels {
namespace {

template <typename A>
void launch(at::Tensor& param, const at::Tensor& grad, const at::Tensor& c, const at::Tensor& k,
            at::Tensor& buf, double lr, double momentum, double weight_decay, bool first) {
  constexpr int64_t kMaxRows = 65535;  // grid.y limit: launch in row chunks
  const auto stream = c10::cuda::getCurrentCUDAStream(param.device().index()).stream();
  for (int64_t r0 = 0; r0 < param.size(0); r0 += kMaxRows) {
    const int64_t n = std::min(kMaxRows, param.size(0) - r0);
    at::Tensor p = param.narrow(0, r0, n), b = buf.narrow(0, r0, n);
    const auto params = glue::make_step_params<A>(p, grad.narrow(0, r0, n), c.narrow(0, r0, n),
                                                  k, b, lr, momentum, weight_decay, first);
    const cudaError_t err = cuda::singd_diagonal_step<A>(params, stream);
    TORCH_CHECK(err == cudaSuccess, "kfac_kernels::singd_diagonal_step: CUDA kernel launch "
                "failed: ", cudaGetErrorString(err));
  }
}

void singd_diagonal_step_cuda(at::Tensor param, const at::Tensor& grad, const at::Tensor& c,
                              const at::Tensor& k, at::Tensor buf, double lr, double momentum,
                              double weight_decay, bool first) {
  glue::check_singd_diagonal_step(param, grad, c, k, buf, lr, momentum, weight_decay,
                                  c10::kCUDA);
  const c10::cuda::CUDAGuard guard(param.device());
  if (param.scalar_type() == at::kDouble) {
    launch<double>(param, grad, c, k, buf, lr, momentum, weight_decay, first);
  } else {
    launch<float>(param, grad, c, k, buf, lr, momentum, weight_decay, first);
  }
}

// One launch per kMaxTensorsPerLaunch parameters of an accumulation type (the parameters' structs
// travel in the launch itself: nothing is copied to the device or allocated).
void singd_diagonal_step_foreach_cuda(at::TensorList params, at::TensorList grads,
                                      at::TensorList cs, at::TensorList ks, at::TensorList bufs,
                                      double lr, double momentum, double weight_decay,
                                      const c10::List<bool>& first) {
  const auto lists = glue::checked_step_lists(params, grads, cs, ks, bufs, lr, momentum,
                                              weight_decay, first, c10::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  cudaError_t err = cuda::singd_diagonal_steps<float>(
      lists.f.data(), static_cast<int64_t>(lists.f.size()), stream);
  if (err == cudaSuccess) {
    err = cuda::singd_diagonal_steps<double>(lists.d.data(),
                                             static_cast<int64_t>(lists.d.size()), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "kfac_kernels::singd_diagonal_step_foreach: CUDA kernel "
              "launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace kfac_kernels

TORCH_LIBRARY_IMPL(kfac_kernels, CUDA, m) {
  m.impl("singd_diagonal_step", &kfac_kernels::singd_diagonal_step_cuda);
  m.impl("singd_diagonal_step_foreach", &kfac_kernels::singd_diagonal_step_foreach_cuda);
}
