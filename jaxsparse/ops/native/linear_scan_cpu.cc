// First-order linear recurrence for XLA:CPU (an XLA FFI custom call), float32:
//
//   h_t = a_t ⊙ h_{t-1} + x_t        over [batch, L, width], h_{-1} = h0 [batch, width]
//
// or, with reverse = 1, the same recurrence run from t = L-1 down to 0 (h_{L} = h0). XLA runs
// lax.scan as one small dispatch per step (a while loop of [batch, width] element-wise ops),
// and its associative form makes log L passes over the whole sequence; here each task steps
// 16 channels of one batch row through time with the state in a vector register, so the work
// is one FMA per 16 elements and every input is read once.
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
  const int64_t blocks = (width + kLanes - 1) / kLanes;
  parallel_for(pool, batch * blocks, [&](int64_t task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kLanes;
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, width - c0));
    Vec h = load(h0p + b * width + c0, lanes);
    for (int64_t step = 0; step < length; ++step) {
      const int64_t t = reverse ? length - 1 - step : step;
      const int64_t at = (b * length + t) * width + c0;
      h = load(ap + at, lanes) * h + load(xp + at, lanes);
      store(hp + at, h, lanes);
    }
    store(fp + b * width + c0, h, lanes);
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
