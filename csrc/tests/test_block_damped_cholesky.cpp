// Standalone test of the block_damped_cholesky CPU kernel (no torch, no LAPACK): the kernel is
// given a reference ?potrf (unblocked, column-major, uplo "U": what LAPACK computes), and each
// block's factor must satisfy L L^T = A + gamma I with L lower triangular and zeros above the
// diagonal, the upper triangle of the input never read; an indefinite block is all NaN and the
// other blocks are unaffected. Exit status 0 when every case passes.
#include <cmath>
#include <cstdint>
#include <vector>

#include "block_damped_cholesky.h"
#include "block_eigh_corpus.h"  // expect() and the block corpus

namespace {

// Column-major upper Cholesky, a = U^T U, as LAPACK's ?potrf with uplo "U" (info = the order of
// the first non-positive or NaN pivot).
template <typename T>
void reference_potrf(const char* uplo, const int* n_in, T* a, const int* lda_in, int* info) {
  const int n = *n_in, lda = *lda_in;
  *info = 0;
  if (*uplo != 'U') {
    *info = -1;
    return;
  }
  auto at = [&](int r, int c) -> T& { return a[r + c * lda]; };
  for (int j = 0; j < n; ++j) {
    T d = at(j, j);
    for (int k = 0; k < j; ++k) d -= at(k, j) * at(k, j);
    if (!(d > T(0))) {
      *info = j + 1;
      return;
    }
    const T ujj = std::sqrt(d);
    at(j, j) = ujj;
    for (int c = j + 1; c < n; ++c) {
      T s = at(j, c);
      for (int k = 0; k < j; ++k) s -= at(k, j) * at(k, c);
      at(j, c) = s / ujj;
    }
  }
}

template <typename T>
void run(int64_t n, double tol, const char* type) {
  const int64_t batch = 3;  // the corpus: blocks 0 and 2 positive definite, 1 indefinite
  Rng rng(static_cast<uint64_t>(n) + 11);
  std::vector<T> blocks = make_blocks<T>(batch, n, rng), factors(batch * n * n);
  std::vector<T> damping = {T(0.1), T(0), T(0.2)};
  std::vector<double> lower(blocks.begin(), blocks.end());  // what the kernel may read
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) blocks[b * n * n + i * n + j] = T(1e3);  // not read
  kfac_kernels::BlockDampedCholeskyParams<T> p;
  p.blocks = blocks.data();
  p.damping = damping.data();
  p.factors = factors.data();
  p.batch = batch;
  p.n = n;
  p.potrf = &reference_potrf<T>;
  kfac_kernels::cpu::block_damped_cholesky(p);
  for (int64_t b = 0; b < batch; ++b) {
    const T* l = factors.data() + b * n * n;
    if (b == 1) {
      bool all_nan = true;
      for (int64_t i = 0; i < n * n; ++i) all_nan = all_nan && std::isnan(l[i]);
      expect(all_nan, "indefinite block all NaN", n, type, 0.0);
      continue;
    }
    bool upper_zero = true;
    double err = 0, norm = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) upper_zero = upper_zero && l[i * n + j] == T(0);
        double s = 0;
        for (int64_t k = 0; k <= std::min(i, j); ++k) s += double(l[i * n + k]) * l[j * n + k];
        const double a = lower[b * n * n + std::max(i, j) * n + std::min(i, j)] +
                         (i == j ? double(damping[b]) : 0.0);
        err += (s - a) * (s - a);
        norm += a * a;
      }
    expect(upper_zero, "zeros above the diagonal", n, type, 0.0);
    const double rel = std::sqrt(err / norm);
    expect(rel <= tol, "L L^T = A + gamma I", n, type, rel);
  }
}

}  // namespace

int main() {
  for (int64_t n : {2, 7, 33, 64}) {
    run<float>(n, 1e-5, "float");
    run<double>(n, 1e-13, "double");
  }
  return finish();
}
