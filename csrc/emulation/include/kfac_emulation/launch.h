// Kernel launches and shared memory of the CUDA emulation. The front end (cuda_frontend.py)
// rewrites, line for line,
//     kernel<<<grid, block, smem, stream>>>(args...)
// into   ::kfac_kernels::emulation::launch<kernel>("kernel", __FILE__, __LINE__, grid, block,
//                                                  smem, stream)(args...)
//     __shared__ T name[N];         into   auto& name = ...block_shared<T[N], align>([] {});
//     extern __shared__ T name[];   into   T* const name = ...dynamic_shared<T>();
// as nvcc's own front end lowers the same syntax into runtime calls.
#pragma once

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "device.h"

namespace kfac_kernels {
namespace emulation {

struct LaunchSpec {
  const char* kernel_name = nullptr;  // the instantiated kernel, e.g. "step_kernel<float, true>"
  const char* file = nullptr;         // launch site
  int line = 0;
  const void* kernel = nullptr;       // identity for cudaFuncSetAttribute
  dim3 grid, block;
  size_t dynamic_shared_bytes = 0;
  void (*run_thread)(const void* args) = nullptr;  // calls the kernel with a copy of args
  const void* args = nullptr;
};

// Runs the whole grid (defined in scheduler.cpp); errors go to cudaGetLastError.
void execute(const LaunchSpec& spec);

// Shared memory of the running block: the dynamic part, and a static variable allocated at the
// first request of its declaration in this block (every block starts from fresh memory filled
// with 0xff bytes, so reading shared memory before writing it shows up as NaN or -1).
void* dynamic_shared_memory();
void* static_shared_memory(const void* declaration, size_t bytes, size_t align);

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

// One instantiation per declaration (Site is the type of a lambda written at the declaration,
// unique per declaration and per instantiation of the enclosing template).
template <typename T, size_t Align, typename Site>
T& block_shared(Site) {
  static const char declaration = 0;
  constexpr size_t align = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(static_shared_memory(&declaration, sizeof(T), align));
}

std::string kernel_name_from_signature(const char* pretty_function, const char* fallback);

template <typename F>
struct KernelArgs;
template <typename... P>
struct KernelArgs<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

template <auto Kernel>
class Launcher {
 public:
  Launcher(const char* text, const char* file, int line, dim3 grid, dim3 block, size_t smem,
           cudaStream_t)
      : text_(text), file_(file), line_(line), grid_(grid), block_(block), smem_(smem) {}

  template <typename... A>
  void operator()(A&&... a) const {
    using Args = typename KernelArgs<decltype(Kernel)>::type;
    static_assert(std::tuple_size<Args>::value == sizeof...(A),
                  "a kernel launch must pass every parameter");
    static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__, text_);
    const Args args(std::forward<A>(a)...);
    LaunchSpec spec;
    spec.kernel_name = name.c_str();
    spec.file = file_;
    spec.line = line_;
    spec.kernel = reinterpret_cast<const void*>(Kernel);
    spec.grid = grid_;
    spec.block = block_;
    spec.dynamic_shared_bytes = smem_;
    spec.run_thread = [](const void* p) { std::apply(Kernel, *static_cast<const Args*>(p)); };
    spec.args = &args;
    execute(spec);
  }

 private:
  const char* text_;
  const char* file_;
  int line_;
  dim3 grid_, block_;
  size_t smem_;
};

template <auto Kernel>
Launcher<Kernel> launch(const char* text, const char* file, int line, dim3 grid, dim3 block,
                        size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launcher<Kernel>(text, file, line, grid, block, smem, stream);
}

}  // namespace emulation
}  // namespace kfac_kernels
