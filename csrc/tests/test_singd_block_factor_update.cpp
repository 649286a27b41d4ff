// Standalone test of the CPU many-layer block-diagonal SINGD factor update against a per-layer
// loop in long double written from the definition (no torch, no test framework). Exit status 0
// when every case passes. Covers float and double, INGD/SINGD with and without Riemannian
// momentum, IKFAC, smaller last blocks and a layer narrower than one block; checks that the
// unused corners of the padded slots are left alone.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "singd_block_factor_update.h"
#include "test_support.h"

namespace {

double uniform(uint64_t& s) {  // in [0, 1)
  s = s * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
}

using LD = long double;

// Expected update of one side of one layer (blocks [j0, j1)), given its coefficients.
void expected_side(std::vector<LD>& x, std::vector<LD>& m, const std::vector<LD>& st,
                   const std::vector<int64_t>& dims, int64_t j0, int64_t j1, int64_t b, LD a,
                   LD bc, LD a1, LD beta, bool momentum) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = dims[j], o = j * b * b;
    std::vector<LD> s(n * n), out(n * n);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        LD h = 0, q = 0;
        for (int64_t p = 0; p < n; ++p)
          for (int64_t t = 0; t < n; ++t) h += x[o + p * b + r] * st[o + p * b + t] * x[o + t * b + c];
        for (int64_t t = 0; t < n; ++t) q += x[o + t * b + r] * x[o + t * b + c];
        LD v = 0.5L * (a * h + bc * q - (r == c ? 1 : 0));
        if (momentum) {
          v += a1 * m[o + r * b + c];
          m[o + r * b + c] = v;
        }
        s[r * n + c] = v;
      }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        LD acc = 0;
        for (int64_t t = 0; t < n; ++t) acc += x[o + r * b + t] * s[t * n + c];
        out[r * n + c] = x[o + r * b + c] - beta * acc;
      }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) x[o + r * b + c] = out[r * n + c];
  }
}

void traces(const std::vector<LD>& x, const std::vector<LD>& st, const std::vector<int64_t>& dims,
            int64_t j0, int64_t j1, int64_t b, LD& th, LD& tq, LD& d) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t n = dims[j], o = j * b * b;
    d += n;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        LD sx = 0;
        for (int64_t t = 0; t < n; ++t) sx += st[o + r * b + t] * x[o + t * b + c];
        th += x[o + r * b + c] * sx;
        tq += x[o + r * b + c] * x[o + r * b + c];
      }
  }
}

template <typename T>
void run_case(bool momentum, bool kfac_like, uint64_t seed) {
  const int64_t bk = 4, bc = 3;
  const std::vector<int64_t> k_dims = {4, 4, 1, 2, 4}, c_dims = {3, 3, 1, 1, 3, 3};
  const std::vector<int64_t> k_layer = {0, 3, 4, 5}, c_layer = {0, 3, 4, 6};
  const int64_t nk = 5 * bk * bk, nc = 6 * bc * bc;
  std::vector<T> k(nk), c(nc), mk(nk), mc(nc), u(nk), g(nc);
  for (auto& v : k) v = T(0.3 * (uniform(seed) - 0.5));
  for (auto& v : c) v = T(0.3 * (uniform(seed) - 0.5));
  for (int64_t j = 0; j < 5; ++j)
    for (int64_t i = 0; i < bk; ++i) k[j * bk * bk + i * bk + i] += T(1);
  for (int64_t j = 0; j < 6; ++j)
    for (int64_t i = 0; i < bc; ++i) c[j * bc * bc + i * bc + i] += T(1);
  for (auto& v : mk) v = T(uniform(seed) - 0.5);
  for (auto& v : mc) v = T(uniform(seed) - 0.5);
  for (auto& v : u) v = T(uniform(seed));
  for (auto& v : g) v = T(uniform(seed));
  std::vector<LD> ek(k.begin(), k.end()), ec(c.begin(), c.end());
  std::vector<LD> emk(mk.begin(), mk.end()), emc(mc.begin(), mc.end());
  const std::vector<LD> lu(u.begin(), u.end()), lg(g.begin(), g.end());
  const LD lam = 0.1L, a1 = 0.5L, beta = 0.05L;
  for (int64_t l = 0; l < 3; ++l) {
    LD thk = 0, tqk = 0, d_i = 0, thc = 0, tqc = 0, d_o = 0;
    traces(ek, lu, k_dims, k_layer[l], k_layer[l + 1], bk, thk, tqk, d_i);
    traces(ec, lg, c_dims, c_layer[l], c_layer[l + 1], bc, thc, tqc, d_o);
    const LD ak = kfac_like ? 1 : thc / d_o, bkc = kfac_like ? lam : lam * tqc / d_o;
    const LD ac = kfac_like ? 1 : thk / d_i, bcc = kfac_like ? lam : lam * tqk / d_i;
    expected_side(ek, emk, lu, k_dims, k_layer[l], k_layer[l + 1], bk, ak, bkc, a1, beta,
                  momentum);
    expected_side(ec, emc, lg, c_dims, c_layer[l], c_layer[l + 1], bc, ac, bcc, a1, beta,
                  momentum);
  }
  const std::vector<T> k0 = k;
  kfac_kernels::SingdBlockFactorUpdateParams<T> p;
  p.k = k.data();
  p.c = c.data();
  p.m_k = momentum ? mk.data() : nullptr;
  p.m_c = momentum ? mc.data() : nullptr;
  p.u = u.data();
  p.g = g.data();
  p.k_dims = k_dims.data();
  p.c_dims = c_dims.data();
  p.k_layer = k_layer.data();
  p.c_layer = c_layer.data();
  p.k_blocks = 5;
  p.c_blocks = 6;
  p.bk = bk;
  p.bc = bc;
  p.layers = 3;
  p.damping = T(lam);
  p.alpha1 = T(a1);
  p.lr_cov = T(beta);
  p.kfac_like = kfac_like;
  kfac_kernels::cpu::singd_block_factor_update<T>(p);
  const LD tol = sizeof(T) == 8 ? 1e-13L : 2e-6L;
  bool ok = true;
  for (int64_t e = 0; e < nk; ++e) {
    ok &= std::fabs(k[e] - ek[e]) <= tol * (1 + std::fabs(ek[e]));
    if (momentum) ok &= std::fabs(mk[e] - emk[e]) <= tol * (1 + std::fabs(emk[e]));
  }
  for (int64_t e = 0; e < nc; ++e) {
    ok &= std::fabs(c[e] - ec[e]) <= tol * (1 + std::fabs(ec[e]));
    if (momentum) ok &= std::fabs(mc[e] - emc[e]) <= tol * (1 + std::fabs(emc[e]));
  }
  // block 2 of K is 1 x 1: the rest of its slot must be untouched
  for (int64_t e = 1; e < bk * bk; ++e) ok &= k[2 * bk * bk + e] == k0[2 * bk * bk + e];
  bool changed = false;
  for (int64_t e = 0; e < nk; ++e) changed |= k[e] != k0[e];
  ok &= changed;
  std::printf("%s %s momentum=%d kfac_like=%d\n", ok ? "PASS" : "FAIL",
              sizeof(T) == 8 ? "double" : "float", momentum, kfac_like);
  (ok ? g_passed : g_failed)++;
}

}  // namespace

int main() {
  for (const auto& mk : {std::pair<bool, bool>{true, false}, {false, false}, {false, true}}) {
    run_case<float>(mk.first, mk.second, 7);
    run_case<double>(mk.first, mk.second, 11);
  }
  return finish();
}
