// Standalone test of the CPU fused block-diagonal SINGD parameter step against the definition
// in long double with dense block-diagonal C C^T and K K^T (no torch, no test framework). Exit
// status 0 when every case passes. Covers float and double accumulation, bfloat16 parameters
// (against the rounded float result), with and without a bias column, first step and momentum.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

#include "singd_block_step.h"
#include "test_support.h"

namespace {

double uniform(uint64_t& s) {  // in [-0.5, 0.5)
  s = s * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0) - 0.5;
}

using LD = long double;

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// dense n x n (X X^T per block) of the packed blocks
std::vector<LD> outer_dense(const std::vector<LD>& x, const std::vector<int64_t>& dims,
                            int64_t ld, int64_t n) {
  std::vector<LD> out(n * n, 0);
  int64_t o = 0;
  for (size_t j = 0; j < dims.size(); ++j) {
    const int64_t d = dims[j];
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < d; ++c) {
        LD s = 0;
        for (int64_t t = 0; t < d; ++t) s += x[j * ld * ld + r * ld + t] * x[j * ld * ld + c * ld + t];
        out[(o + r) * n + o + c] = s;
      }
    o += d;
  }
  return out;
}

std::vector<int64_t> split(int64_t dim, int64_t b) {  // blocks of b, the remainder last
  std::vector<int64_t> dims(dim / b, b);
  if (dim % b) dims.push_back(dim % b);
  return dims;
}

template <typename A, bool BF16>
void run_case(bool bias, bool first, uint64_t seed, int64_t rows = 7, int64_t cols = 8,
              int64_t bc = 3, int64_t bk = 4) {
  const int64_t width = cols + (bias ? 1 : 0);
  const std::vector<int64_t> c_dims = split(rows, bc), k_dims = split(width, bk);
  std::vector<A> c(c_dims.size() * bc * bc, A(0)), k(k_dims.size() * bk * bk, A(0));
  for (size_t j = 0; j < c_dims.size(); ++j)
    for (int64_t r = 0; r < c_dims[j]; ++r)
      for (int64_t q = 0; q < c_dims[j]; ++q)
        c[j * bc * bc + r * bc + q] = A((r == q ? 1.0 : 0.0) + 0.4 * uniform(seed));
  for (size_t j = 0; j < k_dims.size(); ++j)
    for (int64_t r = 0; r < k_dims[j]; ++r)
      for (int64_t q = 0; q < k_dims[j]; ++q)
        k[j * bk * bk + r * bk + q] = A((r == q ? 1.0 : 0.0) + 0.4 * uniform(seed));
  std::vector<LD> p(rows * width), g(rows * width), b(rows * width);
  for (auto& v : p) v = uniform(seed);
  for (auto& v : g) v = uniform(seed);
  for (auto& v : b) v = uniform(seed);
  using Elem = std::conditional_t<BF16, uint16_t, A>;
  std::vector<Elem> w(rows * cols), wg(rows * cols), bs(rows), bsg(rows);
  std::vector<A> wb(rows * cols), bb(rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < width; ++q) {
      const int64_t e = r * width + q;
      if constexpr (BF16) {  // the reference sees the bf16 values
        p[e] = from_bf16(to_bf16(static_cast<float>(p[e])));
        g[e] = from_bf16(to_bf16(static_cast<float>(g[e])));
      }
      b[e] = static_cast<A>(b[e]);
      Elem pv, gv;
      if constexpr (BF16) {
        pv = to_bf16(static_cast<float>(p[e]));
        gv = to_bf16(static_cast<float>(g[e]));
      } else {
        pv = static_cast<A>(p[e]);
        gv = static_cast<A>(g[e]);
        p[e] = pv;
        g[e] = gv;
      }
      if (q < cols) {
        w[r * cols + q] = pv;
        wg[r * cols + q] = gv;
        wb[r * cols + q] = static_cast<A>(b[e]);
      } else {
        bs[r] = pv;
        bsg[r] = gv;
        bb[r] = static_cast<A>(b[e]);
      }
    }
  const std::vector<LD> cl(c.begin(), c.end()), kl(k.begin(), k.end());
  const auto cc = outer_dense(cl, c_dims, bc, rows), kk = outer_dense(kl, k_dims, bk, width);
  const LD lr = 0.1L, mom = 0.9L, wd = 0.01L;
  std::vector<LD> ep(rows * width), eb(rows * width), a1(rows * width, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < width; ++q)
      for (int64_t t = 0; t < rows; ++t) a1[r * width + q] += cc[r * rows + t] * g[t * width + q];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < width; ++q) {
      LD d = 0;
      for (int64_t t = 0; t < width; ++t) d += a1[r * width + t] * kk[t * width + q];
      d += wd * p[r * width + q];
      eb[r * width + q] = first ? d : mom * b[r * width + q] + d;
      ep[r * width + q] = p[r * width + q] - lr * eb[r * width + q];
    }
  kfac_kernels::SingdBlockStepParams<A> prm;
  prm.weight = w.data();
  prm.weight_grad = wg.data();
  prm.bias = bias ? bs.data() : nullptr;
  prm.bias_grad = bias ? bsg.data() : nullptr;
  prm.param_type = BF16 ? kfac_kernels::ElementType::kBFloat16
                        : kfac_kernels::element_type_of<A>;
  prm.c = c.data();
  prm.c_dims = c_dims.data();
  prm.k = k.data();
  prm.k_dims = k_dims.data();
  prm.weight_buf = wb.data();
  prm.bias_buf = bias ? bb.data() : nullptr;
  prm.rows = rows;
  prm.cols = cols;
  prm.c_blocks = static_cast<int64_t>(c_dims.size());
  prm.k_blocks = static_cast<int64_t>(k_dims.size());
  prm.bc = bc;
  prm.bk = bk;
  prm.lr = A(lr);
  prm.momentum = A(mom);
  prm.weight_decay = A(wd);
  prm.first = first;
  kfac_kernels::cpu::singd_block_step<A>(prm);
  const LD tol = sizeof(A) == 8 ? 1e-13L : 2e-6L;
  const LD ptol = BF16 ? 8e-3L : tol;  // bf16 parameters: one rounding of the result
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < width; ++q) {
      const int64_t e = r * width + q;
      LD got_p, got_b;
      if (q < cols) {
        if constexpr (BF16) got_p = from_bf16(w[r * cols + q]); else got_p = w[r * cols + q];
        got_b = wb[r * cols + q];
      } else {
        if constexpr (BF16) got_p = from_bf16(bs[r]); else got_p = bs[r];
        got_b = bb[r];
      }
      ok &= std::fabs(got_p - ep[e]) <= ptol * (1 + std::fabs(ep[e]));
      ok &= std::fabs(got_b - eb[e]) <= tol * (1 + std::fabs(eb[e]));
    }
  std::printf("%s %s%s bias=%d first=%d %lldx%lld bc=%lld bk=%lld\n", ok ? "PASS" : "FAIL",
              sizeof(A) == 8 ? "double" : "float", BF16 ? " (bf16 params)" : "", bias, first,
              static_cast<long long>(rows), static_cast<long long>(cols),
              static_cast<long long>(bc), static_cast<long long>(bk));
  (ok ? g_passed : g_failed)++;
}

}  // namespace

int main() {
  for (const bool bias : {true, false}) {
    for (const bool first : {false, true}) {
      run_case<float, false>(bias, first, 3);
      run_case<double, false>(bias, first, 5);
      run_case<float, true>(bias, first, 9);
    }
  }
  // the unrolled paths for K blocks of 8, 16 and 32 (and partial last blocks)
  const int64_t shapes[][4] = {{33, 40, 16, 16}, {20, 70, 3, 8}, {40, 95, 32, 32}, {9, 23, 5, 7}};
  for (const auto& s : shapes) {
    for (const bool bias : {true, false}) {
      run_case<float, false>(bias, false, 11, s[0], s[1], s[2], s[3]);
      run_case<double, false>(bias, true, 13, s[0], s[1], s[2], s[3]);
      run_case<float, true>(bias, false, 17, s[0], s[1], s[2], s[3]);
    }
  }
  return finish();
}
