// CPU kernel of the many-layer block-diagonal SINGD factor update (torch-free); see
// csrc/include/singd_block_factor_update.h. Blocks run in parallel (OpenMP) in two passes: the
// per-block traces, then (after the per-layer sums, in block order) the block updates.
#include "singd_block_factor_update.h"

#include <vector>

#include "singd_formulas.h"

namespace kfac_kernels {
namespace cpu {
namespace {

// H = B^T U B and Q = B^T B of one n x n block (leading dimension ld), into h and q (n x n).
template <typename T>
void block_products(const T* b, const T* u, int64_t n, int64_t ld, T* ub, T* h, T* q) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t t = 0; t < n; ++t) s += u[i * ld + t] * b[t * ld + j];
      ub[i * n + j] = s;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sh = 0, sq = 0;
      for (int64_t t = 0; t < n; ++t) {
        sh += b[t * ld + i] * ub[t * n + j];
        sq += b[t * ld + i] * b[t * ld + j];
      }
      h[i * n + j] = sh;
      q[i * n + j] = sq;
    }
  }
}

template <typename T>
void traces(const T* x, const T* stat, const int64_t* dims, int64_t blocks, int64_t ld,
            T* tr_h, T* tr_q) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (blocks > 1)
#endif
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t n = dims[j];
    std::vector<T> ub(n * n), h(n * n), q(n * n);
    block_products(x + j * ld * ld, stat + j * ld * ld, n, ld, ub.data(), h.data(), q.data());
    T th = 0, tq = 0;
    for (int64_t i = 0; i < n; ++i) {
      th += h[i * n + i];
      tq += q[i * n + i];
    }
    tr_h[j] = th;
    tr_q[j] = tq;
  }
}

template <typename T>
void update(T* x, T* m, const T* stat, const int64_t* dims, const int64_t* layer_of,
            int64_t blocks, int64_t ld, const std::vector<T>& a, const std::vector<T>& bcoef,
            T alpha1, T lr_cov) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (blocks > 1)
#endif
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t n = dims[j];
    T* b = x + j * ld * ld;
    std::vector<T> ub(n * n), h(n * n), q(n * n), s(n * n), out(n * n);
    block_products(b, stat + j * ld * ld, n, ld, ub.data(), h.data(), q.data());
    const T aa = a[layer_of[j]], bb = bcoef[layer_of[j]];
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t col = 0; col < n; ++col) {
        T* mm = m != nullptr ? m + j * ld * ld + r * ld + col : nullptr;
        s[r * n + col] =
            singd::factor_direction(aa, h[r * n + col], bb, q[r * n + col], r == col, alpha1, mm);
      }
    }
    // B (I - lr_cov S) = B - lr_cov B S
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t col = 0; col < n; ++col) {
        T acc = 0;
        for (int64_t t = 0; t < n; ++t) acc += b[r * ld + t] * s[t * n + col];
        out[r * n + col] = b[r * ld + col] - lr_cov * acc;
      }
    }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t col = 0; col < n; ++col) b[r * ld + col] = out[r * n + col];
  }
}

std::vector<int64_t> layer_of_blocks(const int64_t* offsets, int64_t layers) {
  std::vector<int64_t> out(offsets[layers]);
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t j = offsets[l]; j < offsets[l + 1]; ++j) out[j] = l;
  return out;
}

}  // namespace

template <typename T>
void singd_block_factor_update(const SingdBlockFactorUpdateParams<T>& p) {
  std::vector<T> hk(p.k_blocks), qk(p.k_blocks), hc(p.c_blocks), qc(p.c_blocks);
  traces(p.k, p.u, p.k_dims, p.k_blocks, p.bk, hk.data(), qk.data());
  traces(p.c, p.g, p.c_dims, p.c_blocks, p.bc, hc.data(), qc.data());
  std::vector<T> a_k(p.layers), b_k(p.layers), a_c(p.layers), b_c(p.layers);
  for (int64_t l = 0; l < p.layers; ++l) {
    T thk = 0, tqk = 0, thc = 0, tqc = 0, d_i = 0, d_o = 0;
    for (int64_t j = p.k_layer[l]; j < p.k_layer[l + 1]; ++j) {
      thk += hk[j];
      tqk += qk[j];
      d_i += static_cast<T>(p.k_dims[j]);
    }
    for (int64_t j = p.c_layer[l]; j < p.c_layer[l + 1]; ++j) {
      thc += hc[j];
      tqc += qc[j];
      d_o += static_cast<T>(p.c_dims[j]);
    }
    const auto co = singd::factor_coefficients(thk, tqk, d_i, thc, tqc, d_o, p.damping,
                                               p.kfac_like);
    a_k[l] = co.a_k;
    b_k[l] = co.b_k;
    a_c[l] = co.a_c;
    b_c[l] = co.b_c;
  }
  const auto k_layer_of = layer_of_blocks(p.k_layer, p.layers);
  const auto c_layer_of = layer_of_blocks(p.c_layer, p.layers);
  update(p.k, p.m_k, p.u, p.k_dims, k_layer_of.data(), p.k_blocks, p.bk, a_k, b_k, p.alpha1,
         p.lr_cov);
  update(p.c, p.m_c, p.g, p.c_dims, c_layer_of.data(), p.c_blocks, p.bc, a_c, b_c, p.alpha1,
         p.lr_cov);
}

template void singd_block_factor_update<float>(const SingdBlockFactorUpdateParams<float>&);
template void singd_block_factor_update<double>(const SingdBlockFactorUpdateParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
