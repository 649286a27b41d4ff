// CPU kernel of the fused SINGD parameter step for block-diagonal factors (torch-free); see
// csrc/include/singd_block_step.h for the definition.
//
// One row panel (the rows of one block of C) at a time, per thread:
//   1. the panel of M = [dW | db], converted to the accumulation type (ni x width);
//   2. T = (C_i C_i^T) M_i, whose innermost loop runs along whole rows of the panel (long,
//      contiguous, vectorised);
//   3. P = T (K K^T) one column block after another; the innermost loop is one row of a block
//      of K K^T, of compile-time length for the common block sizes (8, 16, 32), so it is fully
//      unrolled into a few vector operations;
//   4. weight decay, momentum and the parameter update along the rows.
// Every panel is independent and computed by one thread in a fixed order, so the result does
// not depend on the number of threads. The panel functions are compiled for AVX-512, AVX2+FMA
// and the baseline ISA and chosen at run time (gram::current_isa, as the other CPU kernels).
#include "singd_block_step.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "bf16_bits.h"
#include "gram_tiles.h"
#include "singd_formulas.h"

namespace kfac_kernels {
namespace cpu {
namespace {

// X X^T of every n x n block (slots of ld x ld), into slots of the same size.
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

template <typename A>
struct Job {
  const SingdBlockStepParams<A>* p;
  const A* cct;          // C_i C_i^T, slots of bc x bc
  const A* kkt;          // K_j K_j^T, slots of bk x bk
  const int64_t* ro;     // row offset of every block of C
  const int64_t* co;     // column offset of every block of K
  int64_t width;         // cols + 1 with a bias
};

// y[0:n] += x * k[0:n]; N > 0: n == N known at compile time.
template <int N, typename A>
KFK_ALWAYS_INLINE void axpy(A* KFK_RESTRICT y, A x, const A* KFK_RESTRICT k, int64_t n) {
  if constexpr (N > 0) {
    KFK_UNROLL for (int c = 0; c < N; ++c) y[c] += x * k[c];
  } else {
    for (int64_t c = 0; c < n; ++c) y[c] += x * k[c];
  }
}

// The row panel of C block i; m, t, d: scratch of ni * width each.
template <typename A, typename Elem, int N>
KFK_ALWAYS_INLINE void panel_impl(const Job<A>& job, int64_t i, A* KFK_RESTRICT m,
                                  A* KFK_RESTRICT t, A* KFK_RESTRICT d) {
  const SingdBlockStepParams<A>& p = *job.p;
  const int64_t ni = p.c_dims[i], r0 = job.ro[i], cols = p.cols, width = job.width;
  const bool has_bias = p.bias != nullptr;
  const auto* wgrad = static_cast<const Elem*>(p.weight_grad);
  const auto* bgrad = static_cast<const Elem*>(p.bias_grad);
  for (int64_t r = 0; r < ni; ++r) {
    A* mr = m + r * width;
    const Elem* g = wgrad + (r0 + r) * cols;
    for (int64_t c = 0; c < cols; ++c) mr[c] = bf16::load_as<A>(g, c);
    if (has_bias) mr[cols] = bf16::load_as<A>(bgrad, r0 + r);
  }
  const A* ci = job.cct + i * p.bc * p.bc;
  std::fill(t, t + ni * width, A(0));
  for (int64_t r = 0; r < ni; ++r) {
    A* KFK_RESTRICT tr = t + r * width;
    for (int64_t s = 0; s < ni; ++s) {
      const A x = ci[r * p.bc + s];
      const A* KFK_RESTRICT ms = m + s * width;
      for (int64_t c = 0; c < width; ++c) tr[c] += x * ms[c];
    }
  }
  std::fill(d, d + ni * width, A(0));
  for (int64_t j = 0; j < p.k_blocks; ++j) {
    const int64_t nj = p.k_dims[j], c0 = job.co[j];
    const A* kj = job.kkt + j * p.bk * p.bk;
    for (int64_t r = 0; r < ni; ++r) {
      const A* tr = t + r * width + c0;
      A* dr = d + r * width + c0;
      if (N > 0 && nj == N) {
        for (int64_t s = 0; s < N; ++s) axpy<N>(dr, tr[s], kj + s * p.bk, N);
      } else {
        for (int64_t s = 0; s < nj; ++s) axpy<0>(dr, tr[s], kj + s * p.bk, nj);
      }
    }
  }
  const A lr = p.lr, mom = p.momentum, wd = p.weight_decay;
  auto* weight = static_cast<Elem*>(p.weight);
  for (int64_t r = 0; r < ni; ++r) {
    const A* dr = d + r * width;
    Elem* w = weight + (r0 + r) * cols;
    A* b = p.weight_buf + (r0 + r) * cols;
    for (int64_t c = 0; c < cols; ++c) {
      bf16::store_as(w, c, singd::step_entry(dr[c], bf16::load_as<A>(w, c), b[c], lr, mom, wd,
                                             p.first));
    }
    if (has_bias) {
      auto* bias = static_cast<Elem*>(p.bias);
      bf16::store_as(bias, r0 + r,
                     singd::step_entry(dr[cols], bf16::load_as<A>(bias, r0 + r),
                                       p.bias_buf[r0 + r], lr, mom, wd, p.first));
    }
  }
}

template <typename A, typename Elem>
KFK_ALWAYS_INLINE void panel_any(const Job<A>& job, int64_t i, A* m, A* t, A* d) {
  switch (job.p->bk) {
    case 8: return panel_impl<A, Elem, 8>(job, i, m, t, d);
    case 16: return panel_impl<A, Elem, 16>(job, i, m, t, d);
    case 32: return panel_impl<A, Elem, 32>(job, i, m, t, d);
    default: return panel_impl<A, Elem, 0>(job, i, m, t, d);
  }
}

template <typename A, typename Elem>
using PanelFn = void (*)(const Job<A>&, int64_t, A*, A*, A*);

template <typename A, typename Elem>
void panel_generic(const Job<A>& job, int64_t i, A* m, A* t, A* d) {
  panel_any<A, Elem>(job, i, m, t, d);
}

#if KFK_X86_DISPATCH
template <typename A, typename Elem>
KFK_TARGET("avx2,fma") void panel_avx2(const Job<A>& job, int64_t i, A* m, A* t, A* d) {
  panel_any<A, Elem>(job, i, m, t, d);
}
template <typename A, typename Elem>
KFK_TARGET("avx512f,avx2,fma") void panel_avx512(const Job<A>& job, int64_t i, A* m, A* t,
                                                 A* d) {
  panel_any<A, Elem>(job, i, m, t, d);
}
#endif

template <typename A, typename Elem>
PanelFn<A, Elem> panel_for(int isa) {
#if KFK_X86_DISPATCH
  if (isa == kIsaAvx512) return panel_avx512<A, Elem>;
  if (isa == kIsaAvx2) return panel_avx2<A, Elem>;
#endif
  (void)isa;
  return panel_generic<A, Elem>;
}

template <typename A, typename Elem>
void run(const SingdBlockStepParams<A>& p) {
  const std::vector<A> cct = outer_blocks(p.c, p.c_dims, p.c_blocks, p.bc);
  const std::vector<A> kkt = outer_blocks(p.k, p.k_dims, p.k_blocks, p.bk);
  std::vector<int64_t> ro(p.c_blocks + 1, 0), co(p.k_blocks + 1, 0);
  int64_t max_rows = 0;
  for (int64_t i = 0; i < p.c_blocks; ++i) {
    ro[i + 1] = ro[i] + p.c_dims[i];
    max_rows = std::max(max_rows, p.c_dims[i]);
  }
  for (int64_t j = 0; j < p.k_blocks; ++j) co[j + 1] = co[j] + p.k_dims[j];
  const Job<A> job{&p, cct.data(), kkt.data(), ro.data(), co.data(),
                   p.cols + (p.bias != nullptr ? 1 : 0)};
  const PanelFn<A, Elem> panel = panel_for<A, Elem>(current_isa());
  const size_t scratch = static_cast<size_t>(max_rows * job.width);
#ifdef _OPENMP
#pragma omp parallel if (p.c_blocks > 1)
#endif
  {
    gram::Buffer<A> m(scratch), t(scratch), d(scratch);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t i = 0; i < p.c_blocks; ++i) panel(job, i, m.get(), t.get(), d.get());
  }
}

}  // namespace

template <typename A>
void singd_block_step(const SingdBlockStepParams<A>& p) {
  if (p.rows <= 0 || p.c_blocks <= 0 || p.k_blocks <= 0) return;
  if (p.param_type == ElementType::kBFloat16) {
    run<A, uint16_t>(p);
  } else {
    run<A, A>(p);
  }
}

template void singd_block_step<float>(const SingdBlockStepParams<float>&);
template void singd_block_step<double>(const SingdBlockStepParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
