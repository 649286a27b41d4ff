// kfac_kernels._C: a small Python module describing the build; loading it registers the native
// kernels of torch.ops.kfac_kernels.
// The CPU and CUDA implementations register themselves in their own files
// (symmetric_factor_update.cpp, symmetric_factor_update_cuda.cpp, patch_covariance.cpp, ...).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "cpu_isa.h"  // csrc/include: cpu::isa, cpu::set_isa, OpenMP

// The op schemas are defined in Python (kfac_kernels/ops/_library.py), so that the fake kernels
// exist without this extension; the files named above only register implementations.

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
