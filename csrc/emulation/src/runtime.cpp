// Runtime API of the CUDA emulation: one device, memory that is host memory, errors with the
// runtime's rules (see kfac_emulation/runtime.h).
//
// Device memory comes from its own pages, placed so that a buffer ends within 256 bytes of an
// inaccessible page (its start keeps the device's 256-byte alignment): reading or writing past
// the end of an allocation by more than the alignment slack faults at once, and the fault handler
// of scheduler.cpp names the kernel. New allocations are filled with 0xff bytes (NaN / -1), so a
// result the kernel never wrote does not pass for a zero.
//
// Every byte copied from the device to the host goes into a digest (FNV-1a), printed at exit and
// written to the file named by KFAC_KERNELS_CUDA_EMULATION_DIGEST: the kernels are deterministic,
// so runs of one test under different fiber schedules must give the same digest (a race that
// changes any bit of any result shows up, even within a test's tolerances).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "state.h"

#ifndef KFAC_KERNELS_EMULATED_ARCH
#error "compile the CUDA emulation with -DKFAC_KERNELS_EMULATED_ARCH=<800, 900, ...>"
#endif

namespace kfac_kernels {
namespace emulation {
namespace {

constexpr size_t kAlignment = 256;

struct Allocation {
  void* mapping;
  size_t mapping_bytes;
};

std::mutex g_mutex;
std::map<void*, Allocation>& allocations() {
  static std::map<void*, Allocation> m;
  return m;
}
std::map<const void*, int>& attributes() {
  static std::map<const void*, int> m;
  return m;
}
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_sticky_error = cudaSuccess;
uint64_t g_digest = 1469598103934665603ULL;
uint64_t g_digest_bytes = 0;

void digest(const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) g_digest = (g_digest ^ p[i]) * 1099511628211ULL;
  g_digest_bytes += bytes;
}

bool is_device_pointer(const void* ptr) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& all = allocations();
  auto it = all.upper_bound(const_cast<void*>(ptr));
  if (it == all.begin()) return false;
  --it;
  const auto* start = static_cast<const char*>(it->first);
  const auto* end = static_cast<const char*>(it->second.mapping) + it->second.mapping_bytes;
  return static_cast<const char*>(ptr) >= start && static_cast<const char*>(ptr) < end;
}

void report_digest() {
  std::fprintf(stderr, "CUDA emulation: digest of the %llu bytes copied to the host: %016llx\n",
               static_cast<unsigned long long>(g_digest_bytes),
               static_cast<unsigned long long>(g_digest));
  if (const char* path = std::getenv("KFAC_KERNELS_CUDA_EMULATION_DIGEST")) {
    if (FILE* f = std::fopen(path, "w")) {
      std::fprintf(f, "%016llx %llu\n", static_cast<unsigned long long>(g_digest),
                   static_cast<unsigned long long>(g_digest_bytes));
      std::fclose(f);
    }
  }
}

// Returns the sticky error if there is one, else `result`.
cudaError_t status(cudaError_t result) {
  return g_sticky_error != cudaSuccess ? g_sticky_error : result;
}

}  // namespace

const DeviceLimits& device_limits() {
  // Shared memory per block (CUDA C++ Programming Guide, compute capabilities table): 48 KB
  // static (and dynamic without opt-in); with opt-in 163 KB on sm_80, 227 KB on sm_90, 64 KB on
  // sm_75.
  static const DeviceLimits limits = [] {
    constexpr int arch = KFAC_KERNELS_EMULATED_ARCH;
    DeviceLimits l{arch, "", 48 * 1024, 64 * 1024};
    if (arch >= 900) {
      l.name = "emulated sm_90";
      l.shared_per_block_optin = 227 * 1024;
    } else if (arch >= 800) {
      l.name = "emulated sm_80";
      l.shared_per_block_optin = 163 * 1024;
    } else {
      l.name = "emulated sm_75";
    }
    return l;
  }();
  return limits;
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::kForward: return "forward";
    case Schedule::kReverse: return "reverse";
    default: return "random";
  }
}

const Settings& settings() {
  static const Settings s = [] {
    Settings out;
    if (const char* v = std::getenv("KFAC_KERNELS_CUDA_EMULATION_SCHEDULE")) {
      const std::string sched(v);
      if (sched == "forward" || sched.empty()) {
        out.schedule = Schedule::kForward;
      } else if (sched == "reverse") {
        out.schedule = Schedule::kReverse;
      } else if (sched.rfind("random", 0) == 0) {
        out.schedule = Schedule::kRandom;
        if (sched.size() > 7 && sched[6] == ':') out.seed = std::strtoull(sched.c_str() + 7, nullptr, 10);
      } else {
        std::fprintf(stderr,
                     "KFAC_KERNELS_CUDA_EMULATION_SCHEDULE=%s: expected forward, reverse or "
                     "random[:SEED]\n",
                     v);
        std::exit(2);
      }
    }
    if (const char* v = std::getenv("KFAC_KERNELS_CUDA_EMULATION_SKIP_BARRIER")) {
      const std::string site(v);
      const size_t colon = site.rfind(':');
      if (colon == std::string::npos || colon == 0) {
        std::fprintf(stderr, "KFAC_KERNELS_CUDA_EMULATION_SKIP_BARRIER=%s: expected FILE:LINE\n", v);
        std::exit(2);
      }
      out.skip_barrier_file = site.substr(0, colon);
      out.skip_barrier_line = std::atoi(site.c_str() + colon + 1);
    }
    return out;
  }();
  return s;
}

void announce() {
  static bool done = false;
  if (done) return;
  done = true;
  std::atexit(&report_digest);
  const Settings& s = settings();
  std::fprintf(stderr, "CUDA emulation: %s, schedule %s", device_limits().name,
               schedule_name(s.schedule));
  if (s.schedule == Schedule::kRandom) std::fprintf(stderr, " (seed %llu)",
                                                    static_cast<unsigned long long>(s.seed));
  if (!s.skip_barrier_file.empty())
    std::fprintf(stderr, ", __syncthreads() at %s:%d skipped", s.skip_barrier_file.c_str(),
                 s.skip_barrier_line);
  std::fprintf(stderr, "\n");
}

void set_launch_error(cudaError_t error) {
  if (g_last_error == cudaSuccess) g_last_error = error;
}
void set_sticky_error(cudaError_t error) {
  if (g_sticky_error == cudaSuccess) g_sticky_error = error;
  set_launch_error(error);
}
cudaError_t sticky_error() { return g_sticky_error; }

int max_dynamic_shared_attribute(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = attributes().find(kernel);
  return it == attributes().end() ? 0 : it->second;
}

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (g_sticky_error != cudaSuccess) return g_sticky_error;
  if (kernel == nullptr) return cudaErrorInvalidDeviceFunction;
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > device_limits().shared_per_block_optin) {
    std::fprintf(stderr,
                 "CUDA emulation: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) exceeds "
                 "the %zu bytes of a block on %s\n",
                 value, device_limits().shared_per_block_optin, device_limits().name);
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  attributes()[kernel] = value;
  return cudaSuccess;
}

}  // namespace emulation
}  // namespace kfac_kernels

using kfac_kernels::emulation::g_last_error;
using kfac_kernels::emulation::is_device_pointer;
using kfac_kernels::emulation::g_sticky_error;
using kfac_kernels::emulation::status;

cudaError_t cudaGetDeviceCount(int* count) {
  kfac_kernels::emulation::announce();
  if (count == nullptr) return cudaErrorInvalidValue;
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return status(cudaSuccess);
}

cudaError_t cudaSetDevice(int device) {
  return status(device == 0 ? cudaSuccess : cudaErrorInvalidDevice);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return cudaErrorInvalidValue;
  if (device != 0) return cudaErrorInvalidDevice;
  const auto& l = kfac_kernels::emulation::device_limits();
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "%s", l.name);
  prop->major = l.arch / 100;
  prop->minor = (l.arch / 10) % 10;
  prop->multiProcessorCount = 1;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->sharedMemPerBlock = l.static_shared_per_block;
  prop->sharedMemPerBlockOptin = l.shared_per_block_optin;
  prop->warpSize = 32;
  return status(cudaSuccess);
}

cudaError_t cudaDeviceSynchronize() { return status(cudaSuccess); }

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = g_sticky_error;  // a sticky error stays
  return e;
}

cudaError_t cudaPeekAtLastError() { return g_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  using kfac_kernels::emulation::Allocation;
  using kfac_kernels::emulation::kAlignment;
  if (ptr == nullptr) return cudaErrorInvalidValue;
  *ptr = nullptr;
  if (g_sticky_error != cudaSuccess) return g_sticky_error;
  if (bytes == 0) return cudaSuccess;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t data_pages = (bytes + kAlignment + page - 1) / page;
  const size_t mapping_bytes = (data_pages + 1) * page;
  void* m = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  if (m == MAP_FAILED) return cudaErrorMemoryAllocation;
  char* guard = static_cast<char*>(m) + data_pages * page;
  mprotect(guard, page, PROT_NONE);
  auto start = reinterpret_cast<uintptr_t>(guard) - bytes;
  start -= start % kAlignment;
  void* data = reinterpret_cast<void*>(start);
  std::memset(data, 0xff, bytes);
  {
    std::lock_guard<std::mutex> lock(kfac_kernels::emulation::g_mutex);
    kfac_kernels::emulation::allocations()[data] = Allocation{m, mapping_bytes};
  }
  *ptr = data;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return status(cudaSuccess);
  kfac_kernels::emulation::Allocation a{};
  {
    std::lock_guard<std::mutex> lock(kfac_kernels::emulation::g_mutex);
    auto& all = kfac_kernels::emulation::allocations();
    const auto it = all.find(ptr);
    if (it == all.end()) return status(cudaErrorInvalidDevicePointer);
    a = it->second;
    all.erase(it);
  }
  munmap(a.mapping, a.mapping_bytes);
  return status(cudaSuccess);
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (g_sticky_error != cudaSuccess) return g_sticky_error;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
    return cudaErrorInvalidMemcpyDirection;
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  std::memmove(dst, src, bytes);
  if (kind == cudaMemcpyDeviceToHost ||
      (kind == cudaMemcpyDefault && is_device_pointer(src) && !is_device_pointer(dst)))
    kfac_kernels::emulation::digest(dst, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (g_sticky_error != cudaSuccess) return g_sticky_error;
  if (bytes == 0) return cudaSuccess;
  if (ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  return cudaMemset(ptr, value, bytes);
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  if (stream == nullptr) return cudaErrorInvalidValue;
  static char token;
  *stream = reinterpret_cast<cudaStream_t>(&token);
  return status(cudaSuccess);
}

cudaError_t cudaStreamDestroy(cudaStream_t) { return status(cudaSuccess); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return status(cudaSuccess); }
