// Mamba-1 selective scan for XLA:CPU (XLA FFI custom calls), float32: the recurrence
//
//   h_t = exp(dt_t · A) ⊙ h_{t-1} + (dt_t · x_t) B_t,      y_t = ⟨C_t, h_t⟩
//
// per channel d (state size N), with dt already discretised (bias and softplus applied by the
// caller), B and C shared by the channels of a group. XLA runs this as a lax.scan of small
// array ops (one dispatch per step) or as chunked array programs that materialise
// [chunk, d, N] tensors; here 16 channels of one group are stepped together with their whole
// state in vector registers (lane = channel, one vector per state index n), so per step and
// state index the work is one vector exp and three FMAs, and nothing of size L·d·N touches
// memory.
//
// keep [batch, L] is 1 inside a packed document and 0 at the first token of the next one: there
// the decay onto the previous state is 0 (the state resets), forward and backward.
//
// A may also be [d, 1]: one decay rate per channel, shared by its N state entries (Mamba-2,
// whose heads have a scalar A). The decay is then one vector exp per step instead of N, which
// is most of the work per state entry: the step becomes two FMAs and a multiply per n.
//
// The backward walks time in reverse, chunk by chunk: the forward states are checkpointed every
// kChunk steps, each chunk's states and decays are recomputed into a small buffer, and the
// gradients of x, dt, A, B, C and h0 are accumulated on the way back. Gradients of B and C sum
// over a group's channels: each task (batch row, group, part of the group's channels) writes
// its own partial sums, which the caller adds in a fixed order, so results do not depend on
// thread timing.

#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jaxsparse_native::kLanes;
using jaxsparse_native::load;
using jaxsparse_native::parallel_for;
using jaxsparse_native::store;
using jaxsparse_native::Vec;

constexpr int64_t kChunk = 64;
// Forward time tile: 512 steps of B and C rows (256 KiB at N = 64) stay in a core's L2.
constexpr int64_t kTimeTile = 512;
typedef int32_t IVec __attribute__((vector_size(64)));

inline Vec splat(float s) { return Vec{} + s; }
inline float lane_sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp on 16 lanes: 2^k · e^r with k = round(x / ln 2), |r| ≤ ln2 / 2, e^r by its degree-7
// Taylor polynomial (relative error < 2e-8, below float32's 6e-8 ulp); 2^k is applied as two
// factors so that k = 128 (x up to ln FLT_MAX) stays finite. Below -87.3 the result is
// 2^-126 ≈ 1e-38 instead of a denormal or 0 (a decay that has erased the state either way);
// above ln FLT_MAX it is inf; NaN stays NaN through r.
inline Vec vexp(Vec x) {
  const Vec lo = splat(-87.3f), hi = splat(88.72283f);
  const Vec inf = splat(__builtin_inff());
  const Vec overflow = x > hi ? inf : splat(0.f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec t = x * 1.44269504088896341f;
  const IVec k = __builtin_convertvector(t + (t >= 0 ? splat(0.5f) : splat(-0.5f)), IVec);
  const Vec kf = __builtin_convertvector(k, Vec);
  const Vec r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  Vec p = splat(1.f / 5040);
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const IVec half = k >> 1;
  const IVec bits_a = (half + 127) << 23, bits_b = (k - half + 127) << 23;
  Vec scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof scale_a);
  std::memcpy(&scale_b, &bits_b, sizeof scale_b);
  const Vec result = p * scale_a * scale_b;
  return overflow > 0 ? overflow : result;
}

struct Dims {
  int64_t batch, length, channels, groups, state;
  bool scalar_decay;  // A is [d, 1]
  int64_t rates() const { return scalar_decay ? 1 : state; }  // columns of A
  int64_t per_group() const { return channels / groups; }
  int64_t blocks_per_group() const { return (per_group() + kLanes - 1) / kLanes; }
};

// A block: up to 16 consecutive channels of one group, for one batch row.
struct Block {
  int64_t b, g, d0;
  int lanes;
};

struct Inputs {
  const float *x, *dt, *A, *B, *C, *h0, *keep;
};

// A block's decay rates (R vectors) and initial state (N vectors).
void load_block(const Dims& dm, const Inputs& in, const Block& bk, Vec* a, Vec* h) {
  const int64_t N = dm.state, R = dm.rates();
  for (int64_t r = 0; r < R; ++r) {
    float col[kLanes] = {};
    for (int i = 0; i < bk.lanes; ++i) col[i] = in.A[(bk.d0 + i) * R + r];
    a[r] = load(col, kLanes);
  }
  for (int64_t n = 0; n < N; ++n) {
    float h0[kLanes] = {};
    for (int i = 0; i < bk.lanes; ++i) h0[i] = in.h0[(bk.b * dm.channels + bk.d0 + i) * N + n];
    h[n] = load(h0, kLanes);
  }
}

// Steps [t0, t1) of one block's recurrence, from and into the state h (N vectors). With ys,
// writes y; with checkpoints, stores the state at the start of every chunk
// (checkpoints[c · N + n] is a vector).
void forward_steps(const Dims& dm, const Inputs& in, const Block& bk, const Vec* a, int64_t t0,
                   int64_t t1, float* ys, Vec* h, Vec* checkpoints) {
  const int64_t N = dm.state, Dn = dm.channels, G = dm.groups;
  for (int64_t t = t0; t < t1; ++t) {
    if (checkpoints && t % kChunk == 0)
      std::copy(h, h + N, checkpoints + (t / kChunk) * N);
    if (in.keep[bk.b * dm.length + t] == 0.f) std::fill(h, h + N, Vec{});  // a document starts
    const int64_t row = (bk.b * dm.length + t) * Dn + bk.d0;
    const Vec dt = load(in.dt + row, bk.lanes), u = dt * load(in.x + row, bk.lanes);
    const float* Bt = in.B + ((bk.b * dm.length + t) * G + bk.g) * N;
    const float* Ct = in.C + ((bk.b * dm.length + t) * G + bk.g) * N;
    Vec y{};
    if (dm.scalar_decay) {
      const Vec decay = vexp(dt * a[0]);
      for (int64_t n = 0; n < N; ++n) {
        h[n] = decay * h[n] + u * Bt[n];
        y += h[n] * Ct[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        h[n] = vexp(dt * a[n]) * h[n] + u * Bt[n];
        y += h[n] * Ct[n];
      }
    }
    if (ys) store(ys + row, y, bk.lanes);
  }
}

// The whole recurrence of one block; the final state goes into h.
void forward_block(const Dims& dm, const Inputs& in, const Block& bk, float* ys, Vec* h,
                   Vec* checkpoints) {
  std::vector<Vec> a(dm.rates());
  load_block(dm, in, bk, a.data(), h);
  forward_steps(dm, in, bk, a.data(), 0, dm.length, ys, h, checkpoints);
}

// Gradients of one block, accumulated: gA_b [Dn, N] (this batch row's), gB_part and gC_part
// ([L, N], this task's partial sums); written: gx, gdt (this block's channels), gh0.
struct Grads {
  float *gx, *gdt, *gA, *gh0;
};

void backward_block(const Dims& dm, const Inputs& in, const float* gy, const float* gh_final,
                    const Block& bk, const Grads& out, float* gB_part, float* gC_part) {
  const int64_t N = dm.state, Dn = dm.channels, G = dm.groups, L = dm.length, R = dm.rates();
  const int64_t num_chunks = (L + kChunk - 1) / kChunk;
  std::vector<Vec> checkpoints(num_chunks * N), h(N), a(R), gA(R), gh(N);
  // decays per step: R of them (one when the decay is scalar)
  std::vector<Vec> states(kChunk * N), decays(kChunk * R);
  forward_block(dm, in, bk, nullptr, h.data(), checkpoints.data());
  for (int64_t r = 0; r < R; ++r) {
    float col[kLanes] = {};
    for (int i = 0; i < bk.lanes; ++i) col[i] = in.A[(bk.d0 + i) * R + r];
    a[r] = load(col, kLanes);
    gA[r] = Vec{};
  }
  for (int64_t n = 0; n < N; ++n) {
    float g[kLanes] = {};
    for (int i = 0; i < bk.lanes; ++i) g[i] = gh_final[(bk.b * Dn + bk.d0 + i) * N + n];
    gh[n] = load(g, kLanes);
  }
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, t1 = std::min(L, t0 + kChunk);
    std::copy(checkpoints.begin() + c * N, checkpoints.begin() + (c + 1) * N, h.begin());
    for (int64_t t = t0; t < t1; ++t) {  // recompute the chunk: states after each step
      const int64_t row = (bk.b * L + t) * Dn + bk.d0;
      const Vec dt = load(in.dt + row, bk.lanes), u = dt * load(in.x + row, bk.lanes);
      const float* Bt = in.B + ((bk.b * L + t) * G + bk.g) * N;
      Vec* st = &states[(t - t0) * N];
      Vec* dc = &decays[(t - t0) * R];
      const bool starts = in.keep[bk.b * L + t] == 0.f;  // decay 0: the state resets
      for (int64_t r = 0; r < R; ++r) dc[r] = starts ? Vec{} : vexp(dt * a[r]);
      const int64_t step = dm.scalar_decay ? 0 : 1;  // which decay entry n uses: n · step
      for (int64_t n = 0; n < N; ++n) {
        h[n] = dc[n * step] * h[n] + u * Bt[n];
        st[n] = h[n];
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t row = (bk.b * L + t) * Dn + bk.d0;
      const Vec dt = load(in.dt + row, bk.lanes), x = load(in.x + row, bk.lanes);
      const Vec u = dt * x, g_y = load(gy + row, bk.lanes);
      const int64_t bc = ((bk.b * L + t) * G + bk.g) * N;
      const float *Bt = in.B + bc, *Ct = in.C + bc;
      const Vec* st = &states[(t - t0) * N];                  // h_t
      const Vec* dc = &decays[(t - t0) * R];                  // exp(dt_t · a)
      const Vec* prev = t > t0 ? st - N : &checkpoints[c * N];  // h_{t-1} (h0 at t = 0)
      float* gBt = gB_part + t * N;
      float* gCt = gC_part + t * N;
      Vec g_dt{}, g_u{};
      const int64_t step = dm.scalar_decay ? 0 : 1;
      for (int64_t n = 0; n < N; ++n) {
        gCt[n] += lane_sum(g_y * st[n]);
        const Vec g = gh[n] + g_y * Ct[n];  // dL/dh_t
        gBt[n] += lane_sum(g * u);
        g_u += g * Bt[n];
        const Vec decay = dc[n * step];
        const Vec g_log = g * decay * prev[n];  // dL/d(dt_t · a_n)
        g_dt += g_log * a[n * step];
        gA[n * step] += g_log * dt;
        gh[n] = g * decay;  // dL/dh_{t-1}
      }
      g_dt += g_u * x;
      store(out.gx + row, g_u * dt, bk.lanes);
      store(out.gdt + row, g_dt, bk.lanes);
    }
  }
  for (int i = 0; i < bk.lanes; ++i) {
    for (int64_t n = 0; n < N; ++n) out.gh0[(bk.b * Dn + bk.d0 + i) * N + n] = gh[n][i];
    for (int64_t r = 0; r < R; ++r) out.gA[(bk.b * Dn + bk.d0 + i) * R + r] = gA[r][i];
  }
}

bool read_dims(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& dt,
               const ffi::Buffer<ffi::F32>& A, const ffi::Buffer<ffi::F32>& B,
               const ffi::Buffer<ffi::F32>& C, const ffi::Buffer<ffi::F32>& h0, Dims* dm) {
  const auto xd = x.dimensions(), ad = A.dimensions(), bd = B.dimensions();
  if (xd.size() != 3 || ad.size() != 2 || bd.size() != 4) return false;
  *dm = Dims{xd[0], xd[1], xd[2], bd[2], bd[3], ad[1] == 1 && bd[3] != 1};
  auto same = [](auto u, std::initializer_list<int64_t> v) {
    return u.size() == v.size() && std::equal(u.begin(), u.end(), v.begin());
  };
  return dm->groups > 0 && dm->channels % dm->groups == 0 &&
         same(dt.dimensions(), {dm->batch, dm->length, dm->channels}) &&
         same(ad, {dm->channels, dm->rates()}) &&
         same(bd, {dm->batch, dm->length, dm->groups, dm->state}) &&
         same(C.dimensions(), {dm->batch, dm->length, dm->groups, dm->state}) &&
         same(h0.dimensions(), {dm->batch, dm->channels, dm->state});
}

bool keep_fits(const ffi::Buffer<ffi::F32>& keep, const Dims& dm) {
  const auto kd = keep.dimensions();
  return kd.size() == 2 && kd[0] == dm.batch && kd[1] == dm.length;
}

Block block_at(const Dims& dm, int64_t index) {
  const int64_t per_block = dm.blocks_per_group();
  const int64_t b = index / (dm.groups * per_block), rest = index % (dm.groups * per_block);
  const int64_t g = rest / per_block, j = rest % per_block;
  const int64_t first = g * dm.per_group() + j * kLanes;
  const int lanes = static_cast<int>(std::min<int64_t>(kLanes, (g + 1) * dm.per_group() - first));
  return Block{b, g, first, lanes};
}

ffi::Error ScanF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dt,
                   ffi::Buffer<ffi::F32> A, ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> keep,
                   ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> h_final) {
  Dims dm;
  if (!read_dims(x, dt, A, B, C, h0, &dm))
    return ffi::Error::InvalidArgument("selective_scan_cpu: inconsistent shapes");
  if (!keep_fits(keep, dm))
    return ffi::Error::InvalidArgument("selective_scan_cpu: keep must be [batch, L]");
  const Inputs in{x.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(),
                  C.typed_data(), h0.typed_data(), keep.typed_data()};
  float *yp = y->typed_data(), *hp = h_final->typed_data();
  // Task (b, g, part): a run of the group's channel blocks, stepped kTimeTile steps at a time,
  // all blocks of the run through one tile before the next. The tile's B and C rows (shared by
  // the group's channels) then come from cache for every block after the first; stepping each
  // block through the whole length instead re-read them from memory once per block, which at
  // 64k tokens made the forward 18x slower than at 8k.
  const int64_t N = dm.state, R = dm.rates(), per_block = dm.blocks_per_group();
  // as many tasks as cores when there are fewer (batch row, group) pairs than cores
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t parts = std::clamp<int64_t>(cores / (dm.batch * dm.groups), 1, per_block);
  parallel_for(pool, dm.batch * dm.groups * parts, [&](int64_t task) {
    const int64_t bg = task / parts, part = task % parts;
    const int64_t j0 = part * per_block / parts, j1 = (part + 1) * per_block / parts;
    std::vector<Block> blocks;
    for (int64_t j = j0; j < j1; ++j) blocks.push_back(block_at(dm, bg * per_block + j));
    std::vector<Vec> a(blocks.size() * R), h(blocks.size() * N);
    for (size_t k = 0; k < blocks.size(); ++k)
      load_block(dm, in, blocks[k], &a[k * R], &h[k * N]);
    for (int64_t t0 = 0; t0 < dm.length; t0 += kTimeTile)
      for (size_t k = 0; k < blocks.size(); ++k)
        forward_steps(dm, in, blocks[k], &a[k * R], t0, std::min(dm.length, t0 + kTimeTile), yp,
                      &h[k * N], nullptr);
    for (size_t k = 0; k < blocks.size(); ++k)
      for (int64_t n = 0; n < N; ++n)
        for (int l = 0; l < blocks[k].lanes; ++l)
          hp[(blocks[k].b * dm.channels + blocks[k].d0 + l) * N + n] = h[k * N + n][l];
  });
  return ffi::Error::Success();
}

// Partial sums of gB, gC: parts [batch, groups, parts, L, N]; the caller sums over parts.
ffi::Error ScanBackwardF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dt, ffi::Buffer<ffi::F32> A,
                           ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> keep,
                           ffi::Buffer<ffi::F32> gy,
                           ffi::Buffer<ffi::F32> gh_final, ffi::ResultBuffer<ffi::F32> gx,
                           ffi::ResultBuffer<ffi::F32> gdt, ffi::ResultBuffer<ffi::F32> gA_rows,
                           ffi::ResultBuffer<ffi::F32> gB_parts,
                           ffi::ResultBuffer<ffi::F32> gC_parts,
                           ffi::ResultBuffer<ffi::F32> gh0) {
  Dims dm;
  if (!read_dims(x, dt, A, B, C, h0, &dm))
    return ffi::Error::InvalidArgument("selective_scan_cpu: inconsistent shapes");
  const int64_t parts = gB_parts->dimensions()[2];
  const int64_t per_block = dm.blocks_per_group();
  if (parts < 1 || parts > per_block)
    return ffi::Error::InvalidArgument("selective_scan_cpu: parts must be in [1, blocks per group]");
  if (!keep_fits(keep, dm))
    return ffi::Error::InvalidArgument("selective_scan_cpu: keep must be [batch, L]");
  const Inputs in{x.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(),
                  C.typed_data(), h0.typed_data(), keep.typed_data()};
  const Grads out{gx->typed_data(), gdt->typed_data(), gA_rows->typed_data(),
                  gh0->typed_data()};
  float *gBp = gB_parts->typed_data(), *gCp = gC_parts->typed_data();
  const int64_t slab = dm.length * dm.state;
  std::fill(gBp, gBp + dm.batch * dm.groups * parts * slab, 0.f);
  std::fill(gCp, gCp + dm.batch * dm.groups * parts * slab, 0.f);
  const float *gyp = gy.typed_data(), *ghf = gh_final.typed_data();
  // Task (b, g, part): the part's blocks in order, into the part's own partial sums.
  parallel_for(pool, dm.batch * dm.groups * parts, [&](int64_t task) {
    const int64_t bg = task / parts, part = task % parts;
    float* gB_part = gBp + task * slab;
    float* gC_part = gCp + task * slab;
    for (int64_t j = part * per_block / parts; j < (part + 1) * per_block / parts; ++j) {
      const Block bk = block_at(dm, bg * per_block + j);
      backward_block(dm, in, gyp, ghf, bk, out, gB_part, gC_part);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseSelectiveScanF32, ScanF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()  // x [batch, L, d]
                                  .Arg<F32Buffer>()  // dt [batch, L, d] (discretised)
                                  .Arg<F32Buffer>()  // A [d, N], or [d, 1]: scalar decay
                                  .Arg<F32Buffer>()  // B [batch, L, groups, N]
                                  .Arg<F32Buffer>()  // C [batch, L, groups, N]
                                  .Arg<F32Buffer>()  // h0 [batch, d, N]
                                  .Arg<F32Buffer>()  // keep [batch, L]: 0 where a document starts
                                  .Ret<F32Buffer>()  // y [batch, L, d]
                                  .Ret<F32Buffer>());  // final state [batch, d, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseSelectiveScanBackwardF32, ScanBackwardF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()  // keep
                                  .Arg<F32Buffer>()  // dL/dy
                                  .Arg<F32Buffer>()  // dL/d final state
                                  .Ret<F32Buffer>()  // dx
                                  .Ret<F32Buffer>()  // ddt
                                  .Ret<F32Buffer>()  // dA per batch row [batch, d, N or 1]
                                  .Ret<F32Buffer>()  // dB partial sums [batch, groups, parts, L, N]
                                  .Ret<F32Buffer>()  // dC partial sums
                                  .Ret<F32Buffer>());  // dh0
