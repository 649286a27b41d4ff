// Standalone test of the CPU patch covariance kernel against explicit patches (no torch, no test
// framework). Exit status 0 when every case passes; prints "N passed, M failed".
//
// The reference builds every patch of every segment with plain loops (the definition in
// csrc/include/patch_covariance.h) and sums in long double. Cases cover 1x1, 3x3, 3x1, 1x7 and
// 5x5 kernels, strides 1 to 3, dilation 2, asymmetric and large padding, groups, depthwise and
// block segments, bias, expand and reduce, with and without a factor (symmetric or not), N = 1
// and zero-size batches, outputs large enough for streaming stores, four memory layouts (NCHW,
// channels_last, gapped strides, channels outermost with padded rows) and float32, float64,
// bfloat16 and float16 inputs (half-precision inputs are compared with a reference on their
// exact float values). Every available code path (generic / avx2 / avx512) is run, the output is
// checked to be exactly symmetric whenever the factor is, and runs with 1, 3 and the default
// number of OpenMP threads must agree bitwise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_isa.h"  // cpu::set_isa / cpu::isa
#include "patch_covariance.h"
#include "test_support.h"

namespace {

using kfac_kernels::ElementType;
using kfac_kernels::PatchCovarianceParams;

bool g_verbose = false;

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// float -> bfloat16 / float16 bits, for values exactly representable in both (normal range).
uint16_t to_bf16(float f) { return static_cast<uint16_t>(float_bits(f) >> 16); }
uint16_t to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) == 0) return sign;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((u >> 13) & 0x3ff));
}

enum class Layout { kNchw, kChannelsLast, kGapped, kChannelsOuter };

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kNchw: return "nchw";
    case Layout::kChannelsLast: return "channels_last";
    case Layout::kGapped: return "gapped";
    default: return "channels_outer";
  }
}

struct Strides {
  int64_t n, c, h, w, size;
};

Strides make_strides(Layout l, int64_t N, int64_t C, int64_t H, int64_t W) {
  Strides s{};
  switch (l) {
    case Layout::kNchw:
      s.w = 1, s.h = W, s.c = H * W, s.n = C * H * W;
      break;
    case Layout::kChannelsLast:
      s.c = 1, s.w = C, s.h = W * C, s.n = H * W * C;
      break;
    case Layout::kGapped:
      s.w = 2, s.h = 2 * W + 1, s.c = (2 * W + 1) * H + 5, s.n = ((2 * W + 1) * H + 5) * C + 7;
      break;
    case Layout::kChannelsOuter:  // channels outermost, padded rows
      s.w = 1, s.h = W + 3, s.n = H * (W + 3), s.c = N * H * (W + 3);
      break;
  }
  s.size = 1;
  if (N > 0 && C > 0 && H > 0 && W > 0)
    s.size = (N - 1) * s.n + (C - 1) * s.c + (H - 1) * s.h + (W - 1) * s.w + 1;
  return s;
}

struct Case {
  int64_t n, c, h, w;
  int64_t kh, kw, sh, sw, dh, dw;
  int64_t pt, pb, pl, pr;  // padding top, bottom, left, right (bottom/right only set out_size)
  int64_t segs, start, step, cs;
  bool bias;
};

enum class Type { kF32, kF64, kBF16, kF16 };

const char* type_name(Type t) {
  switch (t) {
    case Type::kF32: return "float32";
    case Type::kF64: return "float64";
    case Type::kBF16: return "bfloat16";
    default: return "float16";
  }
}

template <typename T>
void run_case(const Case& cs_, Layout layout, Type type, bool reduce, bool with_factor,
              const char* isa, uint64_t seed) {
  const Case& k = cs_;
  const int64_t out_h = (k.h + k.pt + k.pb - (k.dh * (k.kh - 1) + 1)) / k.sh + 1;
  const int64_t out_w = (k.w + k.pl + k.pr - (k.dw * (k.kw - 1) + 1)) / k.sw + 1;
  const int64_t R = out_h * out_w, M = k.n * R;
  const int64_t D = k.cs * k.kh * k.kw + (k.bias ? 1 : 0);
  const Strides st = make_strides(layout, k.n, k.c, k.h, k.w);
  Rng rng(seed);

  // Input values: exact in bf16 and fp16 for those types.
  std::vector<double> xval(static_cast<size_t>(st.size), 0.0);
  for (auto& v : xval) {
    const double u = rng.uniform() + 0.25;  // a non-zero mean, as activations have
    v = (type == Type::kBF16 || type == Type::kF16) ? std::round(u * 64.0) / 64.0 : u;
  }
  std::vector<float> xf;
  std::vector<double> xd;
  std::vector<uint16_t> xh;
  const void* xptr = nullptr;
  ElementType it = ElementType::kFloat32;
  switch (type) {
    case Type::kF32:
      xf.assign(xval.begin(), xval.end());
      for (size_t i = 0; i < xf.size(); ++i) xval[i] = xf[i];
      xptr = xf.data(), it = ElementType::kFloat32;
      break;
    case Type::kF64:
      xd = xval, xptr = xd.data(), it = ElementType::kFloat64;
      break;
    case Type::kBF16:
    case Type::kF16:
      xh.resize(xval.size());
      for (size_t i = 0; i < xh.size(); ++i)
        xh[i] = type == Type::kBF16 ? to_bf16(static_cast<float>(xval[i]))
                                    : to_half(static_cast<float>(xval[i]));
      xptr = xh.data(), it = type == Type::kBF16 ? ElementType::kBFloat16 : ElementType::kFloat16;
      break;
  }

  // A general (not symmetric) factor with row stride D + 2, or a symmetric one.
  const bool symmetric_factor = (seed % 2) == 0;
  const int64_t fsr = D + 2, fsb = D * fsr + 3;
  std::vector<T> factor;
  if (with_factor) {
    factor.assign(static_cast<size_t>(k.segs * fsb), T(0));
    for (int64_t s = 0; s < k.segs; ++s)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) {
          if (symmetric_factor && j < i) continue;
          const T v = static_cast<T>(rng.uniform());
          factor[s * fsb + i * fsr + j] = v;
          if (symmetric_factor) factor[s * fsb + j * fsr + i] = v;
        }
  }
  const double decay = 0.9, alpha = reduce ? 1.0 / std::max<int64_t>(k.n, 1)
                                           : 1.0 / std::max<int64_t>(M, 1);

  PatchCovarianceParams p;
  p.x = xptr, p.x_type = it;
  p.n = k.n, p.channels = k.c, p.height = k.h, p.width = k.w;
  p.x_stride_n = st.n, p.x_stride_c = st.c, p.x_stride_h = st.h, p.x_stride_w = st.w;
  p.kernel_h = k.kh, p.kernel_w = k.kw, p.stride_h = k.sh, p.stride_w = k.sw;
  p.dilation_h = k.dh, p.dilation_w = k.dw, p.pad_top = k.pt, p.pad_left = k.pl;
  p.out_h = out_h, p.out_w = out_w;
  p.num_segments = k.segs, p.segment_start = k.start, p.segment_step = k.step;
  p.segment_channels = k.cs;
  p.reduce = reduce, p.bias = k.bias;
  if (with_factor) {
    p.factor = factor.data();
    p.factor_stride_batch = fsb, p.factor_stride_row = fsr, p.factor_stride_col = 1;
  }
  p.decay = decay, p.alpha = alpha;

  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> out(static_cast<size_t>(k.segs * D * D), nan);
  p.out = out.data();
  kfac_kernels::cpu::patch_covariance(p);

  // Bitwise determinism across thread counts.
  bool deterministic = true;
#ifdef _OPENMP
  {
    const int saved = omp_get_max_threads();
    for (int threads : {1, 3}) {
      omp_set_num_threads(threads);
      std::vector<T> again(out.size(), nan);
      p.out = again.data();
      kfac_kernels::cpu::patch_covariance(p);
      if (std::memcmp(again.data(), out.data(), sizeof(T) * out.size()) != 0)
        deterministic = false;
    }
    omp_set_num_threads(saved);
    p.out = out.data();
  }
#endif

  // Reference: explicit patches.
  const double eps = std::numeric_limits<float>::epsilon() *
                     (sizeof(T) == 8 ? std::numeric_limits<double>::epsilon() /
                                           std::numeric_limits<float>::epsilon()
                                     : 1.0);
  const int64_t rows = reduce ? k.n : M;
  std::vector<long double> patches(static_cast<size_t>(rows * D));
  std::vector<long double> magn(static_cast<size_t>(rows * D));  // same with |x|
  double worst = 0.0;
  bool ok = true, symmetric = true;
  for (int64_t s = 0; s < k.segs; ++s) {
    const int64_t c0 = k.start + s * k.step;
    std::fill(patches.begin(), patches.end(), 0.0L);
    std::fill(magn.begin(), magn.end(), 0.0L);
    for (int64_t n = 0; n < k.n; ++n)
      for (int64_t oh = 0; oh < out_h; ++oh)
        for (int64_t ow = 0; ow < out_w; ++ow) {
          const int64_t r = reduce ? n : (n * out_h + oh) * out_w + ow;
          const long double scale = reduce ? 1.0L / R : 1.0L;
          for (int64_t c = 0; c < k.cs; ++c)
            for (int64_t i = 0; i < k.kh; ++i)
              for (int64_t j = 0; j < k.kw; ++j) {
                const int64_t h = oh * k.sh + i * k.dh - k.pt;
                const int64_t w = ow * k.sw + j * k.dw - k.pl;
                if (h < 0 || h >= k.h || w < 0 || w >= k.w) continue;
                const long double v =
                    xval[(c0 + c) * st.c + n * st.n + h * st.h + w * st.w];
                const int64_t d = (c * k.kh + i) * k.kw + j;
                patches[r * D + d] += v * scale;
                magn[r * D + d] += std::fabs(static_cast<double>(v)) * scale;
              }
          if (k.bias) patches[r * D + D - 1] = 1.0L, magn[r * D + D - 1] = 1.0L;
        }
    const double bound = reduce ? 2.0 * (R + k.n + 8) : 2.0 * (128 + M / 128.0 + 8);
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j) {
        long double gram = 0, mag = 0;
        for (int64_t r = 0; r < rows; ++r) {
          gram += patches[r * D + i] * patches[r * D + j];
          mag += magn[r * D + i] * magn[r * D + j];
        }
        long double ref = static_cast<long double>(static_cast<T>(alpha)) * gram;
        long double scale = std::fabs(alpha) * mag;
        if (with_factor) {
          const long double f = factor[s * fsb + i * fsr + j];
          ref += static_cast<long double>(static_cast<T>(decay)) * f;
          scale += std::fabs(decay * static_cast<double>(f));
        }
        const T got = out[s * D * D + i * D + j];
        const double err = std::fabs(static_cast<double>(got - ref));
        const double tol = bound * eps * static_cast<double>(scale) + 1e-300;
        if (!(err <= tol)) ok = false;
        worst = std::max(worst, scale > 0 ? err / static_cast<double>(scale) : err);
        if ((!with_factor || symmetric_factor) && !(got == out[s * D * D + j * D + i]))
          symmetric = false;
      }
  }
  const bool pass = ok && symmetric && deterministic;
  (pass ? g_passed : g_failed)++;
  if (!pass || g_verbose) {
    std::printf("%s %-8s %-7s %-6s N=%lld C=%lld %lldx%lld k=%lldx%lld s=%lldx%lld d=%lldx%lld "
                "pad=(%lld,%lld,%lld,%lld) segs=%lld(%lld+%lld*s, %lld ch) bias=%d factor=%s "
                "%s: D=%lld max rel err %.3g%s%s\n",
                pass ? "ok  " : "FAIL", type_name(type), isa, reduce ? "reduce" : "expand",
                (long long)k.n, (long long)k.c, (long long)k.h, (long long)k.w, (long long)k.kh,
                (long long)k.kw, (long long)k.sh, (long long)k.sw, (long long)k.dh,
                (long long)k.dw, (long long)k.pt, (long long)k.pb, (long long)k.pl,
                (long long)k.pr, (long long)k.segs, (long long)k.start, (long long)k.step,
                (long long)k.cs, k.bias ? 1 : 0,
                with_factor ? (symmetric_factor ? "sym" : "general") : "none",
                layout_name(layout), (long long)D, worst, symmetric ? "" : " (NOT SYMMETRIC)",
                deterministic ? "" : " (THREAD-DEPENDENT)");
  }
}

// Every float16 and bfloat16 bit pattern, one per channel of a 1x1 input, through depthwise
// segments with a bias: out[s][0][1] = x_s exactly (expand and reduce). The reference conversion
// is written independently of the kernel's (ldexp for float16).
double half_reference(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  if (exp == 31)
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(static_cast<double>(1024 + mant), exp - 25);
}

double bf16_reference(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void all_half_values() {
  const int64_t C = 65536;
  std::vector<uint16_t> bits(C);
  for (int64_t c = 0; c < C; ++c) bits[c] = static_cast<uint16_t>(c);
  for (ElementType type : {ElementType::kFloat16, ElementType::kBFloat16})
    for (bool reduce : {false, true}) {
      PatchCovarianceParams p;
      p.x = bits.data(), p.x_type = type;
      p.n = 1, p.channels = C, p.height = 1, p.width = 1;
      p.x_stride_n = C, p.x_stride_c = 1, p.x_stride_h = 1, p.x_stride_w = 1;
      p.out_h = 1, p.out_w = 1;
      p.num_segments = C, p.segment_step = 1, p.segment_channels = 1;
      p.bias = true, p.reduce = reduce;
      std::vector<float> out(static_cast<size_t>(C * 4));
      p.out = out.data();
      kfac_kernels::cpu::patch_covariance(p);
      int64_t wrong = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double ref = type == ElementType::kFloat16 ? half_reference(bits[c])
                                                       : bf16_reference(bits[c]);
        const float got = out[c * 4 + 1];
        const bool same = std::isnan(ref) ? std::isnan(got) : static_cast<double>(got) == ref;
        if (!same) ++wrong;
      }
      const bool pass = wrong == 0;
      (pass ? g_passed : g_failed)++;
      if (!pass || g_verbose)
        std::printf("%s every %s value (%s): %lld wrong\n", pass ? "ok  " : "FAIL",
                    type == ElementType::kFloat16 ? "float16" : "bfloat16",
                    reduce ? "reduce" : "expand", static_cast<long long>(wrong));
    }
}

void run_all(const char* isa) {
  // n, c, h, w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, segs, start, step, cs, bias
  const Case cases[] = {
      {2, 3, 7, 9, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 3, 3, false},     // 1x1
      {2, 3, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 3, 3, true},      // 3x3 same, bias
      {1, 4, 11, 10, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 0, 4, 4, false},   // stride 2, N = 1
      {2, 2, 13, 8, 3, 1, 3, 1, 1, 1, 2, 0, 0, 0, 1, 0, 2, 2, true},     // 3x1, stride 3x1
      {2, 2, 5, 17, 1, 7, 1, 2, 1, 1, 0, 0, 3, 3, 1, 0, 2, 2, false},    // 1x7
      {1, 3, 9, 12, 5, 5, 1, 3, 1, 1, 2, 2, 2, 1, 1, 0, 3, 3, true},     // 5x5, asymmetric pad
      {2, 2, 11, 13, 3, 3, 1, 2, 2, 2, 2, 2, 1, 3, 1, 0, 2, 2, false},   // dilation 2
      {2, 4, 6, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 2, 2, true},      // groups = 2
      {2, 6, 7, 6, 3, 3, 2, 1, 1, 1, 1, 1, 0, 2, 6, 0, 1, 1, false},     // depthwise
      {2, 5, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 5, 0, 1, 1, true},      // depthwise + bias
      {1, 7, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 2, 2, false},     // blocks from channel 1
      {2, 2, 3, 4, 3, 3, 1, 1, 1, 1, 3, 3, 2, 2, 1, 0, 2, 2, true},      // padding > kernel / 2
      {1, 2, 4, 4, 3, 3, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 2, 2, false},     // 2x2 output, valid
      {0, 3, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 3, 3, true},      // empty batch
      {2, 8, 9, 10, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 8, 8, true},     // D = 73: 3 tile pairs
      {3, 8, 30, 30, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 8, 8, false},   // D = 72, row slices
      {2, 16, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 8, 8, true},     // 2 segments of D = 73
      {3, 1, 40, 40, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, true},    // D = 10, row slices
      {1, 15, 7, 7, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 0, 15, 15, true},   // D = 136
      {4, 20, 12, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 20, 20, true}, // D = 181: 9 chunks
      {1, 40, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 40, 0, 1, 1, true},    // 40 depthwise segments
      {2, 8, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8, 0, 1, 1, false},   // 8 segments, slices
  };
  const Layout layouts[] = {Layout::kNchw, Layout::kChannelsLast, Layout::kGapped,
                            Layout::kChannelsOuter};
  uint64_t seed = 1;
  for (const Case& c : cases)
    for (bool reduce : {false, true})
      for (Layout l : layouts) {
        const bool with_factor = seed % 3 != 0;
        const bool big = c.n * c.h * c.w > 1500;
        run_case<float>(c, l, Type::kF32, reduce, with_factor, isa, seed);
        run_case<double>(c, l, Type::kF64, reduce, with_factor, isa, seed + 1);
        if (!big || l == Layout::kNchw) {
          run_case<float>(c, l, Type::kBF16, reduce, !with_factor, isa, seed + 2);
          run_case<float>(c, l, Type::kF16, reduce, with_factor, isa, seed + 3);
        }
        seed += 4;
      }
  // Outputs over 8 MiB (written with streaming stores): D = 1450, rows not 64-byte aligned.
  const Case large = {2, 161, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 161, 161, true};
  for (bool reduce : {false, true}) {
    run_case<float>(large, Layout::kNchw, Type::kF32, reduce, false, isa, seed);
    run_case<float>(large, Layout::kChannelsLast, Type::kF32, reduce, true, isa, seed + 1);
    run_case<double>(large, Layout::kNchw, Type::kF64, reduce, true, isa, seed + 2);
    seed += 3;
  }
}

}  // namespace

int main() {
  g_verbose = std::getenv("KFAC_KERNELS_TEST_VERBOSE") != nullptr;
  const std::string best = kfac_kernels::cpu::isa();
  std::printf("best CPU path: %s, OpenMP: %s, threads: %d\n", best.c_str(),
              kfac_kernels::cpu::with_openmp() ? "yes" : "no", kfac_kernels::cpu::max_threads());
  for (const char* isa : {"generic", "avx2", "avx512"}) {
    if (!kfac_kernels::cpu::set_isa(isa)) continue;
    all_half_values();
    run_all(isa);
  }
  kfac_kernels::cpu::set_isa("auto");
  return finish();
}
