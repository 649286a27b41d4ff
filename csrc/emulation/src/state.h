// Internal state shared by the runtime (runtime.cpp) and the scheduler (scheduler.cpp) of the
// CUDA emulation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kfac_emulation/runtime.h"

namespace kfac_kernels {
namespace emulation {

// The device the build emulates (KFAC_KERNELS_EMULATED_ARCH, e.g. 800 for sm_80).
struct DeviceLimits {
  int arch;
  const char* name;
  size_t static_shared_per_block;  // without opt-in, also the limit of static shared memory
  size_t shared_per_block_optin;   // static + dynamic with cudaFuncAttributeMaxDynamicSharedMemorySize
};
const DeviceLimits& device_limits();

// Order in which the fibers of a block (and the blocks of a grid) are resumed.
enum class Schedule { kForward, kReverse, kRandom };

struct Settings {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 1;
  // A __syncthreads() at this site (path suffix, line) does nothing: the barrier-deletion
  // experiment of csrc/emulation/barrier_deletion.py without recompiling.
  std::string skip_barrier_file;
  int skip_barrier_line = 0;
};
// From the environment: KFAC_KERNELS_CUDA_EMULATION_SCHEDULE = forward | reverse | random[:SEED],
// KFAC_KERNELS_CUDA_EMULATION_SKIP_BARRIER = FILE:LINE.
const Settings& settings();
const char* schedule_name(Schedule s);

// Errors. A launch-configuration error is returned (once) by cudaGetLastError; a kernel fault is
// sticky: every later call returns it.
void set_launch_error(cudaError_t error);
void set_sticky_error(cudaError_t error);
cudaError_t sticky_error();

// Value of cudaFuncAttributeMaxDynamicSharedMemorySize for a kernel (0: never set).
int max_dynamic_shared_attribute(const void* kernel);

// Prints the emulated device and schedule once per process (stderr).
void announce();

}  // namespace emulation
}  // namespace kfac_kernels
