// Differential test of the CUDA singd_diagonal_factor_update kernel against the CPU kernel
// (itself checked against the definition by test_singd_diagonal_factor_update): float and double;
// many layers of odd sizes in one launch (one entry, fewer and more entries than the 256 threads of
// a block); SINGD and IKFAC (kfac_like); with and without Riemannian momentum; NaN and infinities
// in the statistics (a NaN stays NaN, and stays in its layer). Exit status 0: all passed, 1: a
// failure, 77: no CUDA device.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_support.h"
#include "singd_diagonal_factor_update.h"

namespace {

using kfac_kernels::SingdDiagonalFactorUpdateParams;

struct Layer {
  int64_t d_in, d_out;
};

template <typename T>
void run_case(const std::vector<Layer>& layers, bool kfac_like, bool momentum, bool specials,
              uint64_t seed) {
  Rng rng(seed);
  std::vector<int64_t> k_off{0}, c_off{0};
  for (const Layer& l : layers) {
    k_off.push_back(k_off.back() + l.d_in);
    c_off.push_back(c_off.back() + l.d_out);
  }
  const size_t nk = static_cast<size_t>(k_off.back()), nc = static_cast<size_t>(c_off.back());
  std::vector<T> k(nk), c(nc), u(nk), g(nc), m_k(nk), m_c(nc);
  for (auto& v : k) v = static_cast<T>(1.0 + 0.5 * rng.uniform());
  for (auto& v : c) v = static_cast<T>(1.0 + 0.5 * rng.uniform());
  for (auto& v : u) v = static_cast<T>(0.5 + 0.5 * rng.uniform());
  for (auto& v : g) v = static_cast<T>(0.5 + 0.5 * rng.uniform());
  for (auto& v : m_k) v = static_cast<T>(0.1 * rng.uniform());
  for (auto& v : m_c) v = static_cast<T>(0.1 * rng.uniform());
  size_t nan_at = 0;
  if (specials && layers.size() >= 3) {
    nan_at = static_cast<size_t>(k_off[1] + layers[1].d_in / 2);
    u[nan_at] = std::numeric_limits<T>::quiet_NaN();  // layer 1
    g[static_cast<size_t>(c_off[2])] = std::numeric_limits<T>::infinity();  // layer 2
  }
  SingdDiagonalFactorUpdateParams<T> p;
  p.layers = static_cast<int64_t>(layers.size());
  p.damping = static_cast<T>(1e-3), p.alpha1 = static_cast<T>(0.5);
  p.lr_cov = static_cast<T>(0.1), p.kfac_like = kfac_like;

  std::vector<T> want_k = k, want_c = c, want_mk = m_k, want_mc = m_c;
  p.k = want_k.data(), p.c = want_c.data(), p.u = u.data(), p.g = g.data();
  p.m_k = momentum ? want_mk.data() : nullptr, p.m_c = momentum ? want_mc.data() : nullptr;
  p.k_off = k_off.data(), p.c_off = c_off.data();
  kfac_kernels::cpu::singd_diagonal_factor_update<T>(p);

  T* d_k = to_device(k);
  T* d_c = to_device(c);
  T* d_u = to_device(u);
  T* d_g = to_device(g);
  T* d_mk = to_device(m_k);
  T* d_mc = to_device(m_c);
  int64_t* d_koff = to_device(k_off);
  int64_t* d_coff = to_device(c_off);
  p.k = d_k, p.c = d_c, p.u = d_u, p.g = d_g;
  p.m_k = momentum ? d_mk : nullptr, p.m_c = momentum ? d_mc : nullptr;
  p.k_off = d_koff, p.c_off = d_coff;
  CUDA_OK(kfac_kernels::cuda::singd_diagonal_factor_update<T>(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> got_k(nk), got_c(nc), got_mk(nk), got_mc(nc);
  to_host(got_k, d_k);
  to_host(got_c, d_c);
  to_host(got_mk, d_mk);
  to_host(got_mc, d_mc);
  for (void* ptr : {static_cast<void*>(d_k), static_cast<void*>(d_c), static_cast<void*>(d_u),
                    static_cast<void*>(d_g), static_cast<void*>(d_mk), static_cast<void*>(d_mc),
                    static_cast<void*>(d_koff), static_cast<void*>(d_coff)})
    CUDA_OK(cudaFree(ptr));

  std::string where = std::string(sizeof(T) == 8 ? "double" : "float") + " layers=";
  for (const Layer& l : layers) where += std::to_string(l.d_in) + "x" + std::to_string(l.d_out) + ",";
  where += " kfac_like=" + std::to_string(kfac_like) + " momentum=" + std::to_string(momentum) +
           " specials=" + std::to_string(specials);
  // The block sums its traces in a tree, the CPU kernel in order: a few units of round-off of
  // the traces, scaled by lr_cov in the update.
  const double tol = sizeof(T) == 8 ? 1e-14 : 2e-6;
  expect_close(got_k, want_k, tol, "k", where.c_str());
  expect_close(got_c, want_c, tol, "c", where.c_str());
  if (momentum) {
    expect_close(got_mk, want_mk, tol, "m_k", where.c_str());
    expect_close(got_mc, want_mc, tol, "m_c", where.c_str());
  } else {
    expect_close(got_mk, m_k, 0.0, "m_k untouched", where.c_str());
    expect_close(got_mc, m_c, 0.0, "m_c untouched", where.c_str());
  }
  if (specials && layers.size() >= 3) {
    const bool pass = std::isnan(got_k[nan_at]);
    (pass ? g_passed : g_failed)++;
    if (!pass) std::printf("FAIL a NaN statistic gives a non-NaN factor: %s\n", where.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_visible()) return kNoDevice;
  const bool quick = test_sizes(argc, argv) != Sizes::kFull;
  std::vector<std::vector<Layer>> sets = {
      {{1, 1}},
      {{3, 5}, {300, 7}, {17, 513}, {256, 257}},
  };
  if (!quick) sets.push_back({{2000, 1500}, {1, 4097}, {777, 3}});
  uint64_t seed = 1;
  for (const auto& layers : sets)
    for (bool kfac_like : {false, true})
      for (bool momentum : {false, true})
        for (bool specials : {false, true}) {
          run_case<float>(layers, kfac_like, momentum, specials, seed++);
          run_case<double>(layers, kfac_like, momentum, specials, seed++);
        }
  return finish();
}
