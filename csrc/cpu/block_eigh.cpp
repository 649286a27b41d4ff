// CPU kernel of block_eigh: cyclic Jacobi per block, OpenMP across blocks.
//
// Per block the working matrix `a` is the full symmetric n x n matrix (mirrored from the lower
// triangle) and the eigenvectors are accumulated transposed (`vt`, row k = eigenvector k), so a
// rotation of the pair (p, q) updates rows p and q of both arrays: contiguous loops the compiler
// vectorises. The matching column updates of `a` are the mirrored copies of the new rows.
#include "block_eigh.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kfac_kernels {
namespace cpu {
namespace {

// The eigenvectors and the rotation coefficients are kept in double for every T: in fp32 each
// of the ~n^2/2 rotations per sweep would otherwise cost Q about one unit round-off of
// orthogonality (||Q^T Q - I||_2 grew to 3.7e-5 at n = 128, measured), while the matrix itself
// tolerates fp32 (residual ||AQ - Q Lambda||_2 / ||A||_2 stayed near 2e-6).
using V = double;

template <typename T>
struct Scratch {
  std::vector<T> a;
  std::vector<V> vt, acc;
  std::vector<double> start, root;
  std::vector<int64_t> order;
  void resize(int64_t n, bool inverse) {
    a.resize(static_cast<size_t>(n * n));
    vt.resize(static_cast<size_t>(n * n));
    if (inverse) acc.resize(static_cast<size_t>(n * n));
    order.resize(static_cast<size_t>(n));
    start.resize(static_cast<size_t>(n));
    root.resize(static_cast<size_t>(n));
  }
};

// A power of two that brings the largest |entry| of the block near 1. The norms below square
// entries times it, so they neither underflow (a block of 1e-200 in double would look converged
// before its first sweep) nor overflow, whatever the block's scale; a power of two scales
// exactly, so the stopping decision is the one the unscaled norms would give.
template <typename T>
double norm_scale(const T* a, int64_t n) {
  double amax = 0;
  for (int64_t i = 0; i < n * n; ++i) amax = std::max(amax, std::abs(static_cast<double>(a[i])));
  if (amax == 0) return 1;
  return std::ldexp(1.0, -std::min(std::max(std::ilogb(amax), -1022), 1023));
}

// Off-diagonal Frobenius norm and full Frobenius norm of the symmetric a, both times `scale`
// (accumulated in double so the stopping test itself is not limited by fp32 round-off of the
// sum).
template <typename T>
void norms(const T* a, int64_t n, double scale, double* off, double* full) {
  double o = 0, d = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const double x = scale * static_cast<double>(a[i * n + j]);
      o += x * x;
    }
    const double x = scale * static_cast<double>(a[i * n + i]);
    d += x * x;
  }
  *off = std::sqrt(2 * o);
  *full = std::sqrt(2 * o + d);
}

// Whether some off-diagonal entry is still significant against its own pair (scaled units):
//     |a_ij| > tol * max(sqrt(r_i r_j), tol ||A||_F),   r_i = max(|a_ii|, |a_ii at the start|).
// The normwise test alone stops once off(A) <= tol ||A||_F, which leaves the small eigenpairs
// of a graded block (one entry 1e8 times the others) with errors of eps ||A||: 0 sweeps and a
// damped inverse 1e3 times less accurate than LAPACK's. Measured against its own diagonal (Demmel
// & Veselic's relative test) each pair of a graded block is solved to its own scale. The
// starting diagonal in r_i limits that to blocks whose input is graded: the small diagonal of a
// rank-deficient or ill-conditioned block is rounding noise of ||A||, which more sweeps cannot
// make more accurate (it took 30-50% more sweeps for nothing). The floor tol^2 ||A||_F lets
// pairs whose diagonal is zero stop (an indefinite block need not be graded).
template <typename T>
bool pair_significant(const T* a, int64_t n, double scale, double tol, double floor,
                      const double* start, double* root) {
  for (int64_t i = 0; i < n; ++i)
    root[i] = std::sqrt(std::max(std::abs(scale * static_cast<double>(a[i * n + i])), start[i]));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j)
      if (std::abs(scale * static_cast<double>(a[i * n + j])) >
          tol * std::max(root[i] * root[j], floor))
        return true;
  return false;
}

// Threshold Jacobi (Rutishauser; Numerical Recipes' jacobi): in the first kThresholdSweeps
// sweeps a pair is rotated only when |a_pq| >= 0.2 sum_{i>j} |a_ij| / n^2. A huge off-diagonal
// entry (an indefinite block with one 1e7 pair) is then eliminated by its own rotation before
// rotations of small pairs spread it over other rows, where its rounding (eps times it) would
// land in the small eigenpairs: the damped inverse erred by 0.08-0.2 in fp32 and 5e-10 in fp64
// without it (LAPACK: 2e-7, 6e-16), and 2e-8, 2.5e-16 with it. Ordinary blocks take as many
// sweeps as without (measured for n = 8..128).
constexpr int kThresholdSweeps = 3;

template <typename T>
double threshold(const T* a, int64_t n, double scale) {  // scaled units, like the norms
  double l1 = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) l1 += std::abs(scale * static_cast<double>(a[i * n + j]));
  return 0.2 * l1 / static_cast<double>(n * n);
}

// x' = c x - s y, y' = s x + c y over two distinct rows (restrict: the loop vectorises).
template <typename U>
inline void rotate_rows(U* __restrict x, U* __restrict y, int64_t n, U c, U s) {
  for (int64_t r = 0; r < n; ++r) {
    const U xr = x[r], yr = y[r];
    x[r] = c * xr - s * yr;
    y[r] = s * xr + c * yr;
  }
}

// One Jacobi rotation that zeroes a[p][q] (p < q).
template <typename T>
void rotate(T* a, V* vt, int64_t n, int64_t p, int64_t q) {
  T* ap = a + p * n;
  T* aq = a + q * n;
  const T apq = ap[q];
  if (apq == T(0)) return;
  const T app = ap[p], aqq = aq[q];
  // Negligible against both diagonal entries: setting it to zero is within round-off.
  const T g = T(100) * std::abs(apq);
  if (std::abs(app) + g == std::abs(app) && std::abs(aqq) + g == std::abs(aqq)) {
    ap[q] = aq[p] = T(0);
    return;
  }
  const V theta = (V(aqq) - V(app)) / (V(2) * V(apq));
  const V abs_theta = std::abs(theta);  // theta^2 overflows past 1e154: t = 1 / (2 theta) there
  V tv = abs_theta > V(1e100) ? V(0.5) / abs_theta
                              : V(1) / (abs_theta + std::sqrt(abs_theta * abs_theta + V(1)));
  if (theta < V(0)) tv = -tv;
  const V cv = V(1) / std::sqrt(V(1) + tv * tv);
  const V sv = tv * cv;
  const T c = static_cast<T>(cv), s = static_cast<T>(sv), t = static_cast<T>(tv);
  rotate_rows(ap, aq, n, c, s);
  ap[p] = app - t * apq;
  aq[q] = aqq + t * apq;
  ap[q] = aq[p] = T(0);
  // the matching column update of the symmetric matrix is the mirror of the new rows
  for (int64_t r = 0; r < n; ++r) {
    a[r * n + p] = ap[r];
    a[r * n + q] = aq[r];
  }
  rotate_rows(vt + p * n, vt + q * n, n, cv, sv);
}

template <typename T>
void solve_block(const BlockEighParams<T>& p, int64_t b, Scratch<T>& w) {
  const int64_t n = p.n;
  const T* src = p.blocks + b * n * n;
  T* a = w.a.data();
  V* vt = w.vt.data();
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const T v = src[i * n + j];
      finite = finite && std::isfinite(v);
      a[i * n + j] = a[j * n + i] = v;
    }
  }
  T* vals = p.eigenvalues ? p.eigenvalues + b * n : nullptr;
  T* vecs = p.eigenvectors ? p.eigenvectors + b * n * n : nullptr;
  T* inv = p.inverse ? p.inverse + b * n * n : nullptr;
  if (!finite) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    if (vals) std::fill(vals, vals + n, nan);
    if (vecs) std::fill(vecs, vecs + n * n, nan);
    if (inv) std::fill(inv, inv + n * n, nan);
    if (p.sweeps) p.sweeps[b] = -1;
    return;
  }
  std::fill(vt, vt + n * n, V(0));
  for (int64_t i = 0; i < n; ++i) vt[i * n + i] = V(1);

  // rotations keep ||A||_F, so the first scale keeps every later entry below n in scaled units
  const double scale = norm_scale(a, n);
  double off = 0, full = 0;
  norms(a, n, scale, &off, &full);
  const double target = p.tol * full;
  const double tol = p.tol;
  double* start = w.start.data();
  double* root = w.root.data();
  for (int64_t i = 0; i < n; ++i) start[i] = std::abs(scale * static_cast<double>(a[i * n + i]));
  int sweep = 0;
  while ((off > target || pair_significant(a, n, scale, tol, target, start, root)) &&
         sweep < p.max_sweeps) {
    const double skip = sweep < kThresholdSweeps ? threshold(a, n, scale) : 0.0;
    for (int64_t i = 0; i + 1 < n; ++i)
      for (int64_t j = i + 1; j < n; ++j)
        if (std::abs(scale * static_cast<double>(a[i * n + j])) >= skip) rotate(a, vt, n, i, j);
    ++sweep;
    norms(a, n, scale, &off, &full);
  }
  if (p.sweeps) p.sweeps[b] = sweep;

  // ascending order; ties keep their index order (stable), so the output is deterministic
  std::iota(w.order.begin(), w.order.end(), int64_t(0));
  std::stable_sort(w.order.begin(), w.order.end(),
                   [a, n](int64_t x, int64_t y) { return a[x * n + x] < a[y * n + y]; });
  for (int64_t k = 0; k < n; ++k) {
    const int64_t src_k = w.order[k];
    if (vals) vals[k] = a[src_k * n + src_k];
    if (vecs)
      for (int64_t i = 0; i < n; ++i) vecs[i * n + k] = static_cast<T>(vt[src_k * n + i]);
  }
  if (!inv) return;
  // sum_k s_k v_k v_k^T, accumulated in double: the lower triangle, rounded once and mirrored.
  const V gamma = p.damping[b];
  std::vector<V>& acc = w.acc;
  std::fill(acc.begin(), acc.end(), V(0));
  for (int64_t k = 0; k < n; ++k) {
    const V s = V(1) / (std::max(V(a[k * n + k]), V(0)) + gamma);
    const V* v = vt + k * n;
    for (int64_t i = 0; i < n; ++i) {
      const V si = s * v[i];
      V* row = acc.data() + i * n;
      for (int64_t j = 0; j <= i; ++j) row[j] += si * v[j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j)
      inv[i * n + j] = inv[j * n + i] = static_cast<T>(acc[i * n + j]);
}

}  // namespace

template <typename T>
void block_eigh(const BlockEighParams<T>& p) {
  if (p.batch <= 0) return;
  if (p.n == 0) {
    for (int64_t b = 0; b < p.batch && p.sweeps; ++b) p.sweeps[b] = 0;
    return;
  }
#pragma omp parallel if (p.batch > 1)
  {
    Scratch<T> w;
    w.resize(p.n, p.inverse != nullptr);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < p.batch; ++b) solve_block(p, b, w);
  }
}

template void block_eigh<float>(const BlockEighParams<float>&);
template void block_eigh<double>(const BlockEighParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
