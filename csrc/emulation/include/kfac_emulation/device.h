// Device side of the CUDA emulation: what a kernel sees when its .cu file is compiled as C++ for
// the CPU. Every CUDA thread of a block is a cooperative fiber; the built-in indices are the
// running fiber's; __syncthreads() and the warp operations are barriers over the fibers of the
// block / the lanes of a warp (strict: a barrier that some thread left, by exiting or by waiting
// at another barrier, is reported as a deadlock). Barriers and warp operations take their source
// location (default arguments __builtin_FILE / __builtin_LINE) for those reports.
//
// Floating point follows IEEE-754 round-to-nearest as on the device; the emulated sources are
// compiled with -ffp-contract=off, so only explicit fma / fmaf fuse (nvcc contracts a * b + c into
// fma by default: results may differ from a device's in the last bits, never more).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Shared-memory declarations are rewritten by the emulation's front end (cuda_frontend.py); one it
// did not rewrite fails to compile here rather than silently becoming a per-thread variable.
#define __shared__ __shared__declaration_not_rewritten_by_cuda_frontend

// Built-in indices: set by the scheduler before it resumes a fiber (one OS thread runs one block
// at a time, so thread_local is per block; the fibers of the block share it).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace kfac_kernels {
namespace emulation {

enum class BlockReduce : int { kNone, kOr, kAnd, kCount };
enum class WarpOp : int {
  kSync,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatrix,  // a wmma *_sync operation: the warp converges, no data moves
};

// Barrier of the running block. Returns the reduction of `value` over the block.
int block_barrier(BlockReduce op, int value, const char* file, int line);
// Warp-level operation over the lanes of `mask` (which must contain the caller). Returns the
// caller's result: the value read from the source lane (shuffles), or the mask / predicate.
uint64_t warp_operation(WarpOp op, unsigned mask, uint64_t value, int param, int width,
                        const char* file, int line);
// Lanes of the running thread's warp that exist and have not exited.
unsigned active_lanes();
// Records a fault of the running kernel (a misuse a device would punish with undefined
// behaviour); the launch then fails with a sticky error that names the kernel.
void kernel_fault(const char* file, int line, const char* what);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emulation
}  // namespace kfac_kernels

// ---- barriers and warp operations ---------------------------------------------------------------

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  kfac_kernels::emulation::block_barrier(kfac_kernels::emulation::BlockReduce::kNone, 0, file,
                                         line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return kfac_kernels::emulation::block_barrier(kfac_kernels::emulation::BlockReduce::kOr,
                                                pred != 0, file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return kfac_kernels::emulation::block_barrier(kfac_kernels::emulation::BlockReduce::kAnd,
                                                pred != 0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return kfac_kernels::emulation::block_barrier(kfac_kernels::emulation::BlockReduce::kCount,
                                                pred != 0, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  kfac_kernels::emulation::warp_operation(kfac_kernels::emulation::WarpOp::kSync, mask, 0, 0,
                                          warpSize, file, line);
}
inline unsigned __activemask() { return kfac_kernels::emulation::active_lanes(); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return e::from_bits<T>(
      e::warp_operation(e::WarpOp::kShflIdx, mask, e::to_bits(var), src_lane, width, file, line));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return e::from_bits<T>(e::warp_operation(e::WarpOp::kShflUp, mask, e::to_bits(var),
                                           static_cast<int>(delta), width, file, line));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return e::from_bits<T>(e::warp_operation(e::WarpOp::kShflDown, mask, e::to_bits(var),
                                           static_cast<int>(delta), width, file, line));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return e::from_bits<T>(
      e::warp_operation(e::WarpOp::kShflXor, mask, e::to_bits(var), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return static_cast<unsigned>(
      e::warp_operation(e::WarpOp::kBallot, mask, pred != 0, 0, warpSize, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return static_cast<int>(
      e::warp_operation(e::WarpOp::kAny, mask, pred != 0, 0, warpSize, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  namespace e = kfac_kernels::emulation;
  return static_cast<int>(
      e::warp_operation(e::WarpOp::kAll, mask, pred != 0, 0, warpSize, file, line));
}

// Fences order memory between threads; the fibers of the emulation are sequentially consistent.
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- arithmetic intrinsics ----------------------------------------------------------------------
// Explicitly rounded operations (never contracted: -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __drcp_rn(double a) { return 1.0 / a; }
// Fast approximations on the device; exact here (within their documented error on a device).
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

inline float __uint_as_float(unsigned v) { return kfac_kernels::emulation::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) {
  return static_cast<unsigned>(kfac_kernels::emulation::to_bits(v));
}
inline float __int_as_float(int v) { return __uint_as_float(static_cast<unsigned>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(__float_as_uint(v)); }
inline double __longlong_as_double(long long v) {
  return kfac_kernels::emulation::from_bits<double>(static_cast<uint64_t>(v));
}
inline long long __double_as_longlong(double v) {
  return static_cast<long long>(kfac_kernels::emulation::to_bits(v));
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// min / max as the device's overloads: any two arithmetic types, floating point as fmin / fmax.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmin(C(a), C(b));
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmax(C(a), C(b));
  return C(a) < C(b) ? C(b) : C(a);
}

// Atomics: a fiber is never pre-empted between two barriers, so plain read-modify-writes are
// atomic with respect to the other threads.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
