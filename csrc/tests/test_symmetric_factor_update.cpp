// Standalone test of the CPU kernel against a naive triple loop (no torch, no test framework).
// Exit status 0 when every case passes. Every available code path (generic / avx2 / avx512) is
// run, and the output is checked to be exactly symmetric whenever the factor is.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "symmetric_factor_update.h"
#include "test_support.h"

namespace {

using kfac_kernels::SymmetricFactorUpdateParams;

enum class Layout { kRowMajor, kColMajor, kPadded, kStrided };

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kRowMajor: return "row-major";
    case Layout::kColMajor: return "col-major";
    case Layout::kPadded: return "padded";
    default: return "strided";
  }
}

// Strides (batch, row, col) of a (batch, rows, cols) view in a buffer, and the buffer size.
struct View {
  int64_t sb, sr, sc, size;
};

View make_view(Layout l, int64_t batch, int64_t rows, int64_t cols) {
  View v{};
  switch (l) {
    case Layout::kRowMajor:
      v.sc = 1, v.sr = cols, v.sb = rows * cols;
      break;
    case Layout::kColMajor:
      v.sr = 1, v.sc = rows, v.sb = rows * cols;
      break;
    case Layout::kPadded:  // padded rows and batch gap
      v.sc = 1, v.sr = cols + 3, v.sb = rows * (cols + 3) + 5;
      break;
    case Layout::kStrided:  // every other column, batch innermost-ish
      v.sc = 2 * batch, v.sr = 2 * batch * cols + 1, v.sb = 1;
      break;
  }
  int64_t last = 0;
  if (batch > 0 && rows > 0 && cols > 0)
    last = (batch - 1) * v.sb + (rows - 1) * v.sr + (cols - 1) * v.sc;
  v.size = last + 1;
  return v;
}

enum class FactorKind { kNone, kSymmetric, kGeneral };

template <typename T>
void run_case(const char* isa, int64_t batch, int64_t m, int64_t d, Layout xl, Layout fl,
              FactorKind fk, double decay, double alpha, uint64_t seed) {
  Rng rng(seed);
  const View xv = make_view(xl, batch, m, d);
  std::vector<T> xbuf(static_cast<size_t>(xv.size));
  for (auto& e : xbuf) e = static_cast<T>(rng.uniform());
  const View fv = make_view(fl, batch, d, d);
  std::vector<T> fbuf;
  if (fk != FactorKind::kNone) {
    fbuf.assign(static_cast<size_t>(fv.size), T(0));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          if (fk == FactorKind::kSymmetric && j < i) continue;
          const T val = static_cast<T>(rng.uniform());
          fbuf[b * fv.sb + i * fv.sr + j * fv.sc] = val;
          if (fk == FactorKind::kSymmetric) fbuf[b * fv.sb + j * fv.sr + i * fv.sc] = val;
        }
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> out(static_cast<size_t>(batch * d * d), nan);

  SymmetricFactorUpdateParams<T> p;
  p.x = xbuf.data();
  p.batch = batch, p.m = m, p.d = d;
  p.x_stride_batch = xv.sb, p.x_stride_row = xv.sr, p.x_stride_col = xv.sc;
  if (fk != FactorKind::kNone) {
    p.factor = fbuf.data();
    p.factor_stride_batch = fv.sb, p.factor_stride_row = fv.sr, p.factor_stride_col = fv.sc;
  }
  p.out = out.data();
  p.decay = static_cast<T>(decay);
  p.alpha = static_cast<T>(alpha);
  kfac_kernels::cpu::symmetric_factor_update<T>(p);

  const double eps = std::numeric_limits<T>::epsilon();
  double worst = 0.0;
  bool ok = true, symmetric = true;
  for (int64_t b = 0; b < batch && ok; ++b)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        long double gram = 0, mag = 0;
        for (int64_t k = 0; k < m; ++k) {
          const long double a = xbuf[b * xv.sb + k * xv.sr + i * xv.sc];
          const long double c = xbuf[b * xv.sb + k * xv.sr + j * xv.sc];
          gram += a * c;
          mag += std::fabs(static_cast<double>(a * c));
        }
        long double ref = static_cast<long double>(static_cast<T>(alpha)) * gram;
        long double scale = std::fabs(alpha) * mag;
        if (fk != FactorKind::kNone) {
          const long double f = fbuf[b * fv.sb + i * fv.sr + j * fv.sc];
          ref += static_cast<long double>(static_cast<T>(decay)) * f;
          scale += std::fabs(decay * static_cast<double>(f));
        }
        const T got = out[b * d * d + i * d + j];
        const double err = std::fabs(static_cast<double>(got - ref));
        const double tol = 2.0 * (m + 3) * eps * static_cast<double>(scale) + 1e-30;
        if (!(err <= tol)) ok = false;
        worst = std::max(worst, scale > 0 ? err / static_cast<double>(scale) : err);
        if (fk != FactorKind::kGeneral && !(got == out[b * d * d + j * d + i])) symmetric = false;
      }
  const bool pass = ok && symmetric;
  (pass ? g_passed : g_failed)++;
  if (!pass || std::getenv("KFAC_KERNELS_TEST_VERBOSE")) {
    std::printf("%s %-6s %-7s batch=%lld m=%lld d=%lld x=%s factor=%s(%s) decay=%g alpha=%g: "
                "max rel err %.3g%s\n",
                pass ? "ok  " : "FAIL", sizeof(T) == 4 ? "float" : "double", isa,
                static_cast<long long>(batch), static_cast<long long>(m),
                static_cast<long long>(d), layout_name(xl),
                fk == FactorKind::kNone ? "none" : fk == FactorKind::kSymmetric ? "sym" : "general",
                layout_name(fl), decay, alpha, worst, symmetric ? "" : " (NOT SYMMETRIC)");
  }
}

template <typename T>
void run_all(const char* isa) {
  struct Shape {
    int64_t batch, m, d;
  };
  const Shape shapes[] = {
      {1, 0, 5},    {2, 0, 67},   {1, 7, 1},     {1, 1, 1},     {3, 13, 1},   {1, 131, 67},
      {3, 131, 67}, {1, 33, 64},  {1, 129, 128}, {2, 50, 130},  {1, 1030, 20}, {1, 2100, 40},
      {0, 10, 4},   {1, 160, 150}, {4, 700, 9},
      // more tile pairs than one band holds (run_direct: sums straight into out; a partial
      // last tile column in scratch tiles, or every tile whole; several chunks, a batch)
      {1, 3, 700},  {1, 131, 650}, {2, 260, 704},
  };
  const Layout layouts[] = {Layout::kRowMajor, Layout::kColMajor, Layout::kPadded,
                            Layout::kStrided};
  const FactorKind kinds[] = {FactorKind::kNone, FactorKind::kSymmetric, FactorKind::kGeneral};
  uint64_t seed = 1;
  for (const Shape& s : shapes)
    for (Layout xl : layouts)
      for (FactorKind fk : kinds) {
        const Layout fl = layouts[(seed / 3) % 4];
        const double decay = fk == FactorKind::kNone ? 123.0 : 0.95;
        const double alpha = (seed % 2) ? 1.0 : 0.05 / (s.m + 1);
        run_case<T>(isa, s.batch, s.m, s.d, xl, fl, fk, decay, alpha, seed++);
      }
}

}  // namespace

int main() {
  const std::string best = kfac_kernels::cpu::isa();
  std::printf("best CPU path: %s, OpenMP: %s, threads: %d\n", best.c_str(),
              kfac_kernels::cpu::with_openmp() ? "yes" : "no", kfac_kernels::cpu::max_threads());
  for (const char* isa : {"generic", "avx2", "avx512"}) {
    if (!kfac_kernels::cpu::set_isa(isa)) continue;
    run_all<float>(isa);
    run_all<double>(isa);
  }
  kfac_kernels::cpu::set_isa("auto");
  return finish();
}
