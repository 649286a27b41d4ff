// Glue shared by the CPU and CUDA implementations of kfac_kernels::patch_covariance: argument
// checks and the tensor -> PatchCovarianceParams conversion. Self-contained (it includes what it
// uses); the op's definition is in csrc/include/patch_covariance.h.
//
//     PatchCovarianceParams p = glue::make_patch_covariance_params(x, ..., c10::kCPU);
//     at::Tensor out = glue::empty_patch_covariance_output(p, x);
//     if (out.numel() > 0) { p.out = out.mutable_data_ptr(); cpu::patch_covariance(p); }
//
// make_patch_covariance_params checks every argument (messages name the argument) and fills
// everything but p.out; x and factor are read through their strides, so no copy is made.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "patch_covariance.h"  // csrc/include: the torch-free kernel declarations

namespace kfac_kernels {
namespace glue {

// dtype of the result and of factor: float64 for a float64 input, float32 for the others.
inline at::ScalarType patch_covariance_accumulation_type(at::ScalarType x_type) {
  return x_type == at::kDouble ? at::kDouble : at::kFloat;
}

inline ElementType patch_covariance_input_type(at::ScalarType x_type) {
  switch (x_type) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kDouble:
      return ElementType::kFloat64;
    case at::kHalf:
      return ElementType::kFloat16;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "kfac_kernels::patch_covariance: x must be float32, float64, float16 or "
                  "bfloat16, got ", x_type);
  }
}

// Checks the arguments of patch_covariance for the kernel running on `device_type` and returns
// the kernel parameters (all but `out`).
inline PatchCovarianceParams make_patch_covariance_params(
    const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef out_size,
    int64_t num_segments, int64_t segment_start, int64_t segment_step, int64_t segment_channels,
    bool reduce, bool bias, const std::optional<at::Tensor>& factor, double decay, double alpha,
    c10::DeviceType device_type) {
  constexpr const char* op = "kfac_kernels::patch_covariance";
  TORCH_CHECK(x.defined(), op, ": x must be a defined tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensor for this kernel, got x on ", x.device());

  const struct {
    const char* name;
    at::IntArrayRef v;
  } lists[] = {{"kernel_size", kernel_size}, {"stride", stride},       {"dilation", dilation},
               {"padding", padding},         {"out_size", out_size}};
  for (const auto& l : lists)
    TORCH_CHECK(l.v.size() == 2, op, ": ", l.name, " must have 2 entries (height, width), got ",
                l.v);
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op,
              ": padding (top, left) must be non-negative, got ", padding);
  TORCH_CHECK(out_size[0] >= 1 && out_size[1] >= 1, op, ": out_size must be positive, got ",
              out_size);
  // The last patch must start inside the padded input. The padding after the input is implied by
  // out_size; a convolution puts at most max(padding before, kernel extent - 1) there.
  const char* dims[] = {"height", "width"};
  for (int a = 0; a < 2; ++a) {
    const int64_t size = x.size(2 + a);
    const int64_t extent = dilation[a] * (kernel_size[a] - 1) + 1;
    const int64_t after = std::max<int64_t>(padding[a], extent - 1);
    const int64_t last_start = (out_size[a] - 1) * stride[a] - padding[a];
    TORCH_CHECK(last_start < size + after, op, ": out_size[", a, "] = ", out_size[a],
                " is inconsistent with the input ", dims[a], " ", size, ": with stride ",
                stride[a], " and padding ", padding[a], " the last patch would start at ",
                last_start, ", past the input padded by ", after, " at the end (out_size must be "
                "the convolution's output size)");
  }

  const int64_t channels = x.size(1);
  TORCH_CHECK(num_segments >= 1, op, ": num_segments must be positive, got ", num_segments);
  TORCH_CHECK(segment_channels >= 1, op, ": segment_channels must be positive, got ",
              segment_channels);
  TORCH_CHECK(segment_start >= 0, op, ": segment_start must be non-negative, got ",
              segment_start);
  TORCH_CHECK(segment_step >= 0, op, ": segment_step must be non-negative, got ", segment_step);
  const int64_t last_end = segment_start + (num_segments - 1) * segment_step + segment_channels;
  TORCH_CHECK(last_end <= channels, op, ": the segments do not fit in the ", channels,
              " channels of x: segment_start ", segment_start, " + (num_segments ", num_segments,
              " - 1) * segment_step ", segment_step, " + segment_channels ", segment_channels,
              " = ", last_end);

  TORCH_CHECK(std::isfinite(decay), op, ": decay must be finite, got ", decay);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);

  PatchCovarianceParams p;
  p.x_type = patch_covariance_input_type(st);
  p.x = x.numel() > 0 ? x.const_data_ptr() : nullptr;
  p.n = x.size(0), p.channels = channels, p.height = x.size(2), p.width = x.size(3);
  p.x_stride_n = x.stride(0), p.x_stride_c = x.stride(1);
  p.x_stride_h = x.stride(2), p.x_stride_w = x.stride(3);
  p.kernel_h = kernel_size[0], p.kernel_w = kernel_size[1];
  p.stride_h = stride[0], p.stride_w = stride[1];
  p.dilation_h = dilation[0], p.dilation_w = dilation[1];
  p.pad_top = padding[0], p.pad_left = padding[1];
  p.out_h = out_size[0], p.out_w = out_size[1];
  p.num_segments = num_segments, p.segment_start = segment_start;
  p.segment_step = segment_step, p.segment_channels = segment_channels;
  p.reduce = reduce;
  p.bias = bias;
  p.decay = decay;
  p.alpha = alpha;

  const int64_t d = p.dim();
  if (factor.has_value() && factor->defined()) {
    const at::Tensor& f = *factor;
    const at::ScalarType acc = patch_covariance_accumulation_type(st);
    TORCH_CHECK(f.scalar_type() == acc, op, ": factor must have the accumulation dtype ", acc,
                " (float64 for a float64 x, float32 otherwise), got ", f.scalar_type());
    TORCH_CHECK(f.dim() == 3 && f.size(0) == num_segments && f.size(1) == d && f.size(2) == d,
                op, ": factor must have shape (num_segments, D, D) = (", num_segments, ", ", d,
                ", ", d, "), got ", f.sizes());
    TORCH_CHECK(f.device() == x.device(), op,
                ": factor and x must be on the same device, got factor on ", f.device(),
                " and x on ", x.device());
    p.factor = f.const_data_ptr();
    p.factor_stride_batch = f.stride(0);
    p.factor_stride_row = f.stride(1);
    p.factor_stride_col = f.stride(2);
  }
  return p;
}

// The (num_segments, D, D) contiguous result of the accumulation dtype, on x's device.
inline at::Tensor empty_patch_covariance_output(const PatchCovarianceParams& p,
                                                const at::Tensor& x) {
  return at::empty({p.num_segments, p.dim(), p.dim()},
                   x.options()
                       .dtype(patch_covariance_accumulation_type(x.scalar_type()))
                       .memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace glue
}  // namespace kfac_kernels
