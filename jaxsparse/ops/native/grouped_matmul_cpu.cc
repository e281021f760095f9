// Grouped matrix multiplication for XLA:CPU (XLA FFI custom calls), float32: the expert
// computation of a dropless mixture-of-experts layer (MegaBlocks, Gale et al. 2022).
//
//   gmm:   out[r, :]   = lhs[r, :] · rhs[e(r)]            rows sorted by group, group e owning
//                                                         group_sizes[e] consecutive rows
//   tgmm:  drhs[e]     = Σ_{r in group e} lhs[r, :]ᵀ · dout[r, :]     (the weight gradient)
//
// Rows past Σ group_sizes give zeros in gmm and are ignored by tgmm. XLA's ragged_dot computes
// every group densely on CPU, and the scan over padded tiles (grouped.py's "tiles") spends most
// of its backward in scatters and per-tile dispatch; here each group is a plain GEMM over its
// own rows, with no copy of the rows and no padding.
//
// Work split: gmm hands out fixed tiles of rows (a tile straddling a group boundary runs one
// GEMM per group it touches); tgmm hands out (group, block of output rows, column panel)
// triples, each owning its outputs and summing its group's rows in order, so every result is
// bitwise repeatable whatever the thread count.

#include <string>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::blocked_gemm;
using jaxsparse_native::kPanelCols;
using jaxsparse_native::parallel_for;

constexpr int64_t kTileRows = 48;   // gmm: rows per task (8 micro-kernel row groups)
constexpr int64_t kBlockRows = 48;  // tgmm: output rows (lhs columns) per task

// Group start offsets; false when a size is negative. Sizes may sum to less than the rows
// (trailing rows belong to no group) but not to more.
bool group_starts(const ffi::Buffer<ffi::S32>& sizes, int64_t rows, std::vector<int64_t>* starts) {
  const int64_t groups = sizes.element_count();
  starts->assign(groups + 1, 0);
  for (int64_t e = 0; e < groups; ++e) {
    const int32_t size = sizes.typed_data()[e];
    if (size < 0) return false;
    (*starts)[e + 1] = (*starts)[e] + size;
  }
  return (*starts)[groups] <= rows;
}

ffi::Error size_error(const char* name) {
  return ffi::Error::InvalidArgument(
      std::string(name) + ": group_sizes must be >= 0 and sum to at most the rows of lhs");
}

// out [m, n] from lhs [m, k], rhs [E, k, n], group_sizes [E].
ffi::Error GroupedMatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                            ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::S32> group_sizes,
                            ffi::ResultBuffer<ffi::F32> out) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions();
  if (ld.size() != 2 || rd.size() != 3 || rd[1] != ld[1] ||
      group_sizes.element_count() != rd[0])
    return ffi::Error::InvalidArgument(
        "grouped_matmul_cpu: expected lhs [m, k], rhs [E, k, n], group_sizes [E]");
  const int64_t m = ld[0], k = ld[1], n = rd[2], groups = rd[0];
  std::vector<int64_t> starts;
  if (!group_starts(group_sizes, m, &starts)) return size_error("grouped_matmul_cpu");
  const float *a = lhs.typed_data(), *b = rhs.typed_data();
  float* c = out->typed_data();
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  parallel_for(pool, tiles, [&](int64_t tile) {
    const int64_t r0 = tile * kTileRows, r1 = std::min(m, r0 + kTileRows);
    // the first group whose rows reach past r0
    int64_t e = std::upper_bound(starts.begin() + 1, starts.end(), r0) - starts.begin() - 1;
    int64_t r = r0;
    for (; r < r1 && e < groups; ++e) {
      const int64_t end = std::min(r1, starts[e + 1]);
      if (end <= r) continue;  // an empty group
      blocked_gemm(a + r * k, k, 1, b + e * k * n, n, k, c + r * n, n, end - r, n);
      r = end;
    }
    for (; r < r1; ++r) std::fill(c + r * n, c + (r + 1) * n, 0.f);  // past every group
  });
  return ffi::Error::Success();
}

// drhs [E, k, n] from lhs [m, k], dout [m, n], group_sizes [E].
ffi::Error GroupedMatmulRhsGradF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                                   ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::S32> group_sizes,
                                   ffi::ResultBuffer<ffi::F32> drhs) {
  const auto ld = lhs.dimensions(), dd = dout.dimensions(), gd = drhs->dimensions();
  if (ld.size() != 2 || dd.size() != 2 || gd.size() != 3 || dd[0] != ld[0] || gd[1] != ld[1] ||
      gd[2] != dd[1] || group_sizes.element_count() != gd[0])
    return ffi::Error::InvalidArgument(
        "grouped_matmul_rhs_grad_cpu: expected lhs [m, k], dout [m, n], group_sizes [E], "
        "drhs [E, k, n]");
  const int64_t m = ld[0], k = ld[1], n = dd[1], groups = gd[0];
  std::vector<int64_t> starts;
  if (!group_starts(group_sizes, m, &starts)) return size_error("grouped_matmul_rhs_grad_cpu");
  const float *a = lhs.typed_data(), *g = dout.typed_data();
  float* c = drhs->typed_data();
  const int64_t row_blocks = (k + kBlockRows - 1) / kBlockRows;
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  parallel_for(pool, groups * row_blocks * panels, [&](int64_t task) {
    const int64_t e = task / (row_blocks * panels);
    const int64_t i0 = (task / panels) % row_blocks * kBlockRows, j0 = task % panels * kPanelCols;
    const int64_t rows = std::min(kBlockRows, k - i0), cols = std::min(kPanelCols, n - j0);
    const int64_t r0 = starts[e], depth = starts[e + 1] - r0;
    // Aᵀ read in place: element (i, r) of lhsᵀ is lhs[r·k + i] (row stride 1, depth stride k)
    blocked_gemm(a + r0 * k + i0, 1, k, g + r0 * n + j0, n, depth, c + (e * k + i0) * n + j0, n,
                 rows, cols);
  });
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseGroupedMatmulF32, GroupedMatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseGroupedMatmulRhsGradF32, GroupedMatmulRhsGradF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<F32Buffer>());
