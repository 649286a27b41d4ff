// Small int64 metadata of a kernel call (block sizes, layer offsets) on a CUDA device, cached by
// value. A layer set's layout is the same at every step, so the first call with a layout copies
// it to the device (one blocking copy) and every later call reuses that copy: no host-to-device
// copy, hence no wait for the host, per call (and a call can be captured in a CUDA graph once the
// layout has been seen). Compiled only with CUDA.
#pragma once

#include <ATen/ops/from_blob.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace kfac_kernels {
namespace glue {

// Layouts kept per process; beyond this many distinct ones (not a training loop's pattern), a
// call copies its metadata as before and says so once.
constexpr size_t kMaxCachedLayouts = 4096;

// The device copy of `values` (int64) on `device`, alive for the rest of the process.
inline at::Tensor device_metadata(const std::vector<int64_t>& values, const c10::Device& device) {
  using Key = std::pair<c10::DeviceIndex, std::vector<int64_t>>;
  // never destroyed: device memory must not be freed after the CUDA runtime has shut down
  static auto* cache = new std::map<Key, at::Tensor>();
  static auto* mutex = new std::mutex();
  Key key{device.index(), values};
  {
    const std::lock_guard<std::mutex> lock(*mutex);
    const auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  at::Tensor copy = at::from_blob(const_cast<int64_t*>(values.data()),
                                  {static_cast<int64_t>(values.size())},
                                  at::TensorOptions().dtype(at::kLong))
                        .to(device);  // blocking: `values` may be freed when this returns
  const std::lock_guard<std::mutex> lock(*mutex);
  if (cache->size() >= kMaxCachedLayouts) {
    TORCH_WARN_ONCE("kfac_kernels: more than ", kMaxCachedLayouts, " distinct layer layouts in "
                    "SINGD kernel calls; their metadata is now copied to the device on every "
                    "call (a host synchronisation each). Reuse the layer sets between steps.");
    return copy;
  }
  return cache->emplace(std::move(key), copy).first->second;
}

}  // namespace glue
}  // namespace kfac_kernels
