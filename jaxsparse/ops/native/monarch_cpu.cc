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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register, or two AVX2 registers where the compiler has no AVX-512.
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// C[MR, NV·16] = Σ_k A[i, k·a_step] · B[k, :]   (A rows lda apart, B rows ldb apart).
template <int MR, int NV>
inline void micro_kernel(const float* a, int64_t lda, int64_t a_step, const float* bm,
                         int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec{} ;
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
template <int MR>
void row_block(const float* a, int64_t lda, int64_t a_step, const float* bm, int64_t ldb,
               int64_t depth, float* c, int64_t ldc, int64_t cols) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= cols; j += 4 * kLanes)
    micro_kernel<MR, 4>(a, lda, a_step, bm + j, ldb, depth, c + j, ldc);
  for (; j + kLanes <= cols; j += kLanes)
    micro_kernel<MR, 1>(a, lda, a_step, bm + j, ldb, depth, c + j, ldc);
  for (; j < cols; ++j)
    for (int i = 0; i < MR; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < depth; ++k) acc += a[i * lda + k * a_step] * bm[k * ldb + j];
      c[i * ldc + j] = acc;
    }
}

// C[rows, cols] = A[rows, depth] · B[depth, cols] with A read at (row·lda + k·a_step).
void gemm(const float* a, int64_t lda, int64_t a_step, const float* bm, int64_t ldb,
          int64_t depth, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= rows; i += MR)
    row_block<MR>(a + i * lda, lda, a_step, bm, ldb, depth, c + i * ldc, ldc, cols);
  for (; i < rows; ++i) row_block<1>(a + i * lda, lda, a_step, bm, ldb, depth, c + i * ldc, ldc, cols);
}

struct Shape {
  int64_t tokens, b, p, q, s;
};

// Tokens [t0, t0 + rows) through both factors; hidden and out_ls are the tile's scratch.
void monarch_tile(const Shape& sh, const float* x, const float* w1t, const float* w2t, float* y,
                  int64_t t0, int64_t rows, float* hidden, float* out_ls) {
  const int64_t n = sh.b * sh.p, mid = sh.b * sh.q, m = sh.b * sh.s;
  const float* xt = x + t0 * n;
  for (int64_t k = 0; k < sh.b; ++k)  // hidden[t, k·q + j]
    gemm(xt + k * sh.p, n, 1, w1t + k * sh.p * sh.q, sh.q, sh.p, hidden + k * sh.q, mid, rows,
         sh.q);
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

// Tokens per tile: the hidden and output tiles together stay within ~512 KiB of L2.
int64_t tile_tokens(const Shape& sh) {
  const int64_t per_token = (sh.b * sh.q + sh.b * sh.s) * sizeof(float);
  return std::clamp<int64_t>((512 << 10) / per_token / 6 * 6, 6, 96);
}

struct Work {
  Shape sh;
  const float *x, *w1t, *w2t;
  float* y;
  int64_t tile, num_tiles;
  std::atomic<int64_t> next{0}, done{0};
};

void drain(Work& w) {
  std::vector<float> hidden(w.tile * w.sh.b * w.sh.q), out_ls(w.tile * w.sh.b * w.sh.s);
  for (int64_t i; (i = w.next.fetch_add(1)) < w.num_tiles;) {
    const int64_t t0 = i * w.tile;
    monarch_tile(w.sh, w.x, w.w1t, w.w2t, w.y, t0, std::min(w.tile, w.sh.tokens - t0),
                 hidden.data(), out_ls.data());
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error MonarchF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1t,
                      ffi::Buffer<ffi::F32> w2t, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), d1 = w1t.dimensions(), d2 = w2t.dimensions();
  if (xd.size() != 2 || d1.size() != 3 || d2.size() != 3)
    return ffi::Error::InvalidArgument("monarch_cpu: expected x [T, n], w1t [b, p, q], w2t [b, q, s]");
  const Shape sh{xd[0], d1[0], d1[1], d1[2], d2[2]};
  if (d2[0] != sh.b || d2[1] != sh.q || xd[1] != sh.b * sh.p || sh.q % sh.b)
    return ffi::Error::InvalidArgument("monarch_cpu: inconsistent factor shapes");
  if (sh.tokens == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->sh = sh;
  work->x = x.typed_data();
  work->w1t = w1t.typed_data();
  work->w2t = w2t.typed_data();
  work->y = y->typed_data();
  work->tile = tile_tokens(sh);
  work->num_tiles = (sh.tokens + work->tile - 1) / work->tile;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_tiles - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { drain(*work); });
  drain(*work);
  while (work->done.load(std::memory_order_acquire) < work->num_tiles) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseMonarchF32, MonarchF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
