// Standalone test of the CPU singd_diagonal_step kernel against a naive loop in long double
// (no torch, no test framework). Exit status 0 when every case passes. Covers float, double and
// bfloat16 parameters, strided rows, first/accumulating steps and weight decay on/off; the
// bfloat16 result must be the round-to-nearest-even of the float result.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "singd_diagonal_step.h"
#include "test_support.h"

namespace {

using kfac_kernels::SingdDiagonalStepParams;
using kfac_kernels::element_type_of;
using kfac_kernels::ElementType;

float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16_rne(float f) {  // reference rounding, written independently
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t lower = u & 0xffffu;
  uint32_t upper = u >> 16;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) upper += 1;
  return static_cast<uint16_t>(upper);
}

void check(bool ok, const char* what, int64_t rows, int64_t cols, bool first, double wd) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s rows=%lld cols=%lld first=%d wd=%g\n", what,
                static_cast<long long>(rows), static_cast<long long>(cols), first ? 1 : 0, wd);
  }
}

template <typename A>
void run_case(int64_t rows, int64_t cols, bool first, double wd, bool bf16, uint64_t seed) {
  Rng rng(seed);
  const int64_t stride = cols + 3;  // strided rows
  const double lr = 0.1, mom = 0.9;
  std::vector<double> p0(rows * cols), g0(rows * cols), b0(rows * cols), c(rows), k(cols);
  for (auto& v : p0) v = rng.uniform();
  for (auto& v : g0) v = rng.uniform();
  for (auto& v : b0) v = rng.uniform();
  for (auto& v : c) v = 0.5 + std::fabs(rng.uniform());
  for (auto& v : k) v = 0.5 + std::fabs(rng.uniform());

  std::vector<A> ca(c.begin(), c.end()), ka(k.begin(), k.end());
  std::vector<A> buf(rows * stride, A(0));
  std::vector<A> param(rows * stride, A(0)), grad(rows * stride, A(0));
  std::vector<uint16_t> pb(rows * stride, 0), gb(rows * stride, 0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t o = i * stride + j;
      buf[o] = static_cast<A>(b0[i * cols + j]);
      if (bf16) {
        pb[o] = float_to_bf16_rne(static_cast<float>(p0[i * cols + j]));
        gb[o] = float_to_bf16_rne(static_cast<float>(g0[i * cols + j]));
      } else {
        param[o] = static_cast<A>(p0[i * cols + j]);
        grad[o] = static_cast<A>(g0[i * cols + j]);
      }
    }
  }
  SingdDiagonalStepParams<A> prm;
  prm.param = bf16 ? static_cast<void*>(pb.data()) : static_cast<void*>(param.data());
  prm.grad = bf16 ? static_cast<const void*>(gb.data()) : static_cast<const void*>(grad.data());
  prm.param_type = bf16 ? ElementType::kBFloat16 : element_type_of<A>;
  prm.c = ca.data();
  prm.k = ka.data();
  prm.buf = buf.data();
  prm.rows = rows;
  prm.cols = cols;
  prm.param_stride_row = prm.grad_stride_row = prm.buf_stride_row = stride;
  prm.lr = static_cast<A>(lr);
  prm.momentum = static_cast<A>(mom);
  prm.weight_decay = static_cast<A>(wd);
  prm.first = first;
  kfac_kernels::cpu::singd_diagonal_step<A>(prm);

  const long double tol = sizeof(A) == 8 ? 1e-13L : 1e-5L;
  bool ok_b = true, ok_p = true, ok_pad = true;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < stride; ++j) {
      const int64_t o = i * stride + j;
      if (j >= cols) {  // padding untouched
        ok_pad &= buf[o] == A(0) && (bf16 ? pb[o] == 0 : param[o] == A(0));
        continue;
      }
      const long double p = bf16 ? bf16_to_float(float_to_bf16_rne(static_cast<float>(
                                       p0[i * cols + j])))
                                 : static_cast<long double>(static_cast<A>(p0[i * cols + j]));
      const long double g = bf16 ? bf16_to_float(float_to_bf16_rne(static_cast<float>(
                                       g0[i * cols + j])))
                                 : static_cast<long double>(static_cast<A>(g0[i * cols + j]));
      const long double cc = static_cast<A>(c[i]), kk = static_cast<A>(k[j]);
      long double d = cc * cc * g * kk * kk + static_cast<long double>(static_cast<A>(wd)) * p;
      const long double bwant =
          first ? d : static_cast<long double>(static_cast<A>(mom)) *
                              static_cast<long double>(static_cast<A>(b0[i * cols + j])) + d;
      const long double pwant = p - static_cast<long double>(static_cast<A>(lr)) * bwant;
      ok_b &= std::fabs(static_cast<long double>(buf[o]) - bwant) <= tol * (1 + std::fabs(bwant));
      if (bf16) {
        // bf16 output: within one bf16 ulp (relative 2^-8) of the exact value, plus the
        // fp32 round-off of the computation
        const long double got = bf16_to_float(pb[o]);
        ok_p &= std::fabs(got - pwant) <= std::ldexp(1.0L, -8) * std::fabs(pwant) + 1e-6L;
      } else {
        ok_p &= std::fabs(static_cast<long double>(param[o]) - pwant) <=
                tol * (1 + std::fabs(pwant));
      }
    }
  }
  check(ok_b, "buffer", rows, cols, first, wd);
  check(ok_p, bf16 ? "bf16 param" : "param", rows, cols, first, wd);
  check(ok_pad, "padding untouched", rows, cols, first, wd);
}

// singd_diagonal_steps over a list gives, entry by entry, the bits of one call per entry.
void run_list_case(uint64_t seed) {
  Rng rng(seed);
  const int64_t shapes[][2] = {{3, 7}, {0, 2}, {17, 70}, {64, 1}};
  std::vector<std::vector<float>> params, grads, bufs, cs, ks;
  std::vector<SingdDiagonalStepParams<float>> list;
  for (const auto& s : shapes) {
    const size_t n = static_cast<size_t>(s[0] * s[1]);
    for (auto* v : {&params, &grads, &bufs}) {
      v->emplace_back(n);
      for (auto& x : v->back()) x = static_cast<float>(rng.uniform());
    }
    cs.emplace_back(static_cast<size_t>(s[0]), 1.5f);
    ks.emplace_back(static_cast<size_t>(s[1]), 0.75f);
    SingdDiagonalStepParams<float> p;
    p.rows = s[0], p.cols = s[1];
    p.param_stride_row = p.grad_stride_row = p.buf_stride_row = s[1];
    p.lr = 0.1f, p.momentum = 0.9f, p.weight_decay = 0.01f;
    p.first = list.size() % 2 == 1;
    list.push_back(p);
  }
  auto point = [&](std::vector<SingdDiagonalStepParams<float>>& l,
                   std::vector<std::vector<float>>& ps, std::vector<std::vector<float>>& bs) {
    for (size_t t = 0; t < l.size(); ++t) {
      l[t].param = ps[t].data(), l[t].grad = grads[t].data(), l[t].buf = bs[t].data();
      l[t].c = cs[t].data(), l[t].k = ks[t].data();
    }
  };
  auto one_params = params, one_bufs = bufs;
  auto one = list;
  point(one, one_params, one_bufs);
  for (const auto& p : one) kfac_kernels::cpu::singd_diagonal_step<float>(p);
  point(list, params, bufs);
  kfac_kernels::cpu::singd_diagonal_steps<float>(list.data(), static_cast<int64_t>(list.size()));
  bool same = true;
  for (size_t t = 0; t < list.size(); ++t) {
    same &= std::memcmp(params[t].data(), one_params[t].data(), params[t].size() * 4) == 0;
    same &= std::memcmp(bufs[t].data(), one_bufs[t].data(), bufs[t].size() * 4) == 0;
  }
  check(same, "list of steps bitwise equal to one call each", 4, 0, false, 0.01);
}

}  // namespace

int main() {
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {17, 70}, {64, 1}, {0, 5}};
  uint64_t seed = 1;
  for (const auto& s : shapes) {
    for (bool first : {false, true}) {
      for (double wd : {0.0, 0.01}) {
        run_case<float>(s[0], s[1], first, wd, false, seed++);
        run_case<double>(s[0], s[1], first, wd, false, seed++);
        run_case<float>(s[0], s[1], first, wd, true, seed++);
      }
    }
  }
  run_list_case(seed++);
  return finish();
}
