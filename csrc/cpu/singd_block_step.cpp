// CPU kernel of the fused SINGD parameter step for block-diagonal factors (torch-free); see
// csrc/include/singd_block_step.h for the definition.
#include "singd_block_step.h"

#include <cstring>
#include <vector>

namespace kfac_kernels {
namespace cpu {
namespace {

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// X X^T of every n x n block (slots of ld x ld), into n x n arrays of the same slot size.
template <typename A>
std::vector<A> outer_blocks(const A* x, const int64_t* dims, int64_t blocks, int64_t ld) {
  std::vector<A> out(blocks * ld * ld, A(0));
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t n = dims[j];
    const A* b = x + j * ld * ld;
    A* o = out.data() + j * ld * ld;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        A s = 0;
        for (int64_t t = 0; t < n; ++t) s += b[r * ld + t] * b[c * ld + t];
        o[r * ld + c] = s;
      }
  }
  return out;
}

template <typename A, typename Elem>
void run(const SingdBlockStepParams<A>& p) {
  auto* weight = static_cast<Elem*>(p.weight);
  const auto* wgrad = static_cast<const Elem*>(p.weight_grad);
  auto* bias = static_cast<Elem*>(p.bias);
  const auto* bgrad = static_cast<const Elem*>(p.bias_grad);
  auto load = [](const Elem* ptr, int64_t i) -> A {
    if constexpr (sizeof(Elem) == 2) {
      return A(bf16_bits_to_float(ptr[i]));
    } else {
      return A(ptr[i]);
    }
  };
  auto store = [](Elem* ptr, int64_t i, A v) {
    if constexpr (sizeof(Elem) == 2) {
      ptr[i] = float_to_bf16_bits(static_cast<float>(v));
    } else {
      ptr[i] = static_cast<Elem>(v);
    }
  };
  const std::vector<A> cct = outer_blocks(p.c, p.c_dims, p.c_blocks, p.bc);
  const std::vector<A> kkt = outer_blocks(p.k, p.k_dims, p.k_blocks, p.bk);
  std::vector<int64_t> ro(p.c_blocks + 1, 0), co(p.k_blocks + 1, 0);
  for (int64_t i = 0; i < p.c_blocks; ++i) ro[i + 1] = ro[i] + p.c_dims[i];
  for (int64_t j = 0; j < p.k_blocks; ++j) co[j + 1] = co[j] + p.k_dims[j];
  const A lr = p.lr, mom = p.momentum, wd = p.weight_decay;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (p.c_blocks > 1)
#endif
  for (int64_t i = 0; i < p.c_blocks; ++i) {
    const int64_t ni = p.c_dims[i];
    const A* ci = cct.data() + i * p.bc * p.bc;
    std::vector<A> m, a1, dd;
    for (int64_t j = 0; j < p.k_blocks; ++j) {
      const int64_t nj = p.k_dims[j];
      const A* kj = kkt.data() + j * p.bk * p.bk;
      m.assign(ni * nj, A(0));
      a1.assign(ni * nj, A(0));
      for (int64_t r = 0; r < ni; ++r)
        for (int64_t c = 0; c < nj; ++c) {
          const int64_t gr = ro[i] + r, gc = co[j] + c;
          m[r * nj + c] = gc < p.cols ? load(wgrad, gr * p.cols + gc) : load(bgrad, gr);
        }
      // (C C^T) M, then ((C C^T) M) (K K^T) into dd; the innermost loops run along
      // contiguous rows so the compiler vectorises them
      for (int64_t r = 0; r < ni; ++r)
        for (int64_t t = 0; t < ni; ++t) {
          const A x = ci[r * p.bc + t];
          for (int64_t c = 0; c < nj; ++c) a1[r * nj + c] += x * m[t * nj + c];
        }
      dd.assign(ni * nj, A(0));
      for (int64_t r = 0; r < ni; ++r)
        for (int64_t t = 0; t < nj; ++t) {
          const A x = a1[r * nj + t];
          for (int64_t c = 0; c < nj; ++c) dd[r * nj + c] += x * kj[t * p.bk + c];
        }
      for (int64_t r = 0; r < ni; ++r)
        for (int64_t c = 0; c < nj; ++c) {
          A d = dd[r * nj + c];
          const int64_t gr = ro[i] + r, gc = co[j] + c;
          const bool is_w = gc < p.cols;
          Elem* pp = is_w ? weight : bias;
          A* bp = is_w ? p.weight_buf : p.bias_buf;
          const int64_t idx = is_w ? gr * p.cols + gc : gr;
          const A pv = load(pp, idx);
          if (wd != A(0)) d = d + wd * pv;
          const A bv = p.first ? d : mom * bp[idx] + d;
          bp[idx] = bv;
          store(pp, idx, pv - lr * bv);
        }
    }
  }
}

}  // namespace

template <typename A>
void singd_block_step(const SingdBlockStepParams<A>& p) {
  if (p.rows <= 0 || p.c_blocks <= 0 || p.k_blocks <= 0) return;
  if (p.param_type == StepParamType::kBFloat16) {
    run<A, uint16_t>(p);
  } else {
    run<A, A>(p);
  }
}

template void singd_block_step<float>(const SingdBlockStepParams<float>&);
template void singd_block_step<double>(const SingdBlockStepParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
