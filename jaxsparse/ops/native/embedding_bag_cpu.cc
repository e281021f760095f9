// Weighted embedding bag for XLA:CPU (XLA FFI custom calls), float32: the read of a
// product-key memory (Lample et al. 2019), and its backward.
//
//   out[t, :]      = Σ_j w[t, j] · values[slot[t, j], :]
//   d_w[t, j]      = d_out[t, :] · values[slot[t, j], :]
//   d_values[s, :] = Σ_{(t, j): slot[t, j] = s} w[t, j] · d_out[t, :]
//
// Nothing of size tokens × picks × width is ever formed. XLA has no such op: as a scan over the
// picks its backward is one scatter of every token's row into the whole table per pick, 4 s of
// a 8k-token hydra_29m step on 2 cores.
//
// The value gradient is a scatter-add, made deterministic and parallel by a stable counting
// sort of the picks by slot: each task owns a range of slots and adds its picks in (t, j)
// order, so the sums never depend on the thread count or timing.

#include <string>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::kLanes;
using jaxsparse_native::load;
using jaxsparse_native::parallel_for;
using jaxsparse_native::store;
using jaxsparse_native::Vec;

constexpr int64_t kTokensPerTask = 64;
constexpr int64_t kSlotTasks = 64;  // ranges of slots of the value gradient

struct Shape {
  int64_t tokens, picks, slots, width;
};

// Checks the shapes and that every slot index is in [0, slots).
ffi::Error check(const ffi::Buffer<ffi::F32>& w, const ffi::Buffer<ffi::S32>& slot,
                 const ffi::Buffer<ffi::F32>& values, Shape* sh) {
  const auto wd = w.dimensions(), sd = slot.dimensions(), vd = values.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || vd.size() != 2 || wd[0] != sd[0] || wd[1] != sd[1])
    return ffi::Error::InvalidArgument(
        "embedding_bag_cpu: expected weights [T, J], slots [T, J], values [N, V]");
  *sh = Shape{wd[0], wd[1], vd[0], vd[1]};
  const int32_t* s = slot.typed_data();
  for (int64_t i = 0; i < sh->tokens * sh->picks; ++i)
    if (s[i] < 0 || s[i] >= sh->slots)
      return ffi::Error::InvalidArgument("embedding_bag_cpu: slot index " + std::to_string(s[i]) +
                                         " outside the table's " + std::to_string(sh->slots) +
                                         " rows");
  return ffi::Error::Success();
}

// y[0:n) += a · x[0:n)
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t c = 0;
  const Vec va = Vec{} + a;
  for (; c + kLanes <= n; c += kLanes) store(y + c, load(y + c) + va * load(x + c));
  if (c < n) {
    const int rest = static_cast<int>(n - c);
    store(y + c, load(y + c, rest) + va * load(x + c, rest), rest);
  }
}

inline float dot(const float* x, const float* y, int64_t n) {
  Vec acc{};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) acc += load(x + c) * load(y + c);
  if (c < n) {
    const int rest = static_cast<int>(n - c);
    acc += load(x + c, rest) * load(y + c, rest);
  }
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += acc[i];
  return total;
}

ffi::Error EmbeddingBagF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::F32> values,
                           ffi::ResultBuffer<ffi::F32> out) {
  Shape sh;
  if (auto err = check(w, slot, values, &sh); err.failure()) return err;
  const float *wp = w.typed_data(), *vp = values.typed_data();
  const int32_t* sp = slot.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = (sh.tokens + kTokensPerTask - 1) / kTokensPerTask;
  parallel_for(pool, tasks, [&](int64_t task) {
    const int64_t t1 = std::min(sh.tokens, (task + 1) * kTokensPerTask);
    for (int64_t t = task * kTokensPerTask; t < t1; ++t) {
      float* row = op + t * sh.width;
      std::fill(row, row + sh.width, 0.f);
      for (int64_t j = 0; j < sh.picks; ++j)
        axpy(wp[t * sh.picks + j], vp + sp[t * sh.picks + j] * sh.width, row, sh.width);
    }
  });
  return ffi::Error::Success();
}

ffi::Error EmbeddingBagBackwardF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                                   ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::F32> values,
                                   ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_w,
                                   ffi::ResultBuffer<ffi::F32> d_values) {
  Shape sh;
  if (auto err = check(w, slot, values, &sh); err.failure()) return err;
  const auto dd = d_out.dimensions();
  if (dd.size() != 2 || dd[0] != sh.tokens || dd[1] != sh.width)
    return ffi::Error::InvalidArgument("embedding_bag_backward_cpu: d_out must be [T, V]");
  const float *wp = w.typed_data(), *vp = values.typed_data(), *gp = d_out.typed_data();
  const int32_t* sp = slot.typed_data();
  float *dwp = d_w->typed_data(), *dvp = d_values->typed_data();

  const int64_t token_tasks = (sh.tokens + kTokensPerTask - 1) / kTokensPerTask;
  parallel_for(pool, token_tasks, [&](int64_t task) {  // d_w: one dot per pick
    const int64_t t1 = std::min(sh.tokens, (task + 1) * kTokensPerTask);
    for (int64_t t = task * kTokensPerTask; t < t1; ++t)
      for (int64_t j = 0; j < sh.picks; ++j)
        dwp[t * sh.picks + j] =
            dot(gp + t * sh.width, vp + sp[t * sh.picks + j] * sh.width, sh.width);
  });

  // Picks sorted by slot (stable: (t, j) order within a slot), as offsets into `order`.
  const int64_t total = sh.tokens * sh.picks;
  std::vector<int64_t> start(sh.slots + 1, 0);
  for (int64_t i = 0; i < total; ++i) ++start[sp[i] + 1];
  for (int64_t s = 0; s < sh.slots; ++s) start[s + 1] += start[s];
  std::vector<int64_t> order(total), fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < total; ++i) order[fill[sp[i]]++] = i;

  const int64_t slot_tasks = std::min<int64_t>(kSlotTasks, std::max<int64_t>(sh.slots, 1));
  parallel_for(pool, slot_tasks, [&](int64_t task) {
    const int64_t s0 = task * sh.slots / slot_tasks, s1 = (task + 1) * sh.slots / slot_tasks;
    for (int64_t s = s0; s < s1; ++s) {
      float* row = dvp + s * sh.width;
      std::fill(row, row + sh.width, 0.f);
      for (int64_t p = start[s]; p < start[s + 1]; ++p) {
        const int64_t pick = order[p];
        axpy(wp[pick], gp + (pick / sh.picks) * sh.width, row, sh.width);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::F32>;
using S32Buffer = ffi::Buffer<ffi::S32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseEmbeddingBagF32, EmbeddingBagF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<S32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseEmbeddingBagBackwardF32, EmbeddingBagBackwardF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<S32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());
