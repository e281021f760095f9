// Fused Monarch product for XLA:CPU (an XLA FFI custom call), float32.
//
//   y[t, s'·b + l] = Σ_r  w2[l, s', r] · h[t, r·b + l],
//   h[t, k·q + j]  = Σ_p' w1[k, j, p'] · x[t, k·p + p']
//
// (the layout of jaxsparse/ops/monarch.py; i = k·q + j = r·b + l is the permutation between the
// factors). XLA runs the einsum form as separate passes over memory — a transpose of x, the
// first batched GEMM, the permutation, the second GEMM, the output transpose — each reading and
// writing the full activation. Here each tile of a few tokens goes through both products and
// the permutation while it sits in the core's L2 cache: x is read once and y written once.
//
// The permutation costs nothing: a GEMM micro-kernel broadcasts one scalar of its left operand
// at a time, and that scalar may as well be read at a stride (h[t, r·b + l] over r has stride
// b). The weights come pre-transposed (w1t [b, p, q], w2t [b, q, s]) so the micro-kernel's
// vectors run along contiguous output columns. The products land in a tile buffer in (l, s')
// order and are transposed to (s', l) as the tile is written out.
//
// Tiles are shared between XLA's intra-op threads through an atomic counter; the calling thread
// works too, so a busy pool never stalls the call.

#include <vector>

#include "common.h"
#include "gemm.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::gemm;

struct Shape {
  int64_t tokens, b, p, q, s;
};

// Tokens [t0, t0 + rows) through both factors; hidden and out_ls are the tile's scratch. With
// hidden_out, the first factor's output is also written there (the residual for the backward).
void monarch_tile(const Shape& sh, const float* x, const float* w1t, const float* w2t, float* y,
                  int64_t t0, int64_t rows, float* hidden, float* out_ls, float* hidden_out) {
  const int64_t n = sh.b * sh.p, mid = sh.b * sh.q, m = sh.b * sh.s;
  const float* xt = x + t0 * n;
  for (int64_t k = 0; k < sh.b; ++k)  // hidden[t, k·q + j]
    gemm(xt + k * sh.p, n, 1, w1t + k * sh.p * sh.q, sh.q, sh.p, hidden + k * sh.q, mid, rows,
         sh.q);
  if (hidden_out) std::memcpy(hidden_out + t0 * mid, hidden, rows * mid * sizeof(float));
  for (int64_t l = 0; l < sh.b; ++l)  // out_ls[t, l·s + s'] from hidden[t, r·b + l]
    gemm(hidden + l, mid, sh.b, w2t + l * sh.q * sh.s, sh.s, sh.q, out_ls + l * sh.s, m, rows,
         sh.s);
  for (int64_t t = 0; t < rows; ++t) {  // (l, s') -> (s', l), written row by row
    float* yt = y + (t0 + t) * m;
    const float* ot = out_ls + t * m;
    for (int64_t so = 0; so < sh.s; ++so)
      for (int64_t l = 0; l < sh.b; ++l) yt[so * sh.b + l] = ot[l * sh.s + so];
  }
}

// The backward's two halves, given dy and the forward's x and hidden:
//   g_lr[t, l·q + r]  = Σ_s' dy[t, s'·b + l] · w2[l, s', r]     (gradient of hidden, (l, r) order)
//   g[t, r·b + l]     = g_lr[t, l·q + r]                         (the permutation, in cache)
//   dx[t, k·p + p']   = Σ_j g[t, k·q + j] · w1[k, j, p']
//   dw1[k, j, p']    += Σ_t g[t, k·q + j] · x[t, k·p + p']
//   dw2[l, s', r]    += Σ_t dy[t, s'·b + l] · hidden[t, r·b + l]  (hidden read in (l, r) order)
// The input gradient goes tile by tile (a few tokens, in L2), leaving each tile's g and hidden
// in (l, r) order in chunk buffers; the weight gradients are then summed over the whole chunk
// at once (chunk_tokens). Summed tile by tile, large weights' gradients were read and written
// once per few tokens: at d = 8192 (b = 64) 16 MB of accumulators per 6 tokens, which made
// the backward memory bound.

// Tokens [t0, t0 + rows) of dx; their g and h_lr rows are written to g, h_lr (row 0 = t0).
void monarch_tile_input_grad(const Shape& sh, const float* hidden, const float* dy,
                             const float* w1, const float* w2, float* dx, int64_t t0,
                             int64_t rows, float* g_lr, float* g, float* h_lr) {
  const int64_t n = sh.b * sh.p, mid = sh.b * sh.q, m = sh.b * sh.s;
  const float *ht = hidden + t0 * mid, *dyt = dy + t0 * m;
  float* dxt = dx + t0 * n;
  for (int64_t l = 0; l < sh.b; ++l)
    gemm(dyt + l, m, sh.b, w2 + l * sh.s * sh.q, sh.q, sh.s, g_lr + l * sh.q, mid, rows, sh.q);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t l = 0; l < sh.b; ++l)
      for (int64_t r = 0; r < sh.q; ++r) {
        g[t * mid + r * sh.b + l] = g_lr[t * mid + l * sh.q + r];
        h_lr[t * mid + l * sh.q + r] = ht[t * mid + r * sh.b + l];
      }
  for (int64_t k = 0; k < sh.b; ++k)
    gemm(g + k * sh.q, mid, 1, w1 + k * sh.q * sh.p, sh.p, sh.q, dxt + k * sh.p, n, rows, sh.p);
}

// dw1, dw2 += the sums over tokens [t0, t0 + rows), from their g and h_lr rows.
void monarch_chunk_weight_grads(const Shape& sh, const float* x, const float* dy,
                                const float* g, const float* h_lr, int64_t t0, int64_t rows,
                                float* dw1, float* dw2) {
  const int64_t n = sh.b * sh.p, mid = sh.b * sh.q, m = sh.b * sh.s;
  const float *xt = x + t0 * n, *dyt = dy + t0 * m;
  for (int64_t k = 0; k < sh.b; ++k)
    gemm<true>(g + k * sh.q, 1, mid, xt + k * sh.p, n, rows, dw1 + k * sh.q * sh.p, sh.p, sh.q,
               sh.p);
  for (int64_t l = 0; l < sh.b; ++l)
    gemm<true>(dyt + l, sh.b, m, h_lr + l * sh.q, mid, rows, dw2 + l * sh.s * sh.q, sh.q, sh.s,
               sh.q);
}

// Tokens per tile: the tile's scratch buffers together stay within ~512 KiB of L2.
int64_t tile_tokens(const Shape& sh) {
  const int64_t per_token = (sh.b * sh.q + sh.b * sh.s) * sizeof(float);
  return std::clamp<int64_t>((512 << 10) / per_token / 6 * 6, 6, 96);
}

// Tokens per weight-gradient chunk of the backward: `requested` where positive (tests ask for
// a few tokens, to cross chunk edges). Weights of up to 4 MiB (d <= 4096 at b = 64): one
// tile — their gradients stay in cache, and so do the tile's g and h_lr. Larger ones: a
// multiple of the tile whose g and h_lr buffers take about 16 MiB (252 tokens at d = 8192),
// so that the accumulators are read and written once per chunk instead of once per few
// tokens (measured at d = 8192, 4096 tokens: forward + backward 1182 -> 674 ms; at d = 4096
// chunks of 504 tokens were 10% slower than tiles, the buffers' round trip through memory).
int64_t chunk_tokens(const Shape& sh, int64_t tile, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t weight_bytes = (sh.b * sh.q * sh.p + sh.b * sh.s * sh.q) * sizeof(float);
  if (weight_bytes <= (4 << 20)) return tile;
  const int64_t per_token = 2 * sh.b * sh.q * sizeof(float);
  return std::max<int64_t>((16 << 20) / per_token / tile, 1) * tile;
}

// Runs task(group, first_tile, end_tile) over `groups` contiguous groups of tiles. The grouping
// depends only on the sizes and the pool's thread count, never on timing, so per-group partial
// sums (the weight gradients) are added in the same order on every run.
template <typename Task>
void parallel_groups(ffi::ThreadPool& pool, int64_t num_tiles, int64_t groups, Task task) {
  jaxsparse_native::parallel_for(pool, groups, [&](int64_t gi) {
    task(gi, gi * num_tiles / groups, (gi + 1) * num_tiles / groups);
  });
}

bool valid(const Shape& sh) { return sh.b > 0 && sh.q % sh.b == 0; }

ffi::Error shape_error() {
  return ffi::Error::InvalidArgument(
      "monarch_cpu: expected x [T, b·p], w1t [b, p, q], w2t [b, q, s] with q % b == 0");
}

Shape forward_shape(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w1t,
                    const ffi::Buffer<ffi::F32>& w2t, bool* ok) {
  const auto xd = x.dimensions(), d1 = w1t.dimensions(), d2 = w2t.dimensions();
  *ok = xd.size() == 2 && d1.size() == 3 && d2.size() == 3;
  if (!*ok) return {};
  const Shape sh{xd[0], d1[0], d1[1], d1[2], d2[2]};
  *ok = valid(sh) && d2[0] == sh.b && d2[1] == sh.q && xd[1] == sh.b * sh.p;
  return sh;
}

ffi::Error forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                   const ffi::Buffer<ffi::F32>& w1t, const ffi::Buffer<ffi::F32>& w2t, float* y,
                   float* hidden_out) {
  bool ok;
  const Shape sh = forward_shape(x, w1t, w2t, &ok);
  if (!ok) return shape_error();
  if (sh.tokens == 0) return ffi::Error::Success();
  const int64_t tile = tile_tokens(sh), num_tiles = (sh.tokens + tile - 1) / tile;
  const float *xp = x.typed_data(), *w1p = w1t.typed_data(), *w2p = w2t.typed_data();
  // As many groups as tiles: the forward has no partial sums to order.
  parallel_groups(pool, num_tiles, num_tiles, [&](int64_t, int64_t first, int64_t end) {
    std::vector<float> hidden(tile * sh.b * sh.q), out_ls(tile * sh.b * sh.s);
    for (int64_t i = first; i < end; ++i) {
      const int64_t t0 = i * tile;
      monarch_tile(sh, xp, w1p, w2p, y, t0, std::min(tile, sh.tokens - t0), hidden.data(),
                   out_ls.data(), hidden_out);
    }
  });
  return ffi::Error::Success();
}

ffi::Error MonarchF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1t,
                      ffi::Buffer<ffi::F32> w2t, ffi::ResultBuffer<ffi::F32> y) {
  return forward(pool, x, w1t, w2t, y->typed_data(), nullptr);
}

ffi::Error MonarchResidualF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w1t, ffi::Buffer<ffi::F32> w2t,
                              ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> hidden) {
  return forward(pool, x, w1t, w2t, y->typed_data(), hidden->typed_data());
}

// dx, dw1, dw2 from x [T, b·p], hidden [T, b·q], dy [T, b·s], w1 [b, q, p], w2 [b, s, q];
// chunk_tokens: see chunk_tokens() (0: the kernel's choice).
ffi::Error MonarchBackwardF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::F32> dy,
                              ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w2,
                              ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw1,
                              ffi::ResultBuffer<ffi::F32> dw2, int64_t requested_chunk) {
  const auto d1 = w1.dimensions(), d2 = w2.dimensions(), xd = x.dimensions();
  if (d1.size() != 3 || d2.size() != 3 || xd.size() != 2) return shape_error();
  const Shape sh{xd[0], d1[0], d1[2], d1[1], d2[1]};
  if (!valid(sh) || d2[0] != sh.b || d2[2] != sh.q || xd[1] != sh.b * sh.p ||
      hidden.dimensions()[1] != sh.b * sh.q || dy.dimensions()[1] != sh.b * sh.s)
    return shape_error();
  const int64_t w1_size = sh.b * sh.q * sh.p, w2_size = sh.b * sh.s * sh.q;
  float *dw1p = dw1->typed_data(), *dw2p = dw2->typed_data();
  std::fill(dw1p, dw1p + w1_size, 0.f);
  std::fill(dw2p, dw2p + w2_size, 0.f);
  if (sh.tokens == 0) return ffi::Error::Success();
  const int64_t tile = tile_tokens(sh), num_tiles = (sh.tokens + tile - 1) / tile;
  const int64_t groups = std::min<int64_t>(pool.num_threads() + 1, num_tiles);
  std::vector<float> partial(groups * (w1_size + w2_size), 0.f);
  const float *xp = x.typed_data(), *hp = hidden.typed_data(), *dyp = dy.typed_data();
  const float *w1p = w1.typed_data(), *w2p = w2.typed_data();
  float* dxp = dx->typed_data();
  const int64_t chunk = chunk_tokens(sh, tile, requested_chunk);
  parallel_groups(pool, num_tiles, groups, [&](int64_t gi, int64_t first, int64_t end) {
    const int64_t mid = sh.b * sh.q, begin = first * tile, stop = std::min(end * tile, sh.tokens);
    std::vector<float> g_lr(tile * mid), g(std::min(chunk, stop - begin) * mid),
        h_lr(std::min(chunk, stop - begin) * mid);
    float* acc1 = partial.data() + gi * (w1_size + w2_size);
    for (int64_t c0 = begin; c0 < stop; c0 += chunk) {
      const int64_t chunk_rows = std::min(chunk, stop - c0);
      for (int64_t t0 = c0; t0 < c0 + chunk_rows; t0 += tile)
        monarch_tile_input_grad(sh, hp, dyp, w1p, w2p, dxp, t0,
                                std::min(tile, c0 + chunk_rows - t0), g_lr.data(),
                                g.data() + (t0 - c0) * mid, h_lr.data() + (t0 - c0) * mid);
      monarch_chunk_weight_grads(sh, xp, dyp, g.data(), h_lr.data(), c0, chunk_rows, acc1,
                                 acc1 + w1_size);
    }
  });
  for (int64_t gi = 0; gi < groups; ++gi) {  // in group order: the same sums on every run
    const float* acc = partial.data() + gi * (w1_size + w2_size);
    for (int64_t i = 0; i < w1_size; ++i) dw1p[i] += acc[i];
    for (int64_t i = 0; i < w2_size; ++i) dw2p[i] += acc[w1_size + i];
  }
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseMonarchF32, MonarchF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseMonarchResidualF32, MonarchResidualF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseMonarchBackwardF32, MonarchBackwardF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<int64_t>("chunk_tokens"));
