// Differential test of the CUDA singd_diagonal_step kernel against the CPU kernel (itself checked
// against the definition by test_singd_diagonal_step): float, double and bfloat16 parameters;
// odd shapes (one row, one column, partial thread blocks, many rows on grid.y); different row
// strides for the parameter, the gradient and the buffer (the padding must stay untouched); first
// and accumulating steps, weight decay; NaN and infinities in every input (a NaN stays NaN, also
// through a bfloat16 store and for the device's NaN bit patterns 0x7fff / 0xffff); and the grid.y
// limit. The many-parameter launcher (singd_diagonal_steps): lists of up to 53 entries (several
// launches) of mixed shapes and element types against the CPU kernel. Exit status 0: all passed,
// 1: a failure, 77: no CUDA device.
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_support.h"
#include "singd_diagonal_step.h"

namespace {

using kfac_kernels::SingdDiagonalStepParams;
using kfac_kernels::element_type_of;
using kfac_kernels::ElementType;

// specials: 0 finite inputs; 1 NaN and infinities in the gradient, the parameter, c and k.
template <typename A, bool BF16>
void run_case(int64_t rows, int64_t cols, bool first, double wd, int specials, uint64_t seed) {
  using Elem = std::conditional_t<BF16, uint16_t, A>;
  Rng rng(seed);
  const int64_t sp = cols + 5, sg = cols + 2, sb = cols + 1;  // row strides
  std::vector<Elem> param(static_cast<size_t>(rows * sp)), grad(static_cast<size_t>(rows * sg));
  std::vector<A> buf(static_cast<size_t>(rows * sb)), c(static_cast<size_t>(rows)),
      k(static_cast<size_t>(cols));
  auto elem = [](double v) {
    if constexpr (BF16) {
      return bf16_bits(static_cast<float>(v));
    } else {
      return static_cast<A>(v);
    }
  };
  for (auto& v : param) v = elem(rng.uniform());
  for (auto& v : grad) v = elem(rng.uniform());
  for (auto& v : buf) v = static_cast<A>(rng.uniform());
  for (auto& v : c) v = static_cast<A>(0.5 + std::fabs(rng.uniform()));
  for (auto& v : k) v = static_cast<A>(0.5 + std::fabs(rng.uniform()));
  if (specials) {
    const A inf = std::numeric_limits<A>::infinity(), nan = std::numeric_limits<A>::quiet_NaN();
    const int64_t i = rows / 2, j = cols / 2;
    if constexpr (BF16) {
      grad[static_cast<size_t>(i * sg + j)] = 0x7fc0;             // NaN (CPU pattern)
      param[static_cast<size_t>((rows - 1) * sp)] = 0xffff;       // NaN (device pattern)
      param[static_cast<size_t>(cols - 1)] = 0x7fff;              // NaN (device pattern)
      grad[static_cast<size_t>((rows - 1) * sg + cols - 1)] = 0xff80;  // -inf
    } else {
      grad[static_cast<size_t>(i * sg + j)] = nan;
      param[static_cast<size_t>((rows - 1) * sp)] = nan;
      param[static_cast<size_t>(cols - 1)] = -nan;
      grad[static_cast<size_t>((rows - 1) * sg + cols - 1)] = -inf;
    }
    k[0] = A(0);                               // with an infinite gradient: 0 * inf = NaN
    grad[0] = elem(static_cast<double>(inf));
    c[static_cast<size_t>(rows - 1)] = inf;    // a whole row of infinities / NaN
    buf[static_cast<size_t>(sb * (rows / 3))] = inf;
  }
  SingdDiagonalStepParams<A> p;
  p.param_type = BF16 ? ElementType::kBFloat16 : element_type_of<A>;
  p.rows = rows, p.cols = cols;
  p.param_stride_row = sp, p.grad_stride_row = sg, p.buf_stride_row = sb;
  p.lr = static_cast<A>(0.1), p.momentum = static_cast<A>(0.9);
  p.weight_decay = static_cast<A>(wd);
  p.first = first;

  std::vector<Elem> want_param = param;
  std::vector<A> want_buf = buf;
  p.param = want_param.data(), p.grad = grad.data(), p.c = c.data(), p.k = k.data();
  p.buf = want_buf.data();
  kfac_kernels::cpu::singd_diagonal_step<A>(p);

  Elem* d_param = to_device(param);
  Elem* d_grad = to_device(grad);
  A* d_buf = to_device(buf);
  A* d_c = to_device(c);
  A* d_k = to_device(k);
  p.param = d_param, p.grad = d_grad, p.c = d_c, p.k = d_k, p.buf = d_buf;
  CUDA_OK(kfac_kernels::cuda::singd_diagonal_step<A>(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<Elem> got_param(param.size());
  std::vector<A> got_buf(buf.size());
  to_host(got_param, d_param);
  to_host(got_buf, d_buf);
  for (void* ptr : {static_cast<void*>(d_param), static_cast<void*>(d_grad),
                    static_cast<void*>(d_buf), static_cast<void*>(d_c), static_cast<void*>(d_k)})
    CUDA_OK(cudaFree(ptr));

  const std::string where = std::string(BF16 ? "bfloat16" : sizeof(A) == 8 ? "double" : "float") +
                            " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                            " first=" + std::to_string(first) + " wd=" + std::to_string(wd) +
                            " specials=" + std::to_string(specials);
  const double tol = sizeof(A) == 8 ? 1e-14 : 1e-6;
  expect_close(got_buf, want_buf, tol, "buffer", where.c_str());
  if constexpr (BF16) {
    // one bfloat16 rounding of float results that may differ in their last bits
    expect_close(bf16_values(got_param), bf16_values(want_param), 1.0 / 128, "parameter",
                 where.c_str());
  } else {
    expect_close(got_param, want_param, tol, "parameter", where.c_str());
  }
  if (specials) {  // NaN in, NaN out (whatever the CPU kernel does)
    auto is_nan = [](Elem v) {
      if constexpr (BF16) {
        return std::isnan(bf16_value(v));
      } else {
        return std::isnan(v);
      }
    };
    const int64_t i = rows / 2, j = cols / 2;
    const bool pass = is_nan(got_param[static_cast<size_t>(i * sp + j)]) &&
                      is_nan(got_param[static_cast<size_t>((rows - 1) * sp)]) &&
                      is_nan(got_param[static_cast<size_t>(cols - 1)]);
    (pass ? g_passed : g_failed)++;
    if (!pass) std::printf("FAIL NaN inputs give a non-NaN parameter: %s\n", where.c_str());
  }
}

// The launcher refuses more than 65535 rows (grid.y) and leaves the split to its caller.
void check_row_limit() {
  SingdDiagonalStepParams<float> p;
  p.rows = 65536, p.cols = 1;
  std::vector<float> host(65536, 1.0f);
  float* d = to_device(host);
  p.param = d, p.grad = d, p.c = d, p.k = d, p.buf = d;
  const cudaError_t err = kfac_kernels::cuda::singd_diagonal_step<float>(p, nullptr);
  const bool pass = err == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess;
  (pass ? g_passed : g_failed)++;
  if (!pass) std::printf("FAIL 65536 rows: %s\n", cudaGetErrorString(err));
  CUDA_OK(cudaFree(d));
}

// singd_diagonal_steps: `count` entries of cycling shapes (empty ones, one element, partial
// blocks, an entry over several blocks, one column) in one list, float32 and bfloat16 parameters
// alternating in a float list, first and accumulating entries, NaN and infinities in some; more
// entries than one launch takes (kMaxTensorsPerLaunch). Against the CPU kernel on every entry.
template <typename A>
void run_list_case(int count, double wd, uint64_t seed) {
  const int64_t shapes[][2] = {{3, 7}, {1, 1}, {17, 300}, {0, 4}, {70, 1}, {5, 513}, {2, 1030}};
  struct Entry {
    bool bf16;
    int64_t rows, cols, sp, sg, sb;
    std::vector<A> param, grad, buf, c, k;  // param and grad: values (bf16: rounded)
    std::vector<uint16_t> param_bits, grad_bits;
  };
  Rng rng(seed);
  std::vector<Entry> entries(static_cast<size_t>(count));
  std::vector<SingdDiagonalStepParams<A>> host(entries.size()), dev(entries.size());
  std::vector<void*> owned;
  for (int t = 0; t < count; ++t) {
    Entry& e = entries[static_cast<size_t>(t)];
    e.bf16 = !std::is_same_v<A, double> && t % 2 == 1;
    e.rows = shapes[t % 7][0], e.cols = shapes[t % 7][1];
    e.sp = e.cols + (t % 3), e.sg = e.cols + 1, e.sb = e.cols + (t % 2);
    const size_t np = static_cast<size_t>(e.rows * e.sp), ng = static_cast<size_t>(e.rows * e.sg);
    e.buf.resize(static_cast<size_t>(e.rows * e.sb));
    e.c.resize(static_cast<size_t>(e.rows));
    e.k.resize(static_cast<size_t>(e.cols));
    for (auto& v : e.buf) v = static_cast<A>(rng.uniform());
    for (auto& v : e.c) v = static_cast<A>(0.5 + std::fabs(rng.uniform()));
    for (auto& v : e.k) v = static_cast<A>(0.5 + std::fabs(rng.uniform()));
    if (e.bf16) {
      e.param_bits.resize(np), e.grad_bits.resize(ng);
      for (auto& v : e.param_bits) v = bf16_bits(static_cast<float>(rng.uniform()));
      for (auto& v : e.grad_bits) v = bf16_bits(static_cast<float>(rng.uniform()));
    } else {
      e.param.resize(np), e.grad.resize(ng);
      for (auto& v : e.param) v = static_cast<A>(rng.uniform());
      for (auto& v : e.grad) v = static_cast<A>(rng.uniform());
    }
    if (t % 5 == 2 && e.rows * e.cols > 1) {  // a NaN gradient and an infinite factor entry
      if (e.bf16) {
        e.grad_bits[0] = 0x7fc0;
      } else {
        e.grad[0] = std::numeric_limits<A>::quiet_NaN();
      }
      e.c[static_cast<size_t>(e.rows - 1)] = std::numeric_limits<A>::infinity();
    }
    SingdDiagonalStepParams<A> p;
    p.param_type = e.bf16 ? ElementType::kBFloat16 : element_type_of<A>;
    p.rows = e.rows, p.cols = e.cols;
    p.param_stride_row = e.sp, p.grad_stride_row = e.sg, p.buf_stride_row = e.sb;
    p.lr = static_cast<A>(0.1), p.momentum = static_cast<A>(0.9);
    p.weight_decay = static_cast<A>(wd);
    p.first = t % 3 == 0;
    host[static_cast<size_t>(t)] = dev[static_cast<size_t>(t)] = p;
  }
  // the CPU kernel on copies, then the device
  std::vector<Entry> want = entries;
  for (int t = 0; t < count; ++t) {
    Entry& w = want[static_cast<size_t>(t)];
    auto& p = host[static_cast<size_t>(t)];
    p.param = w.bf16 ? static_cast<void*>(w.param_bits.data()) : static_cast<void*>(w.param.data());
    p.grad = w.bf16 ? static_cast<const void*>(w.grad_bits.data())
                    : static_cast<const void*>(w.grad.data());
    p.c = w.c.data(), p.k = w.k.data(), p.buf = w.buf.data();
  }
  kfac_kernels::cpu::singd_diagonal_steps<A>(host.data(), count);
  for (int t = 0; t < count; ++t) {
    Entry& e = entries[static_cast<size_t>(t)];
    auto& p = dev[static_cast<size_t>(t)];
    void* param = e.bf16 ? static_cast<void*>(to_device(e.param_bits))
                         : static_cast<void*>(to_device(e.param));
    void* grad = e.bf16 ? static_cast<void*>(to_device(e.grad_bits))
                        : static_cast<void*>(to_device(e.grad));
    A* buf = to_device(e.buf);
    A* c = to_device(e.c);
    A* k = to_device(e.k);
    p.param = param, p.grad = grad, p.buf = buf, p.c = c, p.k = k;
    owned.insert(owned.end(), {param, grad, buf, c, k});
  }
  CUDA_OK(kfac_kernels::cuda::singd_diagonal_steps<A>(dev.data(), count, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double tol = sizeof(A) == 8 ? 1e-14 : 1e-6;
  for (int t = 0; t < count; ++t) {
    const Entry& e = entries[static_cast<size_t>(t)];
    const Entry& w = want[static_cast<size_t>(t)];
    const auto& p = dev[static_cast<size_t>(t)];
    const std::string where = std::string("list of ") + std::to_string(count) + " (" +
                              (sizeof(A) == 8 ? "double" : "float") + "), entry " +
                              std::to_string(t) + (e.bf16 ? " bfloat16" : "") + " rows=" +
                              std::to_string(e.rows) + " cols=" + std::to_string(e.cols);
    std::vector<A> got_buf(e.buf.size());
    to_host(got_buf, p.buf);
    expect_close(got_buf, w.buf, tol, "buffer", where.c_str());
    if (e.bf16) {
      std::vector<uint16_t> got(e.param_bits.size());
      to_host(got, static_cast<const uint16_t*>(p.param));
      expect_close(bf16_values(got), bf16_values(w.param_bits), 1.0 / 128, "parameter",
                   where.c_str());
    } else {
      std::vector<A> got(e.param.size());
      to_host(got, static_cast<const A*>(p.param));
      expect_close(got, w.param, tol, "parameter", where.c_str());
    }
  }
  for (void* ptr : owned) CUDA_OK(cudaFree(ptr));
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_visible()) return kNoDevice;
  const bool quick = test_sizes(argc, argv) != Sizes::kFull;
  // (rows, cols): one element; odd; a partial second thread block; one column; many rows.
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {17, 300}, {70, 1}, {5, 513}, {1100, 3}};
  const int64_t big[][2] = {{257, 1031}, {4000, 19}};
  uint64_t seed = 1;
  auto run_shape = [&](int64_t rows, int64_t cols) {
    for (bool first : {false, true})
      for (double wd : {0.0, 0.01})
        for (int specials : {0, 1}) {
          run_case<float, false>(rows, cols, first, wd, specials, seed++);
          run_case<double, false>(rows, cols, first, wd, specials, seed++);
          run_case<float, true>(rows, cols, first, wd, specials, seed++);
        }
  };
  for (const auto& s : shapes) run_shape(s[0], s[1]);
  if (!quick)
    for (const auto& s : big) run_shape(s[0], s[1]);
  check_row_limit();
  for (int count : {1, 7, 24, 25, 53}) {
    run_list_case<float>(count, count % 2 ? 0.01 : 0.0, seed++);
    run_list_case<double>(count, 0.01, seed++);
  }
  return finish();
}
