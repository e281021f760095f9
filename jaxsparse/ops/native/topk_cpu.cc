// Top-k indices of each row for XLA:CPU (an XLA FFI custom call), float32.
//
// XLA:CPU sorts for lax.top_k; for the small k of product-key lookups (k = 16..32 of 64..1024
// entries, thousands of rows) most of that sort is wasted: 25 ms for a 4096-token PKM layer
// of hydra_tiny. Here each row keeps its best k in a sorted buffer and an entry is inserted
// only when it beats the buffer's last one — about n comparisons per row.
//
// Order: lax.top_k's, a total order on float32 (−NaN < −inf < … < −0 < +0 < … < +inf < +NaN),
// descending; equal entries keep index order (the lower index first). Only the indices are
// returned: the caller gathers the values from its input, which keeps them differentiable.

#include <cstring>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerTask = 128;

// A signed integer that orders float32 bit patterns as the total order above.
inline int32_t order_key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits < 0 ? bits ^ 0x7fffffff : bits;
}

void row_top_k(const float* x, int64_t n, int64_t k, int32_t* out, int32_t* keys) {
  int64_t filled = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t key = order_key(x[j]);
    if (filled == k && key <= keys[k - 1]) continue;  // ties: the earlier index stays ahead
    int64_t pos = filled < k ? filled++ : k - 1;
    for (; pos > 0 && keys[pos - 1] < key; --pos) {
      keys[pos] = keys[pos - 1];
      out[pos] = out[pos - 1];
    }
    keys[pos] = key;
    out[pos] = static_cast<int32_t>(j);
  }
}

// indices [rows, k] of x [rows, n], 1 <= k <= n.
ffi::Error TopKIndicesF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::S32> indices) {
  const auto xd = x.dimensions(), id = indices->dimensions();
  if (xd.size() != 2 || id.size() != 2 || xd[0] != id[0] || id[1] < 1 || id[1] > xd[1])
    return ffi::Error::InvalidArgument(
        "top_k_cpu: expected x [rows, n] and indices [rows, k] with 1 <= k <= n");
  const int64_t rows = xd[0], n = xd[1], k = id[1];
  const float* xp = x.typed_data();
  int32_t* out = indices->typed_data();
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  jaxsparse_native::parallel_for(pool, tasks, [&](int64_t task) {
    std::unique_ptr<int32_t[]> keys(new int32_t[k]);
    const int64_t r1 = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < r1; ++r)
      row_top_k(xp + r * n, n, k, out + r * k, keys.get());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseTopKIndicesF32, TopKIndicesF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
