// Differential test of the CUDA singd_block_step kernel against the CPU kernel (itself checked
// against the definition by test_singd_block_step): float, double and bfloat16 parameters; odd
// shapes and block sizes up to the kernel's 32 (partial last blocks, blocks of one); with and
// without a bias column; first and accumulating steps, weight decay; NaN and infinities in the
// gradients and parameters (a NaN stays NaN, also through a bfloat16 store and for the device's
// NaN bit patterns); the unused part of every C / K slot holds NaN and must not be read; blocks
// over 32 are refused. Exit status 0: all passed, 1: a failure, 77: no CUDA device.
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_support.h"
#include "singd_block_step.h"

namespace {

using kfac_kernels::SingdBlockStepParams;
using kfac_kernels::StepParamType;

std::vector<int64_t> split(int64_t dim, int64_t b) {  // blocks of b, the remainder last
  std::vector<int64_t> dims(static_cast<size_t>(dim / b), b);
  if (dim % b) dims.push_back(dim % b);
  return dims;
}

template <typename A>
std::vector<A> factor_slots(const std::vector<int64_t>& dims, int64_t ld, Rng& rng) {
  std::vector<A> out(dims.size() * static_cast<size_t>(ld * ld),
                     std::numeric_limits<A>::quiet_NaN());
  for (size_t j = 0; j < dims.size(); ++j)
    for (int64_t r = 0; r < dims[j]; ++r)
      for (int64_t c = 0; c < dims[j]; ++c)
        out[j * static_cast<size_t>(ld * ld) + static_cast<size_t>(r * ld + c)] =
            static_cast<A>((r == c ? 1.0 : 0.0) + 0.2 * rng.uniform());
  return out;
}

struct Shape {
  int64_t rows, cols, bc, bk;
};

template <typename A, bool BF16>
void run_case(const Shape& s, bool bias, bool first, double wd, bool specials, uint64_t seed) {
  using Elem = std::conditional_t<BF16, uint16_t, A>;
  Rng rng(seed);
  const int64_t width = s.cols + (bias ? 1 : 0);
  const std::vector<int64_t> c_dims = split(s.rows, s.bc), k_dims = split(width, s.bk);
  std::vector<int64_t> offsets{0};
  for (int64_t d : c_dims) offsets.push_back(offsets.back() + d);
  offsets.push_back(0);
  for (int64_t d : k_dims) offsets.push_back(offsets.back() + d);
  const std::vector<A> c = factor_slots<A>(c_dims, s.bc, rng), k = factor_slots<A>(k_dims, s.bk, rng);
  auto elem = [](double v) {
    if constexpr (BF16) {
      return bf16_bits(static_cast<float>(v));
    } else {
      return static_cast<A>(v);
    }
  };
  const size_t nw = static_cast<size_t>(s.rows * s.cols), nb = static_cast<size_t>(s.rows);
  std::vector<Elem> w(nw), wg(nw), b(bias ? nb : 0), bg(bias ? nb : 0);
  std::vector<A> wbuf(nw), bbuf(bias ? nb : 0);
  for (auto& v : w) v = elem(rng.uniform());
  for (auto& v : wg) v = elem(rng.uniform());
  for (auto& v : b) v = elem(rng.uniform());
  for (auto& v : bg) v = elem(rng.uniform());
  for (auto& v : wbuf) v = static_cast<A>(rng.uniform());
  for (auto& v : bbuf) v = static_cast<A>(rng.uniform());
  const size_t nan_grad = nw / 2, nan_param = nw - 1;
  if (specials) {
    const A inf = std::numeric_limits<A>::infinity();
    if constexpr (BF16) {
      wg[nan_grad] = 0xffff;  // the device's NaN patterns
      w[nan_param] = 0x7fff;
    } else {
      wg[nan_grad] = std::numeric_limits<A>::quiet_NaN();
      w[nan_param] = -std::numeric_limits<A>::quiet_NaN();
    }
    if (bias) bg[0] = elem(static_cast<double>(-inf));
    wbuf[0] = inf;
  }
  SingdBlockStepParams<A> p;
  p.param_type = BF16 ? StepParamType::kBFloat16 : StepParamType::kSame;
  p.rows = s.rows, p.cols = s.cols;
  p.c_blocks = static_cast<int64_t>(c_dims.size()), p.k_blocks = static_cast<int64_t>(k_dims.size());
  p.bc = s.bc, p.bk = s.bk;
  p.lr = static_cast<A>(0.1), p.momentum = static_cast<A>(0.9);
  p.weight_decay = static_cast<A>(wd), p.first = first;

  std::vector<Elem> want_w = w, want_b = b;
  std::vector<A> want_wbuf = wbuf, want_bbuf = bbuf;
  p.weight = want_w.data(), p.weight_grad = wg.data();
  p.bias = bias ? want_b.data() : nullptr, p.bias_grad = bias ? bg.data() : nullptr;
  p.c = c.data(), p.k = k.data(), p.c_dims = c_dims.data(), p.k_dims = k_dims.data();
  p.weight_buf = want_wbuf.data(), p.bias_buf = bias ? want_bbuf.data() : nullptr;
  kfac_kernels::cpu::singd_block_step<A>(p);

  Elem* d_w = to_device(w);
  Elem* d_wg = to_device(wg);
  Elem* d_b = bias ? to_device(b) : nullptr;
  Elem* d_bg = bias ? to_device(bg) : nullptr;
  A* d_wbuf = to_device(wbuf);
  A* d_bbuf = bias ? to_device(bbuf) : nullptr;
  A* d_c = to_device(c);
  A* d_k = to_device(k);
  int64_t* d_cd = to_device(c_dims);
  int64_t* d_kd = to_device(k_dims);
  int64_t* d_off = to_device(offsets);
  p.weight = d_w, p.weight_grad = d_wg, p.bias = d_b, p.bias_grad = d_bg;
  p.c = d_c, p.k = d_k, p.c_dims = d_cd, p.k_dims = d_kd;
  p.weight_buf = d_wbuf, p.bias_buf = d_bbuf;
  CUDA_OK(kfac_kernels::cuda::singd_block_step<A>(p, d_off, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<Elem> got_w(w.size()), got_b(b.size());
  std::vector<A> got_wbuf(wbuf.size()), got_bbuf(bbuf.size());
  to_host(got_w, d_w);
  to_host(got_wbuf, d_wbuf);
  if (bias) {
    to_host(got_b, d_b);
    to_host(got_bbuf, d_bbuf);
  }
  for (void* ptr : {static_cast<void*>(d_w), static_cast<void*>(d_wg), static_cast<void*>(d_b),
                    static_cast<void*>(d_bg), static_cast<void*>(d_wbuf),
                    static_cast<void*>(d_bbuf), static_cast<void*>(d_c), static_cast<void*>(d_k),
                    static_cast<void*>(d_cd), static_cast<void*>(d_kd), static_cast<void*>(d_off)})
    CUDA_OK(cudaFree(ptr));

  const std::string where =
      std::string(BF16 ? "bfloat16" : sizeof(A) == 8 ? "double" : "float") + " " +
      std::to_string(s.rows) + "x" + std::to_string(s.cols) + " bc=" + std::to_string(s.bc) +
      " bk=" + std::to_string(s.bk) + " bias=" + std::to_string(bias) +
      " first=" + std::to_string(first) + " wd=" + std::to_string(wd) +
      " specials=" + std::to_string(specials);
  // C C^T M K K^T summed in another order than the CPU kernel's
  const double tol = sizeof(A) == 8 ? 1e-13 : 2e-6;
  expect_close(got_wbuf, want_wbuf, tol, "weight buffer", where.c_str());
  expect_close(got_bbuf, want_bbuf, tol, "bias buffer", where.c_str());
  if constexpr (BF16) {
    expect_close(bf16_values(got_w), bf16_values(want_w), 1.0 / 128, "weight", where.c_str());
    expect_close(bf16_values(got_b), bf16_values(want_b), 1.0 / 128, "bias", where.c_str());
  } else {
    expect_close(got_w, want_w, tol, "weight", where.c_str());
    expect_close(got_b, want_b, tol, "bias", where.c_str());
  }
  if (specials) {  // NaN in, NaN out (whatever the CPU kernel does)
    auto is_nan = [](Elem v) {
      if constexpr (BF16) {
        return std::isnan(bf16_value(v));
      } else {
        return std::isnan(v);
      }
    };
    const bool pass = is_nan(got_w[nan_grad]) && is_nan(got_w[nan_param]);
    (pass ? g_passed : g_failed)++;
    if (!pass) std::printf("FAIL NaN inputs give a non-NaN parameter: %s\n", where.c_str());
  }
}

// Blocks over 32 do not fit the kernel's shared tiles: refused before any launch.
void check_block_limit() {
  SingdBlockStepParams<float> p;
  p.rows = 33, p.cols = 33, p.c_blocks = 1, p.k_blocks = 1, p.bc = 33, p.bk = 33;
  const cudaError_t err = kfac_kernels::cuda::singd_block_step<float>(p, nullptr, nullptr);
  const bool pass = err == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess;
  (pass ? g_passed : g_failed)++;
  if (!pass) std::printf("FAIL block size 33: %s\n", cudaGetErrorString(err));
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_visible()) return kNoDevice;
  const bool quick = test_sizes(argc, argv) != Sizes::kFull;
  std::vector<Shape> shapes = {{1, 1, 1, 1},   {7, 8, 3, 4},    {9, 23, 5, 7},
                               {33, 40, 16, 16}, {20, 70, 3, 8}, {40, 95, 32, 32}};
  if (!quick) shapes.push_back({200, 300, 32, 32});
  uint64_t seed = 1;
  for (const Shape& s : shapes)
    for (bool bias : {true, false})
      for (bool first : {false, true})
        for (double wd : {0.0, 0.01}) {
          const bool specials = (seed % 2) == 0;
          run_case<float, false>(s, bias, first, wd, specials, seed++);
          run_case<double, false>(s, bias, first, wd, specials, seed++);
          run_case<float, true>(s, bias, first, wd, !specials, seed++);
        }
  check_block_limit();
  return finish();
}
