// First-order linear recurrence for XLA:CPU (an XLA FFI custom call), float32:
//
//   h_t = a_t ⊙ h_{t-1} + x_t        over [batch, L, width], h_{-1} = h0 [batch, width]
//
// or, with reverse = 1, the same recurrence run from t = L-1 down to 0 (h_{L} = h0). XLA runs
// lax.scan as one small dispatch per step (a while loop of [batch, width] element-wise ops),
// and its associative form makes log L passes over the whole sequence; here each task steps a
// block of up to 256 channels of one batch row through time with the state in registers (or
// L1), so the work is one FMA per 16 elements and every input is read once.
//
// Why blocks of 256 channels rather than 16: a task walking a single 64-byte column reads one
// cache line per step with a stride of the row width (4 KB at width 1024, a new page every
// step), which the hardware prefetcher does not follow; a 1 KB contiguous run per step it does.
// Blocks shrink (down to 16 channels) when there would otherwise be fewer than two tasks per
// thread.
//
// The reverse form is what the backward pass needs: the cotangent of h_t is
// λ_t = g_t + a_{t+1} λ_{t+1}, a reverse scan with the decays shifted by one step.

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::kLanes;
using jaxsparse_native::load;
using jaxsparse_native::parallel_for;
using jaxsparse_native::store;
using jaxsparse_native::Vec;

constexpr int64_t kMaxVectorsPerTask = 16;  // 256 channels: 1 KB contiguous per step

ffi::Error LinearScanF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> h0, int64_t reverse,
                         ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> final_state) {
  const auto dims = x.dimensions();
  if (dims.size() != 3 || a.dimensions().size() != 3 || h0.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("linear_scan_cpu: a, x must be [batch, L, width], h0 [batch, width]");
  const int64_t batch = dims[0], length = dims[1], width = dims[2];
  for (int i = 0; i < 3; ++i)
    if (a.dimensions()[i] != dims[i])
      return ffi::Error::InvalidArgument("linear_scan_cpu: a and x must have one shape");
  if (h0.dimensions()[0] != batch || h0.dimensions()[1] != width)
    return ffi::Error::InvalidArgument("linear_scan_cpu: h0 must be [batch, width]");
  const float *ap = a.typed_data(), *xp = x.typed_data(), *h0p = h0.typed_data();
  float *hp = hs->typed_data(), *fp = final_state->typed_data();
  const int64_t vectors = (width + kLanes - 1) / kLanes;  // 16-channel vectors per row
  const int64_t threads = static_cast<int64_t>(pool.num_threads()) + 1;  // the caller works too
  int64_t per_task = std::min<int64_t>(kMaxVectorsPerTask, vectors);
  while (per_task > 1 && batch * ((vectors + per_task - 1) / per_task) < 2 * threads)
    per_task = (per_task + 1) / 2;
  const int64_t blocks = (vectors + per_task - 1) / per_task;
  parallel_for(pool, batch * blocks, [&](int64_t task) {
    const int64_t b = task / blocks, v0 = (task % blocks) * per_task;
    const int64_t count = std::min(per_task, vectors - v0);
    // only the row's last vector can be partial
    auto lanes = [&](int64_t i) {
      return static_cast<int>(std::min<int64_t>(kLanes, width - (v0 + i) * kLanes));
    };
    Vec h[kMaxVectorsPerTask];
    for (int64_t i = 0; i < count; ++i) h[i] = load(h0p + b * width + (v0 + i) * kLanes, lanes(i));
    const bool full = (v0 + count) * kLanes <= width;
    for (int64_t step = 0; step < length; ++step) {
      const int64_t t = reverse ? length - 1 - step : step;
      const int64_t row = (b * length + t) * width + v0 * kLanes;
      if (full) {
        for (int64_t i = 0; i < count; ++i) {
          h[i] = load(ap + row + i * kLanes) * h[i] + load(xp + row + i * kLanes);
          store(hp + row + i * kLanes, h[i]);
        }
      } else {
        for (int64_t i = 0; i < count; ++i) {
          const int n = lanes(i);
          h[i] = load(ap + row + i * kLanes, n) * h[i] + load(xp + row + i * kLanes, n);
          store(hp + row + i * kLanes, h[i], n);
        }
      }
    }
    for (int64_t i = 0; i < count; ++i) store(fp + b * width + (v0 + i) * kLanes, h[i], lanes(i));
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
                                  .Attr<int64_t>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs [batch, L, width]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // final state [batch, width]
