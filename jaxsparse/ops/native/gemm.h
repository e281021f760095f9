// A small float32 GEMM for the native kernels: a register-blocked micro-kernel (6 rows × 64
// columns of FMAs on 16-float vectors) and a cache-blocked driver for operands that do not fit
// in L2. The left operand is read one scalar at a time through two strides, so a transposed or
// permuted A costs nothing extra (the Monarch kernel reads its permutation this way, the
// grouped matmul's weight gradient reads Aᵀ).
#ifndef JAXSPARSE_NATIVE_GEMM_H_
#define JAXSPARSE_NATIVE_GEMM_H_

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace jaxsparse_native {

// C[MR, NV·16] (+)= Σ_k A[i·lda + k·a_step] · B[k·ldb + :]. A is read one scalar at a time,
// so any strides work for it; B rows must be contiguous.
template <int MR, int NV, bool ACC>
inline void micro_kernel(const float* a, int64_t lda, int64_t a_step, const float* bm,
                         int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = ACC ? load(c + i * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load(bm + k * ldb + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const float s = a[i * lda + k * a_step];
      for (int v = 0; v < NV; ++v) acc[i][v] += s * row[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * kLanes, acc[i][v]);
}

// Rows [0, rows) of C[:, cols) — any size: full 6×64 blocks, then narrower vector blocks, then a
// scalar loop for the last cols % 16 columns.
template <int MR, bool ACC>
void row_block(const float* a, int64_t lda, int64_t a_step, const float* bm, int64_t ldb,
               int64_t depth, float* c, int64_t ldc, int64_t cols) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= cols; j += 4 * kLanes)
    micro_kernel<MR, 4, ACC>(a, lda, a_step, bm + j, ldb, depth, c + j, ldc);
  for (; j + kLanes <= cols; j += kLanes)
    micro_kernel<MR, 1, ACC>(a, lda, a_step, bm + j, ldb, depth, c + j, ldc);
  for (; j < cols; ++j)
    for (int i = 0; i < MR; ++i) {
      float acc = ACC ? c[i * ldc + j] : 0.f;
      for (int64_t k = 0; k < depth; ++k) acc += a[i * lda + k * a_step] * bm[k * ldb + j];
      c[i * ldc + j] = acc;
    }
}

// C[rows, cols] (+)= A[rows, depth] · B[depth, cols], A read at (row·lda + k·a_step).
template <bool ACC = false>
void gemm(const float* a, int64_t lda, int64_t a_step, const float* bm, int64_t ldb,
          int64_t depth, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= rows; i += MR)
    row_block<MR, ACC>(a + i * lda, lda, a_step, bm, ldb, depth, c + i * ldc, ldc, cols);
  for (; i < rows; ++i)
    row_block<1, ACC>(a + i * lda, lda, a_step, bm, ldb, depth, c + i * ldc, ldc, cols);
}

// Column panels of B swept by every row block while they stay in L2 (128 depth × 256 columns
// × 4 bytes = 128 KiB).
constexpr int64_t kPanelCols = 256, kDepthBlock = 128;

// gemm() for any size: C[rows, cols] (+)= A[rows, depth] · B[depth, cols], columns in panels
// and depth in blocks so the part of B being swept stays in cache.
template <bool ACC = false>
void blocked_gemm(const float* a, int64_t lda, int64_t a_step, const float* bm, int64_t ldb,
                  int64_t depth, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  if (depth == 0) {
    if (!ACC)
      for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + cols, 0.f);
    return;
  }
  for (int64_t j0 = 0; j0 < cols; j0 += kPanelCols) {
    const int64_t nc = std::min(kPanelCols, cols - j0);
    for (int64_t p0 = 0; p0 < depth; p0 += kDepthBlock) {
      const int64_t kc = std::min(kDepthBlock, depth - p0);
      const float* ap = a + p0 * a_step;
      const float* bp = bm + p0 * ldb + j0;
      if (ACC || p0 > 0) gemm<true>(ap, lda, a_step, bp, ldb, kc, c + j0, ldc, rows, nc);
      else gemm<false>(ap, lda, a_step, bp, ldb, kc, c + j0, ldc, rows, nc);
    }
  }
}

}  // namespace jaxsparse_native

#endif  // JAXSPARSE_NATIVE_GEMM_H_
