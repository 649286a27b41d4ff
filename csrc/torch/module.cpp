// kfac_kernels._C: the op schemas (TORCH_LIBRARY) and a small Python module describing the build.
// The CPU and CUDA implementations register themselves in their own files
// (symmetric_factor_update.cpp, symmetric_factor_update_cuda.cpp, patch_covariance.cpp, ...).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "symmetric_factor_update.h"  // csrc/include: kernel declarations (cpu::isa, ...)

TORCH_LIBRARY(kfac_kernels, m) {
  m.def("symmetric_factor_update(Tensor? factor, Tensor x, float decay, float alpha) -> Tensor");
  // x: (N, C, H, W); kernel_size, stride, dilation, padding (top, left), out_size: 2 ints each.
  // See csrc/include/patch_covariance.h for the definition.
  m.def(
      "patch_covariance(Tensor x, int[] kernel_size, int[] stride, int[] dilation, int[] padding, "
      "int[] out_size, int num_segments, int segment_start, int segment_step, "
      "int segment_channels, bool reduce, bool bias, Tensor? factor, float decay, float alpha) "
      "-> Tensor");
  // blocks: (B, n, n), lower triangle read; returns (eigenvalues (B, n) ascending, eigenvectors
  // (B, n, n) as columns, sweeps (B,) int32). See csrc/include/block_eigh.h.
  m.def("block_eigh(Tensor blocks, int max_sweeps, float tol) -> (Tensor, Tensor, Tensor)");
  // Q (max(Lambda, 0) + damping[b] I)^-1 Q^T per block; returns (inverse, sweeps).
  m.def(
      "block_damped_inverse(Tensor blocks, Tensor damping, int max_sweeps, float tol) "
      "-> (Tensor, Tensor)");
  // SINGD step for diagonal factors, in place; see csrc/include/singd_diagonal_step.h.
  m.def(
      "singd_diagonal_step(Tensor(a!) param, Tensor grad, Tensor c, Tensor k, Tensor(b!) buf, "
      "float lr, float momentum, float weight_decay, bool first) -> ()");
  // SINGD factor update of diagonal K, C for many layers, in place; see
  // csrc/include/singd_diagonal_factor_update.h.
  m.def(
      "singd_diagonal_factor_update(Tensor(a!) k, Tensor(b!) c, Tensor(c!)? m_k, Tensor(d!)? m_c, "
      "Tensor u, Tensor g, int[] k_offsets, int[] c_offsets, float damping, float alpha1, "
      "float lr_cov, bool kfac_like) -> ()");
  // SINGD factor update of block-diagonal K, C for many layers, in place; see
  // csrc/include/singd_block_factor_update.h.
  m.def(
      "singd_block_factor_update(Tensor(a!) k, Tensor(b!) c, Tensor(c!)? m_k, Tensor(d!)? m_c, "
      "Tensor u, Tensor g, int[] k_dims, int[] c_dims, int[] k_layer_offsets, "
      "int[] c_layer_offsets, float damping, float alpha1, float lr_cov, bool kfac_like) -> ()");
  // SINGD step for block-diagonal factors, in place; see csrc/include/singd_block_step.h.
  m.def(
      "singd_block_step(Tensor(a!) weight, Tensor weight_grad, Tensor(b!)? bias, "
      "Tensor? bias_grad, Tensor c, int[] c_dims, Tensor k, int[] k_dims, "
      "Tensor(c!) weight_buf, Tensor(d!)? bias_buf, float lr, float momentum, "
      "float weight_decay, bool first) -> ()");
}

namespace {

bool built_with_cuda() {
#ifdef KFAC_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kfac_kernels native extension: ops are registered under torch.ops.kfac_kernels";
  m.def("built_with_cuda", &built_with_cuda,
        "True when the CUDA kernels were compiled into this extension.");
  m.def("built_with_openmp", &kfac_kernels::cpu::with_openmp,
        "True when the CPU kernels were compiled with OpenMP.");
  m.def("openmp_threads", &kfac_kernels::cpu::max_threads,
        "Threads the CPU kernels would use now (OpenMP max threads; 1 without OpenMP).");
  m.def("cpu_isa", &kfac_kernels::cpu::isa,
        "Vector code path the CPU kernels use: 'avx512', 'avx2' or 'generic'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) { return kfac_kernels::cpu::set_isa(name.c_str()); },
      pybind11::arg("name"),
      "Force the CPU code path ('generic', 'avx2', 'avx512') or restore the best one ('auto'). "
      "Returns False, changing nothing, if the name is unknown or this CPU cannot run it.");
}
