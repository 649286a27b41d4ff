// CUDA kernel of block_eigh: batched parallel-order Jacobi, one thread block per matrix.
//
// The matrix (padded to an even order np; the padding row and column are zero and never mix)
// lives in shared memory; the eigenvectors are accumulated in double in a global workspace
// (np x np per block; L2-resident for the sizes served), for the same reason as on the CPU: in
// fp32 every rotation would cost Q about one unit round-off of orthogonality.
//
// A sweep is np - 1 rounds of the round-robin (circle) tournament: in round r pair 0 is
// (r, np - 1) and pair k > 0 is ((r + k) mod (np - 1), (r - k) mod (np - 1)), so the np / 2 pairs
// of a round are disjoint and every pair meets once per sweep. A round:
//   1. one thread per pair computes c, s, t from a_pp, a_qq, a_pq (the stable formulas of
//      csrc/include/block_eigh.h, in double) and the new diagonal a_pp - t a_pq, a_qq + t a_pq;
//   2. column rotations A <- A J, one thread per (row, pair);
//   3. row rotations A <- J^T A, and V <- V J, one thread per (column, pair);
//   4. exact symmetry (0.5 (a_ij + a_ji)), a_pq = 0 and the accurate diagonal.
// Before each sweep the block reduces off(A)^2 (in double, every entry times a power of two that
// brings the block's largest |entry| near 1, so the squares neither underflow nor overflow at any
// scale) and stops at tol * ||A||_F or after max_sweeps sweeps. Then every eigenvalue's rank (ties by index) is its output position, and the
// damped inverse, if asked for, is formed from the double eigenvectors (lower triangle, mirrored).
#include "block_eigh.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kfac_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline double block_sum(double v, double* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += red[w];  // fixed order: deterministic
  return total;
}

__device__ inline double block_max(double v, double* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double m = 0;
  for (int w = 0; w < kThreads / 32; ++w) m = fmax(m, red[w]);
  return m;
}

// 2^-e for the exponent e of amax (clamped so that the power is a double): exact scaling.
__device__ inline double norm_scale(double amax) {
  if (amax == 0) return 1;
  return ldexp(1.0, -min(max(ilogb(amax), -1022), 1023));
}

__device__ inline void pair_of(int k, int r, int m, int* p, int* q) {
  int a, b;
  if (k == 0) {
    a = r;
    b = m;
  } else {
    a = (r + k) % m;
    b = (r - k + m) % m;
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_eigh_kernel(BlockEighParams<T> prm, double* __restrict__ vws, int np) {
  extern __shared__ unsigned char smem_raw[];
  double* cs = reinterpret_cast<double*>(smem_raw);  // per pair: c, s
  double* sn = cs + np / 2;
  double* red = sn + np / 2;                          // kThreads / 32 partial sums
  T* dnew = reinterpret_cast<T*>(red + kThreads / 32);  // per pair: new a_pp, a_qq
  T* a = dnew + np;                                   // np x np

  const int64_t b = blockIdx.x;
  const int n = static_cast<int>(prm.n);
  const int tid = threadIdx.x;
  const T* src = prm.blocks + b * prm.n * prm.n;
  double* v = vws + b * np * np;

  int bad_here = 0;
  double amax = 0;
  for (int e = tid; e < np * np; e += kThreads) {
    const int i = e / np, j = e % np;
    T x = T(0);
    if (i < n && j < n) x = i >= j ? src[i * n + j] : src[j * n + i];
    if (!isfinite(x)) bad_here = 1;
    a[e] = x;
    v[e] = i == j ? 1.0 : 0.0;
    amax = fmax(amax, fabs(static_cast<double>(x)));
  }
  const bool bad = __syncthreads_or(bad_here);
  T* vals = prm.eigenvalues ? prm.eigenvalues + b * n : nullptr;
  T* vecs = prm.eigenvectors ? prm.eigenvectors + b * n * n : nullptr;
  T* inv = prm.inverse ? prm.inverse + b * n * n : nullptr;
  if (bad) {
    const T nan = T(NAN);
    for (int e = tid; e < n * n; e += kThreads) {
      if (vecs) vecs[e] = nan;
      if (inv) inv[e] = nan;
    }
    for (int e = tid; e < n && vals; e += kThreads) vals[e] = nan;
    if (tid == 0 && prm.sweeps) prm.sweeps[b] = -1;
    return;
  }
  // rotations keep ||A||_F: the first scale keeps every later entry below np in scaled units
  const double scale = norm_scale(block_max(amax, red));
  double sq_off = 0, sq_all = 0;
  for (int e = tid; e < np * np; e += kThreads) {  // each thread reads back its own entries
    const double xs = scale * static_cast<double>(a[e]);
    sq_all += xs * xs;
    if (e / np != e % np) sq_off += xs * xs;
  }
  const double target = prm.tol * sqrt(block_sum(sq_all, red));
  double off = sqrt(block_sum(sq_off, red));
  const int m = np - 1, half = np / 2;
  int sweep = 0;
  while (off > target && sweep < prm.max_sweeps) {
    for (int r = 0; r < m; ++r) {
      for (int k = tid; k < half; k += kThreads) {  // 1. rotation parameters
        int p, q;
        pair_of(k, r, m, &p, &q);
        const double app = a[p * np + p], aqq = a[q * np + q], apq = a[p * np + q];
        double t = 0;
        if (apq != 0) {
          const double theta = (aqq - app) / (2 * apq);
          const double at = fabs(theta);
          t = at > 1e100 ? 0.5 / at : 1 / (at + sqrt(at * at + 1));
          if (theta < 0) t = -t;
        }
        const double c = 1 / sqrt(1 + t * t);
        cs[k] = c;
        sn[k] = t * c;
        dnew[2 * k] = static_cast<T>(app - t * apq);
        dnew[2 * k + 1] = static_cast<T>(aqq + t * apq);
      }
      __syncthreads();
      for (int e = tid; e < np * half; e += kThreads) {  // 2. columns: A <- A J
        const int i = e / half, k = e % half;
        int p, q;
        pair_of(k, r, m, &p, &q);
        const T c = static_cast<T>(cs[k]), s = static_cast<T>(sn[k]);
        const T x = a[i * np + p], y = a[i * np + q];
        a[i * np + p] = c * x - s * y;
        a[i * np + q] = s * x + c * y;
      }
      __syncthreads();
      for (int e = tid; e < np * half; e += kThreads) {  // 3. rows: A <- J^T A; V <- V J
        const int j = e / half, k = e % half;
        int p, q;
        pair_of(k, r, m, &p, &q);
        const T c = static_cast<T>(cs[k]), s = static_cast<T>(sn[k]);
        const T x = a[p * np + j], y = a[q * np + j];
        a[p * np + j] = c * x - s * y;
        a[q * np + j] = s * x + c * y;
        const double cd = cs[k], sd = sn[k];
        const double vx = v[j * np + p], vy = v[j * np + q];
        v[j * np + p] = cd * vx - sd * vy;
        v[j * np + q] = sd * vx + cd * vy;
      }
      __syncthreads();
      for (int e = tid; e < np * np; e += kThreads) {  // 4. symmetry, zeros, diagonal
        const int i = e / np, j = e % np;
        if (i > j) {
          const T x = (a[i * np + j] + a[j * np + i]) * T(0.5);
          a[i * np + j] = x;
          a[j * np + i] = x;
        }
      }
      __syncthreads();
      for (int k = tid; k < half; k += kThreads) {
        int p, q;
        pair_of(k, r, m, &p, &q);
        a[p * np + q] = a[q * np + p] = T(0);
        a[p * np + p] = dnew[2 * k];
        a[q * np + q] = dnew[2 * k + 1];
      }
      __syncthreads();
    }
    ++sweep;
    sq_off = 0;
    for (int e = tid; e < np * np; e += kThreads) {
      const int i = e / np, j = e % np;
      const double xs = scale * static_cast<double>(a[e]);
      if (i != j) sq_off += xs * xs;
    }
    off = sqrt(block_sum(sq_off, red));
  }
  if (tid == 0 && prm.sweeps) prm.sweeps[b] = sweep;

  // rank of eigenvalue i among the n real ones, ties by index: its output position
  int* rank = reinterpret_cast<int*>(cs);  // the rotation scratch is free now (np ints fit)
  for (int i = tid; i < n; i += kThreads) {
    const T di = a[i * np + i];
    int rk = 0;
    for (int j = 0; j < n; ++j) {
      const T dj = a[j * np + j];
      rk += (dj < di) || (dj == di && j < i);
    }
    rank[i] = rk;
  }
  __syncthreads();
  if (vals)
    for (int i = tid; i < n; i += kThreads) vals[rank[i]] = a[i * np + i];
  if (vecs)
    for (int e = tid; e < n * n; e += kThreads) {
      const int i = e / n, k = e % n;
      vecs[i * n + rank[k]] = static_cast<T>(v[i * np + k]);
    }
  if (inv) {
    const double gamma = static_cast<double>(prm.damping[b]);
    for (int e = tid; e < n * n; e += kThreads) {
      const int i = e / n, j = e % n;
      if (j > i) continue;
      double acc = 0;
      for (int k = 0; k < n; ++k) {
        const double lam = fmax(static_cast<double>(a[k * np + k]), 0.0);
        acc += v[i * np + k] * v[j * np + k] / (lam + gamma);
      }
      inv[i * n + j] = inv[j * n + i] = static_cast<T>(acc);
    }
  }
}

int padded(int64_t n) { return static_cast<int>(n < 2 ? 2 : n + (n & 1)); }

}  // namespace

size_t block_eigh_workspace_bytes(int64_t batch, int64_t n) {
  const int64_t np = padded(n);
  return static_cast<size_t>(batch * np * np) * sizeof(double);
}

template <typename T>
cudaError_t block_eigh(const BlockEighParams<T>& p, void* workspace, cudaStream_t stream) {
  if (p.n > kBlockEighMaxN) return cudaErrorInvalidValue;
  if (p.batch <= 0) return cudaSuccess;
  if (p.n == 0) {
    return p.sweeps ? cudaMemsetAsync(p.sweeps, 0, p.batch * sizeof(int32_t), stream)
                    : cudaSuccess;
  }
  const int np = padded(p.n);
  const size_t smem = sizeof(double) * (np + kThreads / 32) + sizeof(T) * (np + np * np);
  cudaError_t err = cudaFuncSetAttribute(block_eigh_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  block_eigh_kernel<T><<<static_cast<unsigned>(p.batch), kThreads, smem, stream>>>(
      p, static_cast<double*>(workspace), np);
  return cudaGetLastError();
}

template cudaError_t block_eigh<float>(const BlockEighParams<float>&, void*, cudaStream_t);
template cudaError_t block_eigh<double>(const BlockEighParams<double>&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
