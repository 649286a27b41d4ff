// Differential test of the CUDA singd_block_factor_update kernel against the CPU kernel (itself
// checked against the definition by test_singd_block_factor_update): float and double; several
// layers of several blocks in one launch, odd block sizes, blocks smaller than their slot and
// blocks with more entries than the 256 threads of a block; SINGD and IKFAC (kfac_like); with and
// without Riemannian momentum; NaN and infinities in the statistics. The unused part of every slot
// holds NaN and must be neither read (the results would turn NaN) nor written. Exit status 0: all
// passed, 1: a failure, 77: no CUDA device.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_support.h"
#include "singd_block_factor_update.h"

namespace {

using kfac_kernels::SingdBlockFactorUpdateParams;

struct Layer {
  std::vector<int64_t> k_dims, c_dims;
};

struct Config {
  int64_t bk, bc;
  std::vector<Layer> layers;
};

// Slots of ld x ld holding blocks of `dims`; the unused entries NaN. `kind` 0: near the identity
// (factors), 1: symmetric positive (statistics), 2: small (momenta).
template <typename T>
std::vector<T> make_slots(const std::vector<int64_t>& dims, int64_t ld, int kind, Rng& rng) {
  std::vector<T> out(dims.size() * static_cast<size_t>(ld * ld),
                     std::numeric_limits<T>::quiet_NaN());
  for (size_t j = 0; j < dims.size(); ++j) {
    T* b = out.data() + j * static_cast<size_t>(ld * ld);
    const int64_t n = dims[j];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        const double v = rng.uniform();
        if (kind == 0) b[r * ld + c] = static_cast<T>((r == c ? 1.0 : 0.0) + 0.2 * v);
        if (kind == 2) b[r * ld + c] = static_cast<T>(0.05 * v);
        if (kind == 1 && c <= r) {
          b[r * ld + c] = b[c * ld + r] = static_cast<T>((r == c ? 1.0 : 0.0) + 0.3 * v);
        }
      }
  }
  return out;
}

template <typename T>
void run_case(const Config& cfg, bool kfac_like, bool momentum, bool specials, uint64_t seed) {
  Rng rng(seed);
  std::vector<int64_t> k_dims, c_dims, k_layer{0}, c_layer{0};
  for (const Layer& l : cfg.layers) {
    k_dims.insert(k_dims.end(), l.k_dims.begin(), l.k_dims.end());
    c_dims.insert(c_dims.end(), l.c_dims.begin(), l.c_dims.end());
    k_layer.push_back(static_cast<int64_t>(k_dims.size()));
    c_layer.push_back(static_cast<int64_t>(c_dims.size()));
  }
  const int64_t bk = cfg.bk, bc = cfg.bc;
  std::vector<T> k = make_slots<T>(k_dims, bk, 0, rng), c = make_slots<T>(c_dims, bc, 0, rng);
  std::vector<T> u = make_slots<T>(k_dims, bk, 1, rng), g = make_slots<T>(c_dims, bc, 1, rng);
  std::vector<T> m_k = make_slots<T>(k_dims, bk, 2, rng), m_c = make_slots<T>(c_dims, bc, 2, rng);
  size_t nan_block = 0;
  if (specials && cfg.layers.size() >= 2) {
    nan_block = static_cast<size_t>(k_layer[1]);  // first K block of layer 1
    u[nan_block * static_cast<size_t>(bk * bk)] = std::numeric_limits<T>::quiet_NaN();
    g[static_cast<size_t>(c_layer[1]) * static_cast<size_t>(bc * bc)] =
        std::numeric_limits<T>::infinity();
  }
  SingdBlockFactorUpdateParams<T> p;
  p.k_blocks = static_cast<int64_t>(k_dims.size()), p.c_blocks = static_cast<int64_t>(c_dims.size());
  p.bk = bk, p.bc = bc;
  p.layers = static_cast<int64_t>(cfg.layers.size());
  p.damping = static_cast<T>(1e-3), p.alpha1 = static_cast<T>(0.5);
  p.lr_cov = static_cast<T>(0.1), p.kfac_like = kfac_like;

  std::vector<T> want_k = k, want_c = c, want_mk = m_k, want_mc = m_c;
  p.k = want_k.data(), p.c = want_c.data(), p.u = u.data(), p.g = g.data();
  p.m_k = momentum ? want_mk.data() : nullptr, p.m_c = momentum ? want_mc.data() : nullptr;
  p.k_dims = k_dims.data(), p.c_dims = c_dims.data();
  p.k_layer = k_layer.data(), p.c_layer = c_layer.data();
  kfac_kernels::cpu::singd_block_factor_update<T>(p);

  T* d_k = to_device(k);
  T* d_c = to_device(c);
  T* d_u = to_device(u);
  T* d_g = to_device(g);
  T* d_mk = to_device(m_k);
  T* d_mc = to_device(m_c);
  int64_t* d_kd = to_device(k_dims);
  int64_t* d_cd = to_device(c_dims);
  int64_t* d_kl = to_device(k_layer);
  int64_t* d_cl = to_device(c_layer);
  T* d_ws = nullptr;
  const size_t ws = 2 * static_cast<size_t>(p.k_blocks * bk * bk + p.c_blocks * bc * bc);
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d_ws), ws * sizeof(T)));
  p.k = d_k, p.c = d_c, p.u = d_u, p.g = d_g;
  p.m_k = momentum ? d_mk : nullptr, p.m_c = momentum ? d_mc : nullptr;
  p.k_dims = d_kd, p.c_dims = d_cd, p.k_layer = d_kl, p.c_layer = d_cl;
  CUDA_OK(kfac_kernels::cuda::singd_block_factor_update<T>(p, d_ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<T> got_k(k.size()), got_c(c.size()), got_mk(m_k.size()), got_mc(m_c.size());
  to_host(got_k, d_k);
  to_host(got_c, d_c);
  to_host(got_mk, d_mk);
  to_host(got_mc, d_mc);
  for (void* ptr : {static_cast<void*>(d_k), static_cast<void*>(d_c), static_cast<void*>(d_u),
                    static_cast<void*>(d_g), static_cast<void*>(d_mk), static_cast<void*>(d_mc),
                    static_cast<void*>(d_kd), static_cast<void*>(d_cd), static_cast<void*>(d_kl),
                    static_cast<void*>(d_cl), static_cast<void*>(d_ws)})
    CUDA_OK(cudaFree(ptr));

  std::string where = std::string(sizeof(T) == 8 ? "double" : "float") +
                      " bk=" + std::to_string(bk) + " bc=" + std::to_string(bc) + " layers=";
  for (const Layer& l : cfg.layers) {
    where += "[K";
    for (int64_t d : l.k_dims) where += " " + std::to_string(d);
    where += " | C";
    for (int64_t d : l.c_dims) where += " " + std::to_string(d);
    where += "]";
  }
  where += " kfac_like=" + std::to_string(kfac_like) + " momentum=" + std::to_string(momentum) +
           " specials=" + std::to_string(specials);
  // Sums in other orders than the CPU kernel's (block products, tree-reduced traces).
  const double tol = sizeof(T) == 8 ? 1e-13 : 1e-5;
  expect_close(got_k, want_k, tol, "K blocks", where.c_str());
  expect_close(got_c, want_c, tol, "C blocks", where.c_str());
  if (momentum) {
    expect_close(got_mk, want_mk, tol, "m_K", where.c_str());
    expect_close(got_mc, want_mc, tol, "m_C", where.c_str());
  } else {
    expect_close(got_mk, m_k, 0.0, "m_K untouched", where.c_str());
    expect_close(got_mc, m_c, 0.0, "m_C untouched", where.c_str());
  }
  if (specials && cfg.layers.size() >= 2) {
    const bool pass = std::isnan(got_k[nan_block * static_cast<size_t>(bk * bk)]);
    (pass ? g_passed : g_failed)++;
    if (!pass) std::printf("FAIL a NaN statistic gives a non-NaN factor: %s\n", where.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_visible()) return kNoDevice;
  const bool quick = test_sizes(argc, argv) != Sizes::kFull;
  std::vector<Config> configs = {
      {1, 1, {{{1}, {1}}}},
      {5, 3, {{{5, 2}, {3}}, {{1}, {3, 3, 1}}, {{4, 5, 5}, {2}}}},
      {17, 32, {{{17, 17, 4}, {32, 9}}, {{16}, {1}}}},
  };
  if (!quick) {
    configs.push_back({32, 32, {{{32, 32, 32, 32, 32, 32, 32, 7}, {32, 32, 32, 32, 32, 31}}}});
    configs.push_back({24, 8, {{{24}, {8, 8}}, {{3, 24, 24}, {8}}, {{24, 1}, {5, 8, 8, 8}}}});
  }
  uint64_t seed = 1;
  for (const Config& cfg : configs)
    for (bool kfac_like : {false, true})
      for (bool momentum : {false, true})
        for (bool specials : {false, true}) {
          run_case<float>(cfg, kfac_like, momentum, specials, seed++);
          run_case<double>(cfg, kfac_like, momentum, specials, seed++);
        }
  return finish();
}
