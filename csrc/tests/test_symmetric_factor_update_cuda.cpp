// Standalone test of the CUDA kernel against the CPU kernel (itself checked against a naive loop
// by test_symmetric_factor_update). Exit status 0: all passed, 1: a failure, 77: no CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cuda_test_support.h"
#include "symmetric_factor_update.h"

namespace {

using kfac_kernels::SymmetricFactorUpdateParams;

// layout 0: row-major, 1: column-major, 2: padded rows + every other column
template <typename T>
void run_case(int64_t batch, int64_t m, int64_t d, int layout, int factor_kind, uint64_t seed) {
  Rng rng(seed);
  int64_t sb, sr, sc;
  if (layout == 0) {
    sc = 1, sr = d, sb = m * d;
  } else if (layout == 1) {
    sr = 1, sc = m, sb = m * d;
  } else {
    sc = 2, sr = 2 * d + 3, sb = m * (2 * d + 3) + 1;
  }
  const int64_t xsize = batch * sb + m * sr + d * sc + 1;
  std::vector<T> x(static_cast<size_t>(xsize));
  for (auto& e : x) e = static_cast<T>(rng.uniform());
  std::vector<T> f;
  const int64_t fsb = d * d + 2, fsr = 1, fsc = d;  // column-major, gaps between batches
  if (factor_kind > 0) {
    f.assign(static_cast<size_t>(batch * fsb + 1), T(0));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = i; j < d; ++j) {
          const T v = static_cast<T>(rng.uniform());
          f[b * fsb + i * fsr + j * fsc] = v;
          f[b * fsb + j * fsr + i * fsc] = factor_kind == 1 ? v : static_cast<T>(rng.uniform());
        }
  }
  SymmetricFactorUpdateParams<T> p;
  p.batch = batch, p.m = m, p.d = d;
  p.x_stride_batch = sb, p.x_stride_row = sr, p.x_stride_col = sc;
  p.factor_stride_batch = fsb, p.factor_stride_row = fsr, p.factor_stride_col = fsc;
  p.decay = static_cast<T>(0.95);
  p.alpha = static_cast<T>(1.0 / (m + 1));

  std::vector<T> want(static_cast<size_t>(batch * d * d));
  p.x = x.data();
  p.factor = factor_kind > 0 ? f.data() : nullptr;
  p.out = want.data();
  kfac_kernels::cpu::symmetric_factor_update<T>(p);

  T* dx = to_device(x);
  T* df = factor_kind > 0 ? to_device(f) : nullptr;
  T* dout = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&dout),
                     std::max<size_t>(want.size(), 1) * sizeof(T)));
  p.x = dx, p.factor = df, p.out = dout;
  const size_t ws_bytes = kfac_kernels::cuda::symmetric_factor_update_workspace_bytes<T>(p);
  void* ws = nullptr;
  if (ws_bytes) CUDA_OK(cudaMalloc(&ws, ws_bytes));
  CUDA_OK(kfac_kernels::cuda::symmetric_factor_update<T>(p, ws, ws_bytes, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> got(want.size());
  if (!got.empty())
    CUDA_OK(cudaMemcpy(got.data(), dout, got.size() * sizeof(T), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  if (df) cudaFree(df);
  cudaFree(dout);
  if (ws) cudaFree(ws);

  const double tol = (sizeof(T) == 4 ? 2e-5 : 1e-13);
  double worst = 0;
  bool symmetric = true;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const size_t e = static_cast<size_t>(b * d * d + i * d + j);
        worst = std::max(worst, std::fabs(static_cast<double>(got[e] - want[e])) /
                                    (1.0 + std::fabs(static_cast<double>(want[e]))));
        if (factor_kind != 2 && !(got[e] == got[static_cast<size_t>(b * d * d + j * d + i)]))
          symmetric = false;
      }
  const bool pass = worst <= tol && symmetric;
  (pass ? g_passed : g_failed)++;
  if (!pass)
    std::printf("FAIL %s batch=%lld m=%lld d=%lld layout=%d factor=%d workspace=%zu: err %.3g%s\n",
                sizeof(T) == 4 ? "float" : "double", static_cast<long long>(batch),
                static_cast<long long>(m), static_cast<long long>(d), layout, factor_kind,
                ws_bytes, worst, symmetric ? "" : " (NOT SYMMETRIC)");
}

template <typename T>
void run_all(bool small) {
  const int64_t shapes[][3] = {{1, 0, 5},    {2, 0, 67},   {1, 7, 1},     {3, 13, 1},
                               {1, 131, 67}, {3, 131, 67}, {1, 129, 128}, {2, 50, 130},
                               {1, 5000, 40}, {2, 3000, 70}, {0, 10, 4},  {1, 40000, 3}};
  uint64_t seed = 1;
  for (const auto& s : shapes) {
    if (small && s[1] >= 3000) continue;
    for (int layout = 0; layout < 3; ++layout)
      for (int fk = 0; fk < 3; ++fk) run_case<T>(s[0], s[1], s[2], layout, fk, seed++);
  }
}

}  // namespace

int main(int argc, char** argv) {  // --quick: every size (quick enough); --small: m < 3000
  if (!device_visible()) return kNoDevice;
  const bool small = test_sizes(argc, argv) == Sizes::kSmall;
  run_all<float>(small);
  run_all<double>(small);
  // More batch elements than the grid's y extent (65535): blocks 0 and 1 also take elements
  // 65535 and 65536, whose rows are staged where the previous element's tile was just read from
  // (shared memory reused across the grid-stride loop over the batch).
  if (!small) run_case<float>(65537, 3, 5, 0, 1, 99);
  return finish();
}
