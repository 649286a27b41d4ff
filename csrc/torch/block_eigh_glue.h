// Glue shared by the CPU and CUDA implementations of kfac_kernels::block_eigh and
// kfac_kernels::block_damped_inverse: argument checks and the tensor -> parameter conversion.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "block_eigh.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

inline void check_block_eigh(const char* op, const at::Tensor& blocks, int64_t max_sweeps,
                             double tol, c10::DeviceType device_type) {
  TORCH_CHECK(blocks.defined(), op, ": blocks must be a defined tensor");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), op,
              ": blocks must be a (B, n, n) stack of square matrices, got shape ", blocks.sizes());
  TORCH_CHECK(blocks.scalar_type() == at::kFloat || blocks.scalar_type() == at::kDouble, op,
              ": blocks must be float32 or float64, got ", blocks.scalar_type());
  TORCH_CHECK(max_sweeps >= 1 && max_sweeps <= (1 << 20), op,
              ": max_sweeps must be a positive int, got ", max_sweeps);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0, op, ": tol must be finite and >= 0, got ", tol);
  TORCH_CHECK(blocks.device().type() == device_type, op, ": blocks must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensor for this kernel, got blocks on ", blocks.device());
}

inline void check_damping(const char* op, const at::Tensor& blocks, const at::Tensor& damping) {
  TORCH_CHECK(damping.defined() && damping.dim() == 1 && damping.size(0) == blocks.size(0), op,
              ": damping must be a 1-D tensor with one value per block (", blocks.size(0),
              "), got shape ", damping.sizes());
  TORCH_CHECK(damping.scalar_type() == blocks.scalar_type(), op,
              ": damping and blocks must have the same dtype, got damping ",
              damping.scalar_type(), " and blocks ", blocks.scalar_type());
  TORCH_CHECK(damping.device() == blocks.device(), op,
              ": damping and blocks must be on the same device, got damping on ",
              damping.device(), " and blocks on ", blocks.device());
}

}  // namespace glue
}  // namespace kfac_kernels
