// CUDA kernel of block_eigh: batched parallel-order Jacobi, one thread block per matrix.
//
// The matrix (padded to an even order np; the padding row and column are zero and never mix)
// lives in shared memory. The eigenvectors are accumulated in double, for the same reason as on
// the CPU (in fp32 every rotation would cost Q about one unit round-off of orthogonality), as
// V^T (row k is eigenvector k): in shared memory too where A and V^T fit in the device's opt-in
// shared memory per block (fp32 up to n = 128 on sm_90 and 116 on sm_80, fp64 up to n = 118 on
// sm_90 and 100 on sm_80), written to global memory once at the end; otherwise in a global
// workspace (np x (np + 1) doubles per block, L2-resident for the sizes served).
//
// Shared memory without bank conflicts. Both A and V^T are stored with the row stride
// ld = np + 1, which is odd because np is even. Every loop maps consecutive threads (the lanes
// of a warp) to consecutive values of the index that is not a pair member:
//   column rotations  A[i][p], A[i][q]:       lanes run over i, word address i * ld + p;
//   row rotations     A[p][j], A[q][j] and V^T[p][j], V^T[q][j]: lanes run over j, p * ld + j;
//   symmetry          A[i][j] and A[j][i]:    lanes run over j, j * ld + i (the transposed read);
//   outputs           V^T[k][i], V^T[k][j]:   lanes run over k or j.
// For a stride s and 32 lanes at s * l + c, the 4-byte banks (s * l + c) mod 32 are distinct for
// odd s (s is a unit mod 32), so fp32 accesses are 1-way; 8-byte elements are served per
// half-warp, whose 16 lanes touch the words 2 (s l + c) and 2 (s l + c) + 1 of 16 distinct bank
// pairs: 1-way as well. (With the unpadded stride np, a multiple of 32 for n = 64, 96, 128, the
// transposed accesses put all lanes in one bank: 32-way, 16-way in fp64.) The only
// accesses with lanes over the pair index k read and write per-pair arrays indexed by k
// (contiguous): step 4 gathers the next round's a_pp, a_qq, a_pq there, so that no access follows
// the tournament's scattered order (only the one gather before the first round does).
// bench/block_eigh_banks.py counts every pattern for n = 64, 96, 128: 1-way (was 32-way in fp32,
// 16-way in fp64 with the stride np and lanes over the pair index).
//
// A sweep is np - 1 rounds of the round-robin (circle) tournament: in round r pair 0 is
// (r, np - 1) and pair k > 0 is ((r + k) mod (np - 1), (r - k) mod (np - 1)), so the np / 2 pairs
// of a round are disjoint and every pair meets once per sweep. A round:
//   1. one thread per pair computes c, s, t from a_pp, a_qq, a_pq (the stable formulas of
//      csrc/include/block_eigh.h, in double) and the new diagonal a_pp - t a_pq, a_qq + t a_pq;
//      in the first sweeps a pair below the threshold of threshold Jacobi is left as it is
//      (c = 1, s = 0, see the CPU kernel);
//   2. column rotations A <- A J, one thread per (row, pair);
//   3. row rotations A <- J^T A, and V^T <- J^T V^T, one thread per (column, pair);
//   4. exact symmetry (0.5 (a_ij + a_ji)), a_pq = 0 (rotated pairs) and the accurate diagonal,
//      one thread per lower entry; the pair tables of step 1 (partner and slot of every index, this and the next
//      round) tell a thread whether its entry is a pair's.
// Every entry is computed by the same operations in the same order whichever thread computes it
// and wherever V^T lives, so the results do not depend on the storage or the thread mapping.
// Before each sweep the block reduces off(A)^2 (in double, every entry times a power of two that
// brings the block's largest |entry| near 1, so the squares neither underflow nor overflow at any
// scale) and votes whether some pair is still significant against its own diagonal (the test of
// csrc/cpu/block_eigh.cpp: |a_ij| > tol max(sqrt(r_i r_j), tol ||A||_F), r_i the larger of |a_ii|
// now and at the start); it stops when off(A) <= tol * ||A||_F and no pair is significant, or
// after max_sweeps sweeps. Then every eigenvalue's rank
// (ties by index) is its output position, and the damped inverse, if asked for, is formed from
// the double eigenvectors (lower triangle, mirrored).
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

// Called once per block, after the non-finite vote (a barrier) and before any block_sum: nothing
// can still be reading red, so no barrier is needed before the write.
__device__ inline double block_max(double v, double* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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

// Index x's partner in round r, and its slot: k for the smaller member of pair k, half + k for
// the larger one; packed as partner | slot << 8 (np <= 128).
__device__ inline int pair_info(int x, int r, int m, int half) {
  if (x == m) return r | half << 8;
  if (x == r) return m;
  const int d = (x - r + m) % m;
  const int k = d <= half - 1 ? d : m - d;
  const int y = (2 * r - x + 2 * m) % m;
  return y | (x < y ? k : half + k) << 8;
}

// The stopping quantities of this block, after a barrier (every rotation written): off(A) (scaled,
// into *off) and whether some off-diagonal entry is significant against its pair, |a_ij| >
// tol max(sqrt(r_i r_j), floor) with r_i = max(|a_ii|, start_i), all scaled (see the CPU kernel
// for why), and the threshold of the next sweep: 0.2 sum_{i>j} |a_ij| / n^2 (scaled) while
// sweep < kThresholdSweeps, else 0 (threshold Jacobi, see the CPU kernel). Each thread reads its
// own entries; one or two block_sums and one vote.
constexpr int kThresholdSweeps = 3;

template <typename T>
__device__ inline bool pairs_left(const T* a, const T* diag, const T* start, int np, int ld,
                                  int n, double scale, double tol, double floor, int sweep,
                                  double* red, double* off, double* skip) {
  double sq_off = 0, l1 = 0;
  int significant = 0;
  for (int e = static_cast<int>(threadIdx.x); e < np * np; e += kThreads) {
    const int i = e / np, j = e % np;
    if (i == j) continue;
    const double xs = scale * static_cast<double>(a[i * ld + j]);
    sq_off += xs * xs;
    if (i > j) l1 += fabs(xs);
    const double ri = scale * fmax(fabs(static_cast<double>(diag[i])), static_cast<double>(start[i]));
    const double rj = scale * fmax(fabs(static_cast<double>(diag[j])), static_cast<double>(start[j]));
    if (fabs(xs) > tol * fmax(sqrt(ri) * sqrt(rj), floor)) significant = 1;
  }
  *off = sqrt(block_sum(sq_off, red));
  *skip = sweep < kThresholdSweeps ? 0.2 * block_sum(l1, red) / (static_cast<double>(n) * n) : 0.0;
  return __syncthreads_or(significant) != 0;
}

// Shared memory of one block: per pair c and s, the reduction slots, V^T when kept there
// (double); the pair information of this and the next round (int, 2 np); per slot the new and
// the next round's diagonal, per pair the next a_pq, the diagonal by index and its starting
// magnitude, and A (T).
template <typename T>
size_t shared_bytes(int np, bool shared_v) {
  const size_t ld = static_cast<size_t>(np) + 1;
  return sizeof(double) * (np + kThreads / 32 + (shared_v ? np * ld : 0)) +
         sizeof(int) * 2 * np + sizeof(T) * (4 * np + np / 2 + np * ld);
}

template <typename T, bool kSharedV>
__global__ void __launch_bounds__(kThreads)
    block_eigh_kernel(BlockEighParams<T> prm, double* __restrict__ vws, int np) {
  extern __shared__ unsigned char smem_raw[];
  const int ld = np + 1;                              // odd row stride: no bank conflicts
  double* cs = reinterpret_cast<double*>(smem_raw);  // per pair: c, s
  double* sn = cs + np / 2;
  double* red = sn + np / 2;                          // kThreads / 32 partial sums
  double* vt_shared = red + kThreads / 32;            // np x ld when kSharedV
  int* info = reinterpret_cast<int*>(vt_shared + (kSharedV ? np * ld : 0));  // this round
  int* info_next = info + np;                                                // the next round
  T* dnew = reinterpret_cast<T*>(info_next + np);  // by slot: new a_pp (k), a_qq (half + k)
  T* dd = dnew + np;                               // by slot: the next round's a_pp, a_qq
  T* pq = dd + np;                                 // per pair: the next round's a_pq
  T* diag = pq + np / 2;                           // a_ii by index
  T* start = diag + np;                            // |a_ii| of the input, by index
  T* a = start + np;                               // np x ld

  const int64_t b = blockIdx.x;
  const int n = static_cast<int>(prm.n);
  const int tid = threadIdx.x;
  const T* src = prm.blocks + b * prm.n * prm.n;
  double* vt = kSharedV ? vt_shared : vws + b * np * ld;  // V^T: row k is eigenvector k

  int bad_here = 0;
  double amax = 0;
  for (int e = tid; e < np * np; e += kThreads) {
    const int i = e / np, j = e % np;
    T x = T(0);
    if (i < n && j < n) x = i >= j ? src[i * n + j] : src[j * n + i];
    if (!isfinite(x)) bad_here = 1;
    a[i * ld + j] = x;
    if (i == j) {
      diag[i] = x;
      start[i] = x < T(0) ? -x : x;
    }
    vt[i * ld + j] = i == j ? 1.0 : 0.0;
    amax = fmax(amax, fabs(static_cast<double>(x)));
  }
  const bool bad = __syncthreads_or(bad_here);
  const int m = np - 1, half = np / 2;
  for (int k = tid; k < half; k += kThreads) {  // round 0's pair entries (later: by step 4)
    int p, q;
    pair_of(k, 0, m, &p, &q);
    dd[k] = a[p * ld + p];
    dd[half + k] = a[q * ld + q];
    pq[k] = a[p * ld + q];
  }
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
  double sq_all = 0;
  for (int e = tid; e < np * np; e += kThreads) {  // each thread reads back its own entries
    const int i = e / np, j = e % np;
    const double xs = scale * static_cast<double>(a[i * ld + j]);
    sq_all += xs * xs;
  }
  const double target = prm.tol * sqrt(block_sum(sq_all, red));
  double off = 0, skip = 0;
  bool significant =
      pairs_left(a, diag, start, np, ld, n, scale, prm.tol, target, 0, red, &off, &skip);
  int sweep = 0;
  while ((off > target || significant) && sweep < prm.max_sweeps) {
    for (int r = 0; r < m; ++r) {
      for (int k = tid; k < half; k += kThreads) {  // 1. rotation parameters; lanes over k
        const double app = dd[k], aqq = dd[half + k], apq = pq[k];
        double t = 0;  // also for a pair below the threshold: c = 1, s = 0, a_pq kept
        if (apq != 0 && fabs(apq) * scale >= skip) {
          const double theta = (aqq - app) / (2 * apq);
          const double at = fabs(theta);
          t = at > 1e100 ? 0.5 / at : 1 / (at + sqrt(at * at + 1));
          if (theta < 0) t = -t;
        }
        const double c = 1 / sqrt(1 + t * t);
        cs[k] = c;
        sn[k] = t * c;
        dnew[k] = static_cast<T>(app - t * apq);
        dnew[half + k] = static_cast<T>(aqq + t * apq);
      }
      const int r_next = r + 1 < m ? r + 1 : 0;
      for (int x = tid; x < np; x += kThreads) {  // lanes over x
        info[x] = pair_info(x, r, m, half);
        info_next[x] = pair_info(x, r_next, m, half);
      }
      __syncthreads();
      for (int e = tid; e < np * half; e += kThreads) {  // 2. columns: A <- A J; lanes over i
        const int k = e / np, i = e % np;
        int p, q;
        pair_of(k, r, m, &p, &q);
        const T c = static_cast<T>(cs[k]), s = static_cast<T>(sn[k]);
        const T x = a[i * ld + p], y = a[i * ld + q];
        a[i * ld + p] = c * x - s * y;
        a[i * ld + q] = s * x + c * y;
      }
      __syncthreads();
      for (int e = tid; e < np * half; e += kThreads) {  // 3. rows: A <- J^T A, V^T <- J^T V^T
        const int k = e / np, j = e % np;                // lanes over j
        int p, q;
        pair_of(k, r, m, &p, &q);
        const T c = static_cast<T>(cs[k]), s = static_cast<T>(sn[k]);
        const T x = a[p * ld + j], y = a[q * ld + j];
        a[p * ld + j] = c * x - s * y;
        a[q * ld + j] = s * x + c * y;
        const double cd = cs[k], sd = sn[k];
        const double vx = vt[p * ld + j], vy = vt[q * ld + j];
        vt[p * ld + j] = cd * vx - sd * vy;
        vt[q * ld + j] = sd * vx + cd * vy;
      }
      __syncthreads();
      // 4. symmetry, zeros, diagonal; lanes over j. The entries of the next round's pairs are
      // gathered here, where a row's thread holds them, into per-slot arrays: step 1 then reads
      // contiguous words instead of the tournament's scattered diagonal and a_pq.
      for (int e = tid; e < np * np; e += kThreads) {
        const int i = e / np, j = e % np;
        if (i < j) continue;
        const int now = info[j], next = info_next[j];
        T x;
        if (i == j)
          x = dnew[now >> 8];
        else if ((now & 255) == i && sn[now >> 8] != 0.0)  // a rotated pair's a_pq
          x = T(0);
        else
          x = (a[i * ld + j] + a[j * ld + i]) * T(0.5);
        a[i * ld + j] = x;
        if (i == j) {
          diag[i] = x;
          dd[next >> 8] = x;
        } else {
          a[j * ld + i] = x;
          if ((next & 255) == i) pq[next >> 8] = x;  // j < i: j's slot is the pair's k
        }
      }
      __syncthreads();
    }
    ++sweep;
    significant =
        pairs_left(a, diag, start, np, ld, n, scale, prm.tol, target, sweep, red, &off, &skip);
  }
  if (tid == 0 && prm.sweeps) prm.sweeps[b] = sweep;

  // rank of eigenvalue i among the n real ones, ties by index: its output position
  int* rank = reinterpret_cast<int*>(cs);  // the rotation scratch is free now (np ints fit)
  for (int i = tid; i < n; i += kThreads) {
    const T di = diag[i];
    int rk = 0;
    for (int j = 0; j < n; ++j) {
      const T dj = diag[j];
      rk += (dj < di) || (dj == di && j < i);
    }
    rank[i] = rk;
  }
  __syncthreads();
  if (vals)
    for (int i = tid; i < n; i += kThreads) vals[rank[i]] = diag[i];
  if (vecs)
    for (int e = tid; e < n * n; e += kThreads) {  // lanes over k: writes stay in row i
      const int i = e / n, k = e % n;
      vecs[i * n + rank[k]] = static_cast<T>(vt[k * ld + i]);
    }
  if (inv) {
    const double gamma = static_cast<double>(prm.damping[b]);
    for (int e = tid; e < n * n; e += kThreads) {  // lanes over j
      const int i = e / n, j = e % n;
      if (j > i) continue;
      double acc = 0;
      for (int k = 0; k < n; ++k) {
        const double lam = fmax(static_cast<double>(diag[k]), 0.0);
        acc += vt[k * ld + i] * vt[k * ld + j] / (lam + gamma);
      }
      inv[i * n + j] = inv[j * n + i] = static_cast<T>(acc);
    }
  }
}

int padded(int64_t n) { return static_cast<int>(n < 2 ? 2 : n + (n & 1)); }

// Opt-in shared memory per block of the current device (0 if it cannot be read).
int shared_limit() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess)
    return 0;
  return bytes;
}

template <typename T>
bool eigenvectors_in_shared(int64_t n) {
  return shared_bytes<T>(padded(n), true) <= static_cast<size_t>(shared_limit());
}

template <typename T, bool kSharedV>
cudaError_t launch(const BlockEighParams<T>& p, double* workspace, cudaStream_t stream) {
  const int np = padded(p.n);
  const size_t smem = shared_bytes<T>(np, kSharedV);
  cudaError_t err = cudaFuncSetAttribute(block_eigh_kernel<T, kSharedV>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  block_eigh_kernel<T, kSharedV><<<static_cast<unsigned>(p.batch), kThreads, smem, stream>>>(
      p, workspace, np);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
size_t block_eigh_workspace_bytes(int64_t batch, int64_t n) {
  if (batch <= 0 || n == 0 || eigenvectors_in_shared<T>(n)) return 0;
  const int64_t np = padded(n);
  return static_cast<size_t>(batch * np * (np + 1)) * sizeof(double);
}

template <typename T>
cudaError_t block_eigh(const BlockEighParams<T>& p, void* workspace, cudaStream_t stream) {
  if (p.n > kBlockEighMaxN) return cudaErrorInvalidValue;
  if (p.batch <= 0) return cudaSuccess;
  if (p.n == 0) {
    return p.sweeps ? cudaMemsetAsync(p.sweeps, 0, p.batch * sizeof(int32_t), stream)
                    : cudaSuccess;
  }
  if (eigenvectors_in_shared<T>(p.n)) return launch<T, true>(p, nullptr, stream);
  if (workspace == nullptr) return cudaErrorInvalidValue;  // sized on another device
  return launch<T, false>(p, static_cast<double*>(workspace), stream);
}

template size_t block_eigh_workspace_bytes<float>(int64_t, int64_t);
template size_t block_eigh_workspace_bytes<double>(int64_t, int64_t);
template cudaError_t block_eigh<float>(const BlockEighParams<float>&, void*, cudaStream_t);
template cudaError_t block_eigh<double>(const BlockEighParams<double>&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace kfac_kernels
