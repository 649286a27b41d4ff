// CPU kernel of the damped Cholesky factors (torch-free; see csrc/include/block_damped_cholesky.h).
#include "block_damped_cholesky.h"

#include <limits>

namespace kfac_kernels {
namespace cpu {

template <typename T>
void block_damped_cholesky(const BlockDampedCholeskyParams<T>& p) {
  const int64_t n = p.n;
  const int ni = static_cast<int>(n);
  for (int64_t b = 0; b < p.batch; ++b) {
    const T* a = p.blocks + b * n * n;
    T* l = p.factors + b * n * n;
    const T gamma = p.damping[b];
    for (int64_t i = 0; i < n; ++i) {
      const T* ai = a + i * n;
      T* li = l + i * n;
      for (int64_t j = 0; j < i; ++j) {
        li[j] = ai[j];
      }
      li[i] = ai[i] + gamma;
      for (int64_t j = i + 1; j < n; ++j) li[j] = T(0);
    }
    int info = 0;
    // Column-major, "U" names the row-major lower triangle; its result U = L^T in place.
    if (n > 0) p.potrf("U", &ni, l, &ni, &info);
    if (info != 0) {
      for (int64_t k = 0; k < n * n; ++k) l[k] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

template void block_damped_cholesky<float>(const BlockDampedCholeskyParams<float>&);
template void block_damped_cholesky<double>(const BlockDampedCholeskyParams<double>&);

}  // namespace cpu
}  // namespace kfac_kernels
