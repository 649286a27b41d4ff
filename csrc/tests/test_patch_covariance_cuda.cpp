// Standalone test of the CUDA patch covariance kernels against the CPU kernel (itself checked
// against explicit patches by test_patch_covariance). Exit status 0: all passed, 1: a failure,
// 77: no CUDA device. `--quick` (the emulated runs) runs a subset of the cases of the large
// shapes that keeps every code path, `--small` (compute-sanitizer) none of them.
//
// The grid covers every code path of csrc/cuda/patch_covariance.cu: the small kernel (D <= 16:
// depthwise, 1x1 of few channels) and the tile kernel (one and several 64-wide tiles), each with
// and without the split over rows, the tensor-core path (fp16 / bf16 with D > 16 on sm_80+), more
// than 65535 segments (grid-y striding), expand and reduce (the mean patches by the plane kernels,
// NCHW and channels_last, and per offset past their tables), bias, factors (none, symmetric,
// asymmetric, strided), four layouts of x and all four input types. Outputs must agree with the CPU kernel, be exactly symmetric whenever the
// factor is, and be bitwise identical across two runs (determinism). One huge, NaN or inf pixel
// must leave the entries that do not involve it as they are without it (run_extreme_pixel).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_support.h"
#include "patch_covariance.h"

namespace {

using kfac_kernels::ElementType;
using kfac_kernels::PatchCovarianceParams;

// k / 64 with |k| <= 128: exact in float16 and bfloat16 alike
double grid(Rng& rng) { return std::round(rng.uniform() * 128.0) / 64.0; }

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// float -> bfloat16 / float16 bits for values of grid() (exact in both).
uint16_t to_bf16(float f) { return static_cast<uint16_t>(float_bits(f) >> 16); }
uint16_t to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) == 0) return sign;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((u >> 13) & 0x3ffu));
}

size_t elem_size(ElementType t) {
  return t == ElementType::kFloat64 ? 8 : t == ElementType::kFloat32 ? 4 : 2;
}
const char* type_name(ElementType t) {
  switch (t) {
    case ElementType::kFloat32: return "float32";
    case ElementType::kFloat64: return "float64";
    case ElementType::kFloat16: return "float16";
    default: return "bfloat16";
  }
}

void store(unsigned char* p, ElementType t, double v) {
  switch (t) {
    case ElementType::kFloat32: {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
      break;
    }
    case ElementType::kFloat64:
      std::memcpy(p, &v, 8);
      break;
    case ElementType::kFloat16: {
      const uint16_t h = to_half(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      break;
    }
    default: {
      const uint16_t b = to_bf16(static_cast<float>(v));
      std::memcpy(p, &b, 2);
      break;
    }
  }
}

struct Shape {
  int64_t n, c, h, w;
  int64_t kh, kw, sh, sw, dh, dw, pt, pb, pl, pr;
  int64_t segments, start, step, seg_channels;  // segments 0: groups = c / seg_channels
};

enum Layout { kNCHW = 0, kNHWC = 1, kPadded = 2, kChannelsOuter = 3 };

template <typename A>
void run_case(const Shape& s, ElementType type, bool reduce, bool bias, int layout,
              int factor_kind, uint64_t seed) {
  Rng rng(seed);
  PatchCovarianceParams p;
  p.x_type = type;
  p.n = s.n, p.channels = s.c, p.height = s.h, p.width = s.w;
  int64_t sn, sc, sh, sw, size;
  switch (layout) {
    case kNCHW: sw = 1, sh = s.w, sc = s.h * s.w, sn = s.c * sc, size = s.n * sn; break;
    case kNHWC: sc = 1, sw = s.c, sh = s.w * s.c, sn = s.h * sh, size = s.n * sn; break;
    case kPadded: sw = 2, sh = 2 * s.w + 3, sc = s.h * sh + 1, sn = s.c * sc + 5, size = s.n * sn;
      break;
    default: sn = 1, sw = s.n, sh = s.w * s.n + 1, sc = s.h * sh + 2, size = s.c * sc; break;
  }
  p.x_stride_n = sn, p.x_stride_c = sc, p.x_stride_h = sh, p.x_stride_w = sw;
  p.kernel_h = s.kh, p.kernel_w = s.kw, p.stride_h = s.sh, p.stride_w = s.sw;
  p.dilation_h = s.dh, p.dilation_w = s.dw, p.pad_top = s.pt, p.pad_left = s.pl;
  p.out_h = (s.h + s.pt + s.pb - (s.dh * (s.kh - 1) + 1)) / s.sh + 1;
  p.out_w = (s.w + s.pl + s.pr - (s.dw * (s.kw - 1) + 1)) / s.sw + 1;
  if (s.segments == 0) {
    p.num_segments = s.c / s.seg_channels, p.segment_start = 0;
    p.segment_step = s.seg_channels, p.segment_channels = s.seg_channels;
  } else {
    p.num_segments = s.segments, p.segment_start = s.start;
    p.segment_step = s.step, p.segment_channels = s.seg_channels;
  }
  p.reduce = reduce;
  p.bias = bias;
  p.decay = 0.95;
  p.alpha = reduce ? 1.0 / static_cast<double>(s.n)
                   : 1.0 / static_cast<double>(s.n * p.out_h * p.out_w);
  const int64_t S = p.num_segments, D = p.dim();

  const size_t es = elem_size(type);
  std::vector<unsigned char> x(static_cast<size_t>(std::max<int64_t>(size, 1)) * es, 0);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t h = 0; h < s.h; ++h)
        for (int64_t w = 0; w < s.w; ++w)
          store(&x[static_cast<size_t>(n * sn + c * sc + h * sh + w * sw) * es], type,
                grid(rng) + (c % 3 == 0 ? 0.5 : 0.0));
  std::vector<A> f;
  const int64_t fsb = D * D + 2, fsr = 1, fsc = D;  // column-major, gaps between segments
  if (factor_kind > 0) {
    f.assign(static_cast<size_t>(S * fsb + 1), A(0));
    for (int64_t b = 0; b < S; ++b)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = i; j < D; ++j) {
          const A v = static_cast<A>(rng.uniform());
          f[b * fsb + i * fsr + j * fsc] = v;
          f[b * fsb + j * fsr + i * fsc] = factor_kind == 1 ? v : static_cast<A>(rng.uniform());
        }
    p.factor_stride_batch = fsb, p.factor_stride_row = fsr, p.factor_stride_col = fsc;
  }

  std::vector<A> want(static_cast<size_t>(S * D * D));
  p.x = x.data();
  p.factor = factor_kind > 0 ? f.data() : nullptr;
  p.out = want.data();
  kfac_kernels::cpu::patch_covariance(p);

  unsigned char* dx = to_device(x);
  A* df = factor_kind > 0 ? to_device(f) : nullptr;
  A* dout = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&dout),
                     std::max<size_t>(want.size(), 1) * sizeof(A)));
  CUDA_OK(cudaMemset(dout, 0xff, std::max<size_t>(want.size(), 1) * sizeof(A)));  // NaN
  p.x = dx, p.factor = df, p.out = dout;
  const size_t ws_bytes = kfac_kernels::cuda::patch_covariance_workspace_bytes(p);
  void* ws = nullptr;
  if (ws_bytes) {
    CUDA_OK(cudaMalloc(&ws, ws_bytes));
    CUDA_OK(cudaMemset(ws, 0xff, ws_bytes));
  }
  std::vector<A> got(want.size()), again(want.size());
  CUDA_OK(kfac_kernels::cuda::patch_covariance(p, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  if (!got.empty())
    CUDA_OK(cudaMemcpy(got.data(), dout, got.size() * sizeof(A), cudaMemcpyDeviceToHost));
  CUDA_OK(kfac_kernels::cuda::patch_covariance(p, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  if (!again.empty())
    CUDA_OK(cudaMemcpy(again.data(), dout, again.size() * sizeof(A), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  if (df) cudaFree(df);
  cudaFree(dout);
  if (ws) cudaFree(ws);

  const double tol = sizeof(A) == 4 ? 2e-5 : 1e-12;
  double worst = 0;
  bool symmetric = true;
  const bool deterministic =
      got.empty() || std::memcmp(got.data(), again.data(), got.size() * sizeof(A)) == 0;
  for (int64_t b = 0; b < S; ++b)
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j) {
        const size_t e = static_cast<size_t>(b * D * D + i * D + j);
        const double err = std::fabs(static_cast<double>(got[e]) - static_cast<double>(want[e])) /
                           (1.0 + std::fabs(static_cast<double>(want[e])));
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
        if (factor_kind != 2 && !(got[e] == got[static_cast<size_t>(b * D * D + j * D + i)]))
          symmetric = false;
      }
  const bool pass = worst <= tol && symmetric && deterministic;
  (pass ? g_passed : g_failed)++;
  if (!pass || std::getenv("KFAC_KERNELS_TEST_VERBOSE")) {
    std::printf(
        "%s %s %s%s N=%lld C=%lld %lldx%lld k=%lldx%lld s=%lldx%lld d=%lldx%lld S=%lld D=%lld "
        "layout=%d factor=%d workspace=%zu: err %.3g%s%s\n",
        pass ? "ok  " : "FAIL", type_name(type), reduce ? "reduce" : "expand", bias ? "+bias" : "",
        static_cast<long long>(s.n), static_cast<long long>(s.c), static_cast<long long>(s.h),
        static_cast<long long>(s.w), static_cast<long long>(s.kh), static_cast<long long>(s.kw),
        static_cast<long long>(s.sh), static_cast<long long>(s.sw), static_cast<long long>(s.dh),
        static_cast<long long>(s.dw), static_cast<long long>(S), static_cast<long long>(D),
        layout, factor_kind, ws_bytes, worst, symmetric ? "" : " (NOT SYMMETRIC)",
        deterministic ? "" : " (NOT DETERMINISTIC)");
  }
}

const ElementType kTypes[] = {ElementType::kFloat32, ElementType::kFloat64, ElementType::kFloat16,
                            ElementType::kBFloat16};

void run_one(const Shape& s, ElementType t, bool reduce, bool bias, int layout, uint64_t& seed) {
  const int fk = static_cast<int>(seed % 3);
  if (t == ElementType::kFloat64)
    run_case<double>(s, t, reduce, bias, layout, fk, seed++);
  else
    run_case<float>(s, t, reduce, bias, layout, fk, seed++);
}

void run_shape(const Shape& s, uint64_t& seed, bool all_layouts) {
  for (ElementType t : kTypes)
    for (int reduce = 0; reduce < 2; ++reduce)
      for (int bias = 0; bias < 2; ++bias)
        for (int layout = 0; layout < (all_layouts ? 4 : 2); ++layout)
          run_one(s, t, reduce, bias, layout, seed);
}

// --quick subset of a large shape: each input type once, expand and reduce, NCHW and channels
// last (float64: reduce on channels last, the thread-per-item mean patches). With
// `segments_only`, the float32 and bfloat16 expand cases alone (the SIMT and tensor-core tile
// kernels striding over grid.y).
void run_shape_quick(const Shape& s, uint64_t& seed, bool segments_only) {
  struct Case {
    ElementType type;
    bool reduce;
    int layout;
  };
  const Case cases[] = {{ElementType::kFloat32, false, kNCHW},
                        {ElementType::kFloat64, true, kNHWC},
                        {ElementType::kFloat16, false, kNHWC},
                        {ElementType::kBFloat16, true, kNCHW}};
  for (const Case& c : cases) {
    if (segments_only && c.type != ElementType::kFloat32)
      continue;
    run_one(s, c.type, segments_only ? false : c.reduce, (seed % 2) == 0, c.layout, seed);
  }
}

// One extreme pixel stays in the entries that involve it (those whose coordinate of the pixel's
// example reads it), as in the definition: with a huge pixel every other entry keeps its accuracy,
// with a NaN or inf one every other entry stays finite (and every entry that involves it is not).
// The other entries must equal the CPU kernel's in float64 on the input with the pixel zeroed; the
// involved coordinates are those (but the bias) whose diagonal is non-zero for an input that is 1
// at the pixel.
template <typename A>
void run_extreme_pixel(const Shape& s, bool reduce, double value, uint64_t seed) {
  constexpr ElementType type = sizeof(A) == 8 ? ElementType::kFloat64 : ElementType::kFloat32;
  Rng rng(seed);
  PatchCovarianceParams p;
  p.n = s.n, p.channels = s.c, p.height = s.h, p.width = s.w;
  p.x_stride_w = 1, p.x_stride_h = s.w, p.x_stride_c = s.h * s.w, p.x_stride_n = s.c * s.h * s.w;
  p.kernel_h = s.kh, p.kernel_w = s.kw, p.stride_h = s.sh, p.stride_w = s.sw;
  p.dilation_h = s.dh, p.dilation_w = s.dw, p.pad_top = s.pt, p.pad_left = s.pl;
  p.out_h = (s.h + s.pt + s.pb - (s.dh * (s.kh - 1) + 1)) / s.sh + 1;
  p.out_w = (s.w + s.pl + s.pr - (s.dw * (s.kw - 1) + 1)) / s.sw + 1;
  p.num_segments = 1, p.segment_channels = s.c;
  p.reduce = reduce, p.bias = true, p.decay = 0.0;
  p.alpha = reduce ? 1.0 / static_cast<double>(s.n)
                   : 1.0 / static_cast<double>(s.n * p.out_h * p.out_w);
  const int64_t D = p.dim(), size = s.n * s.c * s.h * s.w;
  const int64_t pixel = (s.n - 1) * p.x_stride_n;  // last example, channel 0, corner (0, 0)

  std::vector<double> x64(static_cast<size_t>(size)), one(static_cast<size_t>(size), 0.0);
  for (double& v : x64) v = grid(rng);
  one[pixel] = 1.0;
  std::vector<double> reads(static_cast<size_t>(D * D)), want(static_cast<size_t>(D * D));
  PatchCovarianceParams q = p;
  q.x_type = ElementType::kFloat64;
  q.x = one.data(), q.out = reads.data();
  kfac_kernels::cpu::patch_covariance(q);
  x64[pixel] = 0.0;
  q.x = x64.data(), q.out = want.data();
  kfac_kernels::cpu::patch_covariance(q);
  x64[pixel] = value;

  std::vector<A> x(x64.begin(), x64.end());
  A* dx = to_device(x);
  A* dout = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&dout), static_cast<size_t>(D * D) * sizeof(A)));
  p.x_type = type, p.x = dx, p.out = dout;
  const size_t ws_bytes = kfac_kernels::cuda::patch_covariance_workspace_bytes(p);
  void* ws = nullptr;
  if (ws_bytes) CUDA_OK(cudaMalloc(&ws, ws_bytes));
  CUDA_OK(kfac_kernels::cuda::patch_covariance(p, ws, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<A> got(static_cast<size_t>(D * D));
  CUDA_OK(cudaMemcpy(got.data(), dout, got.size() * sizeof(A), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dout);
  if (ws) cudaFree(ws);

  // float32: the entries are sums of products of grid values (|v| <= 2.5), of a few hundred
  // terms at most, rounded in another order than the CPU kernel's float64
  const double tol = sizeof(A) == 4 ? 2e-5 : 1e-12;
  double worst = 0;
  int64_t wrong_finiteness = 0;
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < D; ++j) {
      const size_t e = static_cast<size_t>(i * D + j);
      const double g = static_cast<double>(got[e]);
      // (the bias coordinate, last, is 1 whatever the input)
      auto reads_pixel = [&](int64_t d) {
        return d != D - 1 && reads[static_cast<size_t>(d * D + d)] != 0.0;
      };
      const bool involved = reads_pixel(i) || reads_pixel(j);
      if (involved) {
        if (!std::isfinite(value)) wrong_finiteness += std::isfinite(g) ? 1 : 0;
        continue;
      }
      if (!std::isfinite(g)) {
        ++wrong_finiteness;
        continue;
      }
      worst = std::max(worst, std::fabs(g - want[e]) / (1.0 + std::fabs(want[e])));
    }
  const bool pass = worst <= tol && wrong_finiteness == 0;
  (pass ? g_passed : g_failed)++;
  if (!pass || std::getenv("KFAC_KERNELS_TEST_VERBOSE"))
    std::printf("%s extreme pixel %g %s %s N=%lld C=%lld %lldx%lld D=%lld: error %.3g of the "
                "entries not involving it, %lld entries of the wrong finiteness\n",
                pass ? "ok  " : "FAIL", value, type_name(type), reduce ? "reduce" : "expand",
                static_cast<long long>(s.n), static_cast<long long>(s.c),
                static_cast<long long>(s.h), static_cast<long long>(s.w),
                static_cast<long long>(D), worst, static_cast<long long>(wrong_finiteness));
}

void run_extreme_pixels(uint64_t& seed) {
  // n, c, h, w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, segments, start, step, seg_channels
  const Shape shapes[] = {
      {2, 3, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 3},  // tile kernel, D = 28
      {2, 1, 9, 9, 3, 3, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1},  // small kernel, D = 10
  };
  const double values[] = {1e6, NAN, INFINITY};
  for (const Shape& s : shapes)
    for (int reduce = 0; reduce < 2; ++reduce)
      for (double v : values) {
        run_extreme_pixel<float>(s, reduce != 0, v, seed++);
        run_extreme_pixel<double>(s, reduce != 0, v, seed++);
      }
}

}  // namespace

int main(int argc, char** argv) {
  if (!device_visible()) return kNoDevice;
  const Sizes sizes = test_sizes(argc, argv);
  // n, c, h, w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, segments, start, step, seg_channels
  const Shape small[] = {
      {2, 3, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 3},    // 3x3, D = 27 / 28: one tile
      {1, 1, 9, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1},    // C = 1: small kernel, D = 9 / 10
      {2, 8, 9, 7, 3, 3, 2, 2, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1},    // depthwise, stride 2
      {2, 6, 8, 8, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0, 3},    // groups 2, dilation 2
      {1, 5, 6, 11, 1, 7, 1, 1, 1, 1, 0, 0, 3, 3, 0, 0, 0, 5},   // 1x7
      {2, 4, 10, 5, 3, 1, 3, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0, 4},   // 3x1, stride 3
      {2, 9, 7, 7, 5, 5, 2, 2, 1, 1, 2, 2, 2, 2, 0, 0, 0, 9},    // 5x5, D = 225: 4 x 4 tiles
      {1, 12, 5, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 12},  // 1x1, D = 12 / 13
      {2, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 3, 0, 2, 3},    // overlapping block segments
      {1, 70, 1, 40, 1, 3, 1, 1, 1, 1, 0, 0, 1, 1, 1, 5, 0, 60},  // conv1d, one block, D = 180
      {1, 2, 2, 40, 1, 33, 1, 1, 1, 1, 0, 0, 16, 16, 0, 0, 0, 2},  // 33 wide: per-offset means
  };
  const Shape large[] = {
      {4, 1, 40, 40, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1},     // small kernel + split
      {4, 2, 33, 35, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 2},     // tile + split, D = 18 / 19
      {2, 16, 24, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 16},   // 3 x 3 tiles + split
      {8, 64, 14, 14, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1},    // depthwise, 64 segments
      {1, 131080, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 2},  // 65540 segments, D = 18
      {4, 4096, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1},   // channels_last reduce: a thread
                                                                   // per mean-patch item
      {2, 3, 2, 600, 1, 3, 1, 2, 1, 1, 0, 0, 1, 1, 0, 0, 0, 3},    // 600 columns: past the tables
  };
  uint64_t seed = 1;
  for (const Shape& s : small) run_shape(s, seed, true);
  run_extreme_pixels(seed);
  for (const Shape& s : large) {
    if (sizes == Sizes::kSmall) break;
    if (sizes == Sizes::kQuick)
      run_shape_quick(s, seed, s.c / s.seg_channels > 65535);
    else
      run_shape(s, seed, false);
  }
  if (sizes != Sizes::kSmall) {
    // the thread-per-plane mean kernel with two passes of offsets (channels_last, 5x5, 16384
    // planes): reduce only, whose Gram of N = 1 mean patches is cheap to emulate
    const Shape passes = {1, 16384, 3, 3, 5, 5, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 1};
    run_one(passes, ElementType::kFloat64, true, true, kNHWC, seed);
    run_one(passes, ElementType::kFloat32, true, false, kNHWC, seed);
  }
  return finish();
}
