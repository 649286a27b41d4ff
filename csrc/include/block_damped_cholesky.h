// Damped Cholesky factors of a stack of symmetric blocks, torch-free declarations.
//
// For every block b of a dense row-major (batch, n, n) stack, with A = the symmetric matrix
// whose lower triangle is blocks[b] (only entries i >= j are read):
//
//     L L^T = A + damping[b] I,   L lower triangular (written with zeros above the diagonal)
//
// by LAPACK's ?potrf, which the caller supplies (the torch glue passes the LAPACK that torch
// itself links; the standalone test passes a reference factorisation). A row-major L is a
// column-major upper factor U = L^T of the same storage, so the routine is called with uplo "U"
// on the copy as it lies: no transposition, and the copy that adds the damping also zeroes the
// upper triangle (one pass over the block, where torch.linalg.cholesky_ex makes a column-major
// copy first and zeroes the other triangle in a further pass).
//
// A block whose factorisation fails (?potrf's info > 0: a pivot not positive, or NaN, after the
// damping) is all NaN; the other blocks are unaffected. A non-finite entry otherwise propagates
// as the factorisation's arithmetic carries it (as in torch.linalg.cholesky_ex: the same LAPACK).
#pragma once

#include <cstdint>

namespace kfac_kernels {

// LAPACK ?potrf: factorises the column-major n x n matrix a (leading dimension lda) in place.
template <typename T>
using PotrfFn = void (*)(const char* uplo, const int* n, T* a, const int* lda, int* info);

template <typename T>
struct BlockDampedCholeskyParams {
  const T* blocks = nullptr;   // dense (batch, n, n), row-major; lower triangle read
  const T* damping = nullptr;  // (batch)
  T* factors = nullptr;        // (batch, n, n), row-major: L, zeros above the diagonal
  int64_t batch = 0;
  int64_t n = 0;               // at most INT32_MAX (LAPACK's int)
  PotrfFn<T> potrf = nullptr;
};

namespace cpu {

// One block after another (?potrf threads internally); instantiated for float and double.
template <typename T>
void block_damped_cholesky(const BlockDampedCholeskyParams<T>& p);

}  // namespace cpu
}  // namespace kfac_kernels
