// Standalone test of the block_eigh CPU kernel (no torch, no test framework): eigen residual
// ||A Q - Q Lambda||_F / ||A||_F, orthogonality ||Q^T Q - I||_F, ascending order, the damped
// inverse against (A + gamma I) X = I, exact symmetry, and a NaN block confined to itself.
// Exit status 0 when every case passes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "block_eigh.h"
#include "block_eigh_corpus.h"

namespace {

template <typename T>
void run(int64_t n, double tol, const char* type) {
  const int64_t batch = 4;
  Rng rng(static_cast<uint64_t>(n) + 7);
  std::vector<T> blocks = make_blocks<T>(batch, n, rng);
  blocks[2 * n * n + (n - 1) * n] = std::numeric_limits<T>::quiet_NaN();  // block 2: lower tri
  std::vector<T> vals(batch * n), vecs(batch * n * n), inv(batch * n * n), damping(batch, T(0.5));
  std::vector<int32_t> sweeps(batch);
  kfac_kernels::BlockEighParams<T> p;
  p.blocks = blocks.data();
  p.batch = batch;
  p.n = n;
  p.eigenvalues = vals.data();
  p.eigenvectors = vecs.data();
  p.sweeps = sweeps.data();
  p.max_sweeps = 30;
  p.tol = std::numeric_limits<T>::epsilon();
  kfac_kernels::cpu::block_eigh(p);
  p.eigenvalues = nullptr;
  p.eigenvectors = nullptr;
  p.damping = damping.data();
  p.inverse = inv.data();
  kfac_kernels::cpu::block_eigh(p);
  for (int64_t b = 0; b < batch; ++b) {
    const T* a = blocks.data() + b * n * n;
    const T* q = vecs.data() + b * n * n;
    const T* l = vals.data() + b * n;
    const T* x = inv.data() + b * n * n;
    if (b == 2) {
      bool all_nan = sweeps[b] == -1;
      for (int64_t i = 0; i < n * n; ++i) all_nan = all_nan && std::isnan(q[i]) && std::isnan(x[i]);
      expect(all_nan, "NaN block confined", n, type, 0.0);
      continue;
    }
    auto sym = [&](int64_t i, int64_t j) { return double(i >= j ? a[i * n + j] : a[j * n + i]); };
    double res = 0, orth = 0, norm = 0, inv_err = 0, asym = 0;
    bool ascending = true;
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0) ascending = ascending && l[i - 1] <= l[i];
      for (int64_t k = 0; k < n; ++k) {
        double aq = 0, qq = 0, ax = 0;
        for (int64_t r = 0; r < n; ++r) {
          aq += sym(i, r) * q[r * n + k];
          qq += double(q[r * n + i]) * q[r * n + k];
          ax += (sym(i, r) + (i == r ? 0.5 : 0.0)) * x[r * n + k];
        }
        res += std::pow(aq - double(q[i * n + k]) * l[k], 2);
        orth += std::pow(qq - (i == k ? 1.0 : 0.0), 2);
        inv_err += std::pow(ax - (i == k ? 1.0 : 0.0), 2);
        norm += sym(i, k) * sym(i, k);
        asym += x[i * n + k] != x[k * n + i];
      }
    }
    res = std::sqrt(res) / std::max(std::sqrt(norm), 1e-300);
    expect(res <= tol, "residual", n, type, res);
    expect(std::sqrt(orth) <= tol, "orthogonality", n, type, std::sqrt(orth));
    expect(ascending, "ascending", n, type, 0.0);
    expect(asym == 0, "inverse exactly symmetric", n, type, asym);
    if (b % 2 == 0)  // SPD: (A + 0.5 I) X = I
      expect(std::sqrt(inv_err) <= 100 * tol, "damped inverse", n, type, std::sqrt(inv_err));
    expect(sweeps[b] >= 0 && sweeps[b] <= 30, "sweeps", n, type, sweeps[b]);
  }
}

}  // namespace

int main() {
  for (int64_t n : {1, 2, 3, 8, 17, 40}) {
    run<float>(n, 1e-5, "float");
    run<double>(n, 1e-10, "double");
  }
  return finish();
}
