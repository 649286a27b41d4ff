// Standalone test of the CPU many-layer diagonal SINGD factor update against a per-layer loop in
// long double written from the definition (no torch, no test framework). Exit status 0 when every
// case passes. Covers float and double, INGD/SINGD with and without Riemannian momentum, IKFAC,
// and layers of one entry.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "singd_diagonal_factor_update.h"
#include "test_support.h"

namespace {

double uniform(uint64_t& s) {  // in [0, 1)
  s = s * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
}

template <typename T>
void run_case(bool momentum, bool kfac_like, uint64_t seed) {
  const std::vector<int64_t> d_in = {3, 1, 130}, d_out = {2, 200, 1};
  std::vector<int64_t> k_off = {0}, c_off = {0};
  for (size_t l = 0; l < d_in.size(); ++l) {
    k_off.push_back(k_off.back() + d_in[l]);
    c_off.push_back(c_off.back() + d_out[l]);
  }
  const int64_t nk = k_off.back(), nc = c_off.back();
  std::vector<T> k(nk), c(nc), mk(nk), mc(nc), u(nk), g(nc);
  for (auto& v : k) v = T(0.5 + uniform(seed));
  for (auto& v : c) v = T(0.5 + uniform(seed));
  for (auto& v : mk) v = T(uniform(seed) - 0.5);
  for (auto& v : mc) v = T(uniform(seed) - 0.5);
  for (auto& v : u) v = T(uniform(seed));
  for (auto& v : g) v = T(uniform(seed));
  const long double lam = 0.1L, a1 = 0.5L, beta = 0.05L;
  // expected values, per layer
  std::vector<long double> ek(nk), ec(nc), emk(nk), emc(nc);
  for (size_t l = 0; l < d_in.size(); ++l) {
    long double thk = 0, tkk = 0, thc = 0, tcc = 0;
    for (int64_t j = k_off[l]; j < k_off[l + 1]; ++j) {
      tkk += (long double)k[j] * k[j];
      thk += (long double)k[j] * k[j] * u[j];
    }
    for (int64_t i = c_off[l]; i < c_off[l + 1]; ++i) {
      tcc += (long double)c[i] * c[i];
      thc += (long double)c[i] * c[i] * g[i];
    }
    const long double di = d_in[l], dout = d_out[l];
    const long double ak = kfac_like ? 1 : thc / dout, bk = kfac_like ? lam : lam * tcc / dout;
    const long double ac = kfac_like ? 1 : thk / di, bc = kfac_like ? lam : lam * tkk / di;
    for (int64_t j = k_off[l]; j < k_off[l + 1]; ++j) {
      long double s = 0.5L * (ak * k[j] * k[j] * u[j] + bk * k[j] * k[j] - 1);
      if (momentum) s += a1 * mk[j];
      emk[j] = s;
      ek[j] = k[j] * (1 - beta * s);
    }
    for (int64_t i = c_off[l]; i < c_off[l + 1]; ++i) {
      long double s = 0.5L * (ac * c[i] * c[i] * g[i] + bc * c[i] * c[i] - 1);
      if (momentum) s += a1 * mc[i];
      emc[i] = s;
      ec[i] = c[i] * (1 - beta * s);
    }
  }
  kfac_kernels::SingdDiagonalFactorUpdateParams<T> p;
  p.k = k.data();
  p.c = c.data();
  p.m_k = momentum ? mk.data() : nullptr;
  p.m_c = momentum ? mc.data() : nullptr;
  p.u = u.data();
  p.g = g.data();
  p.k_off = k_off.data();
  p.c_off = c_off.data();
  p.layers = static_cast<int64_t>(d_in.size());
  p.damping = T(0.1);
  p.alpha1 = T(0.5);
  p.lr_cov = T(0.05);
  p.kfac_like = kfac_like;
  kfac_kernels::cpu::singd_diagonal_factor_update<T>(p);
  const long double tol = sizeof(T) == 8 ? 1e-13L : 2e-6L;
  bool ok = true;
  for (int64_t j = 0; j < nk; ++j) {
    ok &= std::fabs(k[j] - ek[j]) <= tol * (1 + std::fabs(ek[j]));
    if (momentum) ok &= std::fabs(mk[j] - emk[j]) <= tol * (1 + std::fabs(emk[j]));
  }
  for (int64_t i = 0; i < nc; ++i) {
    ok &= std::fabs(c[i] - ec[i]) <= tol * (1 + std::fabs(ec[i]));
    if (momentum) ok &= std::fabs(mc[i] - emc[i]) <= tol * (1 + std::fabs(emc[i]));
  }
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s momentum=%d kfac_like=%d\n", sizeof(T) == 8 ? "double" : "float",
                momentum ? 1 : 0, kfac_like ? 1 : 0);
  }
}

}  // namespace

int main() {
  uint64_t seed = 1;
  for (bool momentum : {false, true}) {
    for (bool kfac_like : {false, true}) {
      if (momentum && kfac_like) continue;  // IKFAC has no Riemannian momentum
      run_case<float>(momentum, kfac_like, seed++);
      run_case<double>(momentum, kfac_like, seed++);
    }
  }
  return finish();
}
