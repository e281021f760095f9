// First-order linear recurrence for XLA:CPU (XLA FFI custom calls), float32:
//
//   h_t = a_t ⊙ h_{t-1} + x_t        over [batch, L, width], h_{-1} = h0 [batch, width]
//
// XLA runs lax.scan as one small dispatch per step (a while loop of [batch, width] element-wise
// ops), and its associative form makes log L passes over the whole sequence; here each task
// steps a block of up to 256 channels of one batch row through time with the state in
// registers (or L1), so the work is one FMA per 16 elements and every input is read once.
//
// Why blocks of 256 channels rather than 16: a task walking a single 64-byte column reads one
// cache line per step with a stride of the row width (4 KB at width 1024, a new page every
// step), which the hardware prefetcher does not follow; a 1 KB contiguous run per step it does.
// Blocks shrink (down to 16 channels) when there would otherwise be fewer than two tasks per
// thread.
//
// The backward kernel walks time in reverse with the cotangent of the state,
//   λ_t = g_t + a_{t+1} λ_{t+1}   (λ_{L-1} = g_{L-1} + g_final),
// and writes d_x_t = λ_t and d_a_t = λ_t ⊙ h_{t-1} in the same pass; d_h0 = a_0 λ_0. Done in
// XLA around a reverse scan this took five more passes over [batch, L, width] arrays (the
// shifted decays, h_{t-1}, the product).

#include <initializer_list>
#include <string>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::kLanes;
using jaxsparse_native::load;
using jaxsparse_native::parallel_for;
using jaxsparse_native::store;
using jaxsparse_native::Vec;

constexpr int64_t kMaxVectorsPerTask = 16;  // 256 channels: 1 KB contiguous per step

// The channels of one task: vectors [v0, v0 + count) of batch row b.
struct Block {
  int64_t b, v0, count;
  bool full;  // no ragged vector at the end of the row
};

// Runs body(Block) for every (batch row, channel block), in parallel.
template <typename Body>
void for_each_block(ffi::ThreadPool& pool, int64_t batch, int64_t width, Body body) {
  const int64_t vectors = (width + kLanes - 1) / kLanes;  // 16-channel vectors per row
  const int64_t threads = static_cast<int64_t>(pool.num_threads()) + 1;  // the caller works too
  int64_t per_task = std::min<int64_t>(kMaxVectorsPerTask, vectors);
  while (per_task > 1 && batch * ((vectors + per_task - 1) / per_task) < 2 * threads)
    per_task = (per_task + 1) / 2;
  const int64_t blocks = (vectors + per_task - 1) / per_task;
  parallel_for(pool, batch * blocks, [&](int64_t task) {
    const int64_t v0 = (task % blocks) * per_task, count = std::min(per_task, vectors - v0);
    body(Block{task / blocks, v0, count, (v0 + count) * kLanes <= width});
  });
}

// lanes of vector i of a block: only the row's last vector can be partial
inline int lanes_of(const Block& k, int64_t i, int64_t width) {
  return static_cast<int>(std::min<int64_t>(kLanes, width - (k.v0 + i) * kLanes));
}

ffi::Error CheckShapes(const char* name, ffi::Span<const int64_t> dims,
                       std::initializer_list<ffi::Span<const int64_t>> same,
                       std::initializer_list<ffi::Span<const int64_t>> states) {
  if (dims.size() != 3)
    return ffi::Error::InvalidArgument(std::string(name) + ": sequences must be [batch, L, width]");
  for (auto d : same)
    if (d.size() != 3 || d[0] != dims[0] || d[1] != dims[1] || d[2] != dims[2])
      return ffi::Error::InvalidArgument(std::string(name) + ": sequences must have one shape");
  for (auto d : states)
    if (d.size() != 2 || d[0] != dims[0] || d[1] != dims[2])
      return ffi::Error::InvalidArgument(std::string(name) + ": states must be [batch, width]");
  return ffi::Error::Success();
}

ffi::Error LinearScanF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> hs,
                         ffi::ResultBuffer<ffi::F32> final_state) {
  const auto dims = x.dimensions();
  if (auto e = CheckShapes("linear_scan_cpu", dims, {a.dimensions()}, {h0.dimensions()});
      e.failure())
    return e;
  const int64_t length = dims[1], width = dims[2];
  const float *ap = a.typed_data(), *xp = x.typed_data(), *h0p = h0.typed_data();
  float *hp = hs->typed_data(), *fp = final_state->typed_data();
  for_each_block(pool, dims[0], width, [&](const Block& k) {
    Vec h[kMaxVectorsPerTask];
    const int64_t state = k.b * width + k.v0 * kLanes;
    for (int64_t i = 0; i < k.count; ++i) h[i] = load(h0p + state + i * kLanes, lanes_of(k, i, width));
    for (int64_t t = 0; t < length; ++t) {
      const int64_t row = (k.b * length + t) * width + k.v0 * kLanes;
      for (int64_t i = 0; i < k.count; ++i) {
        const int n = k.full ? kLanes : lanes_of(k, i, width);
        const int64_t at = row + i * kLanes;
        h[i] = load(ap + at, n) * h[i] + load(xp + at, n);
        store(hp + at, h[i], n);
      }
    }
    for (int64_t i = 0; i < k.count; ++i) store(fp + state + i * kLanes, h[i], lanes_of(k, i, width));
  });
  return ffi::Error::Success();
}

ffi::Error LinearScanBwdF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> g_final,
                            ffi::ResultBuffer<ffi::F32> d_a, ffi::ResultBuffer<ffi::F32> d_x,
                            ffi::ResultBuffer<ffi::F32> d_h0) {
  const auto dims = g.dimensions();
  if (auto e = CheckShapes("linear_scan_bwd_cpu", dims, {a.dimensions(), hs.dimensions()},
                           {h0.dimensions(), g_final.dimensions()});
      e.failure())
    return e;
  const int64_t length = dims[1], width = dims[2];
  const float *ap = a.typed_data(), *hp = hs.typed_data(), *h0p = h0.typed_data();
  const float *gp = g.typed_data(), *gfp = g_final.typed_data();
  float *dap = d_a->typed_data(), *dxp = d_x->typed_data(), *dh0p = d_h0->typed_data();
  for_each_block(pool, dims[0], width, [&](const Block& k) {
    // carry[i] = a_{t+1} λ_{t+1}: what step t+1 hands back to step t (g_final at the end)
    Vec carry[kMaxVectorsPerTask];
    const int64_t state = k.b * width + k.v0 * kLanes;
    for (int64_t i = 0; i < k.count; ++i)
      carry[i] = load(gfp + state + i * kLanes, lanes_of(k, i, width));
    for (int64_t t = length - 1; t >= 0; --t) {
      const int64_t row = (k.b * length + t) * width + k.v0 * kLanes;
      for (int64_t i = 0; i < k.count; ++i) {
        const int n = k.full ? kLanes : lanes_of(k, i, width);
        const int64_t at = row + i * kLanes;
        const Vec lam = load(gp + at, n) + carry[i];
        const Vec previous = t > 0 ? load(hp + at - width, n) : load(h0p + state + i * kLanes, n);
        store(dxp + at, lam, n);
        store(dap + at, lam * previous, n);
        carry[i] = load(ap + at, n) * lam;
      }
    }
    for (int64_t i = 0; i < k.count; ++i)
      store(dh0p + state + i * kLanes, carry[i], lanes_of(k, i, width));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseLinearScanF32, LinearScanF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [batch, L, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [batch, L, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [batch, width]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs [batch, L, width]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // final state [batch, width]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseLinearScanBwdF32, LinearScanBwdF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [batch, L, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs [batch, L, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [batch, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g = d hs [batch, L, width]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_final [batch, width]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_a [batch, L, width]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_x [batch, L, width]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_h0 [batch, width]
