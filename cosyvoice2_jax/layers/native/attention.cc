// Fused scaled-dot-product attention for XLA:CPU, float32, head size 64 (the flow decoder's).
//
// out[b, i, h, :] = softmax_j(q[b, i, h, :] . k[b, j, h, :] / 8  +  (mask[b, i, j] ? 0 : -1e10)) v[b, j, h, :]
//
// Same arithmetic as cosyvoice2_jax.layers.attention._dot_attention (the diffusers attention with
// the official additive -1e10 mask bias), without materialising the (B, H, Tq, Tk) scores: each
// (batch, head) pair runs as one task on XLA's intra-op thread pool (AttendHead says how). Built on first use by cosyvoice2_jax/layers/native
// (g++ -O3 -march=native), registered as the FFI target "cosyvoice2_attention_f32".
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kD = 64;      // head size
constexpr int kRows = 6;    // query rows per register block
constexpr int kKeys = 64;   // keys per cache block (a 16 KB block of K^T or V)
constexpr int kTile = 96;   // query rows per tile (a multiple of kRows)

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float a) { return v16{} + a; }

// e^x for the shifted scores (x <= 0): x = n ln2 + r (ln2 split in two for the reduction),
// Cephes' expf polynomial for e^r on |r| <= ln2/2, 2^n through the exponent bits. Inputs below
// ln(FLT_MIN) give 0 (as a masked key's exp(-1e10) does).
inline v16 vexp(v16 x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kMin = -87.33f;
  vi16 underflow = x < kMin;
  x = x < kMin ? splat(kMin) : x;
  v16 t = x * kLog2e + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), v16);
  n = n > t ? n - 1.0f : n;  // floor
  v16 r = x - n * kLn2Hi - n * kLn2Lo;
  v16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale; std::memcpy(&scale, &bits, sizeof scale);
  v16 y = p * scale;
  return underflow ? splat(0.0f) : y;
}

// The register block of both products: acc[r][:] += sum_t a[r * a_row + t] * b[t * b_row : + 64]
// for r < kRows, t < n (kRows x 4 vector accumulators; one row of b is four vectors).
__attribute__((always_inline)) inline void RankOneUpdates(v16 (&acc)[kRows][4], const float* a, int64_t a_row,
                                                          const float* b, int64_t b_row, int64_t n) {
#pragma GCC unroll 2
  for (int64_t t = 0; t < n; ++t) {
    const float* br = b + t * b_row;
    const v16 b0 = load(br), b1 = load(br + 16), b2 = load(br + 32), b3 = load(br + 48);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const v16 s = splat(a[r * a_row + t]);
      acc[r][0] += s * b0; acc[r][1] += s * b1; acc[r][2] += s * b2; acc[r][3] += s * b3;
    }
  }
}

struct Geometry {
  int64_t B, Tq, Tk, H;
  int64_t mask_b, mask_q;  // strides of the (B|1, Tq|1, Tk) mask; 0 on broadcast axes
};

inline int64_t PaddedKeys(int64_t Tk) { return (Tk + kKeys - 1) / kKeys * kKeys; }

// Scratch floats per task: K^T (kD x Tkp), V (Tkp x kD), a query tile, its output accumulator
// (kTile x kD each) and its probabilities (kTile x Tkp).
inline size_t ScratchFloats(int64_t Tk) {
  const int64_t Tkp = PaddedKeys(Tk);
  return static_cast<size_t>(2 * kD * Tkp + 2 * kTile * kD + kTile * Tkp);
}

// One (batch, head) pair, a tile of kTile queries at a time: S = Q K^T with the key blocks outer
// (a 16 KB block of K^T stays in L1 across the tile's register blocks of kRows x 64 scores), the
// softmax of each row (normalised at the end), then O = P V with the key blocks outer again.
void AttendHead(const Geometry& g, const float* q, const float* k, const float* v, const bool* mask,
                float* out, int64_t b, int64_t h, float* scratch) {
  const int64_t Tk = g.Tk, Tkp = PaddedKeys(Tk), row = g.H * kD;
  const float* qb = q + (b * g.Tq * g.H + h) * kD;
  const float* kb = k + (b * Tk * g.H + h) * kD;
  const float* vb = v + (b * Tk * g.H + h) * kD;
  float* ob = out + (b * g.Tq * g.H + h) * kD;
  const bool* mb = mask + b * g.mask_b;
  float* kT = scratch;
  float* vp = kT + kD * Tkp;
  float* qt = vp + Tkp * kD;
  float* acc = qt + kTile * kD;
  float* S = acc + kTile * kD;
  for (int64_t j0 = 0; j0 < Tkp; j0 += 16) {  // K^T in 16-key blocks (contiguous reads), zero padded
    float blk[16][kD];
    for (int jj = 0; jj < 16; ++jj) {
      if (j0 + jj < Tk) std::memcpy(blk[jj], kb + (j0 + jj) * row, sizeof blk[jj]);
      else std::memset(blk[jj], 0, sizeof blk[jj]);
    }
    for (int c = 0; c < kD; ++c) {
      float* dst = kT + c * Tkp + j0;
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj) dst[jj] = blk[jj][c];
    }
  }
  for (int64_t j = 0; j < Tk; ++j) std::memcpy(vp + j * kD, vb + j * row, kD * sizeof(float));
  std::memset(vp + Tk * kD, 0, static_cast<size_t>(Tkp - Tk) * kD * sizeof(float));
  const float scale = 0.125f;  // 1 / sqrt(64)
  for (int64_t t0 = 0; t0 < g.Tq; t0 += kTile) {
    const int nq = static_cast<int>(std::min<int64_t>(kTile, g.Tq - t0));
    const int nqp = (nq + kRows - 1) / kRows * kRows;
    for (int i = 0; i < nqp; ++i) {
      if (i < nq) std::memcpy(qt + i * kD, qb + (t0 + i) * row, kD * sizeof(float));
      else std::memset(qt + i * kD, 0, kD * sizeof(float));
    }
    // scores
    for (int64_t j0 = 0; j0 < Tkp; j0 += kKeys) {
      for (int i0 = 0; i0 < nqp; i0 += kRows) {
        v16 a[kRows][4];
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) a[r][u] = v16{};
        }
        RankOneUpdates(a, qt + i0 * kD, kD, kT + j0, Tkp, kD);
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) store(S + (i0 + r) * Tkp + j0 + 16 * u, a[r][u]);
        }
      }
    }
    // softmax numerators of each row: scale, mask bias, max, exp; 1/sum is applied to the output
    float inv[kTile];
    for (int i = 0; i < nq; ++i) {
      float* p = S + i * Tkp;
      const bool* m = mb + (t0 + i) * g.mask_q;
      for (int64_t j = 0; j < Tk; ++j) p[j] = p[j] * scale + (m[j] ? 0.0f : -1.0e10f);
      for (int64_t j = Tk; j < Tkp; ++j) p[j] = -INFINITY;
      v16 vmax = splat(-INFINITY);
      for (int64_t j = 0; j < Tkp; j += 16) { const v16 x = load(p + j); vmax = x > vmax ? x : vmax; }
      float mx = vmax[0];
      for (int u = 1; u < 16; ++u) mx = vmax[u] > mx ? vmax[u] : mx;
      v16 vsum{};
      for (int64_t j = 0; j < Tkp; j += 16) { const v16 e = vexp(load(p + j) - mx); store(p + j, e); vsum += e; }
      float sum = 0.0f;
      for (int u = 0; u < 16; ++u) sum += vsum[u];
      inv[i] = 1.0f / sum;
    }
    for (int i = nq; i < nqp; ++i) std::memset(S + i * Tkp, 0, Tkp * sizeof(float));
    // out = P V
    for (int64_t j0 = 0; j0 < Tkp; j0 += kKeys) {
      const int64_t je = std::min(j0 + kKeys, Tk);
      for (int i0 = 0; i0 < nqp; i0 += kRows) {
        v16 o[kRows][4];
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) o[r][u] = j0 == 0 ? v16{} : load(acc + (i0 + r) * kD + 16 * u);
        }
        RankOneUpdates(o, S + i0 * Tkp + j0, Tkp, vp + j0 * kD, kD, je - j0);
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) store(acc + (i0 + r) * kD + 16 * u, o[r][u]);
        }
      }
    }
    for (int i = 0; i < nq; ++i) {
      const v16 w = splat(inv[i]);
      for (int u = 0; u < 4; ++u) store(ob + (t0 + i) * row + 16 * u, load(acc + i * kD + 16 * u) * w);
    }
  }
}

// Tasks are claimed from a shared counter by the calling thread and by helpers scheduled on the
// pool; the caller returns once every task has finished. A helper that starts after the last
// task was claimed returns at once, so nothing waits on a helper that never got a thread.
struct Work {
  std::atomic<int64_t> next{0}, done{0};
  int64_t total = 0;
};

template <typename F>
void RunTasks(const std::shared_ptr<Work>& w, const F& task) {
  for (int64_t t; (t = w->next.fetch_add(1)) < w->total;) {
    task(t);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || qd[3] != kD || kd[3] != kD ||
      kd[0] != qd[0] || kd[2] != qd[2] || vd.size() != 4 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kD || md[2] != kd[1] ||
      (md[0] != 1 && md[0] != qd[0]) || (md[1] != 1 && md[1] != qd[1]))
    return ffi::Error::InvalidArgument(
        "cosyvoice2_attention_f32: expected q (B, Tq, H, 64), k and v (B, Tk, H, 64), mask (B|1, Tq|1, Tk)");
  Geometry g{qd[0], qd[1], kd[1], qd[2], 0, 0};
  g.mask_q = md[1] == 1 ? 0 : md[2];
  g.mask_b = md[0] == 1 ? 0 : md[1] * md[2];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  auto w = std::make_shared<Work>();
  w->total = g.B * g.H;
  auto task = [=](int64_t t) {
    thread_local std::vector<float> scratch;
    const size_t need = ScratchFloats(g.Tk);
    if (scratch.size() < need) scratch.resize(need);
    AttendHead(g, qp, kp, vp, mp, op, t / g.H, t % g.H, scratch.data());
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), w->total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([w, task] { RunTasks(w, task); });
  RunTasks(w, task);
  while (w->done.load(std::memory_order_acquire) < w->total) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CosyVoice2AttentionF32, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
