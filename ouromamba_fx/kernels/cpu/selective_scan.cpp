// Fused selective scan for CPU: forward and backward.
//
// Semantics (those of mamba-ssm's selective_scan_fn):
//   dt_t  = softplus(delta_t + delta_bias)      (or delta_t + delta_bias)
//   h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       per channel d, per state n
//   y_t   = sum_n C_t[n] h_t[n] + D * u_t
//   out_t = y_t * silu(z_t)                      (when z is given)
//
// Layout of the computation
//   The work is cut into blocks of W consecutive channels (W = 64 bytes / sizeof(T): 16 floats, 8
//   doubles) of one batch element; the threads take blocks (forward) or runs of blocks (backward)
//   as they come free (om_parallel.h). Inside a block the W channels are the lanes of a GCC/Clang
//   vector type, so every operation of the recurrence is one vector operation and nothing has to be
//   summed across lanes; time is sequential and the state loop runs over d_state scalars of B / C
//   (broadcast to all lanes). A block's inputs are first gathered into small (L, W) tiles:
//   time-contiguous inputs by in-register 16 x 16 transposes, channel-contiguous ones (transposed
//   projections, as in the Vim mixer) by plain vector loads, so neither layout is copied; the next
//   block's inputs are prefetched while a block computes. The forward's output is written
//   time-contiguous (the tile transposed back) or, with channels_last, channel-contiguous (each
//   step's W channels stored as they lie). No (batch, d_inner, L, d_state) tensor is ever built:
//   the forward keeps d_state state vectors, the backward recomputes the block's states into a
//   per-thread (L + 1, d_state) tile of vectors and then runs the reverse recurrence.
//
// Reductions
//   dA, dD, d_delta_bias and constant-B / C gradients are written per (batch, channel) and summed
//   over the batch afterwards. Variable dB / dC (summed over channels) are summed across the lanes
//   of a block at every time step (a transpose-and-add of d_state vectors) into a (groups,
//   d_state, L) buffer owned by the run of blocks being processed; runs of one batch element are
//   summed afterwards. Everything is deterministic and free of races, and the backward is one
//   parallel region (small batch sums are serial: on a busy machine each extra parallel op
//   costs a scheduler slice).
//
// B and C are (batch, d_state, L), (batch, groups, d_state, L) or (d_inner, d_state); they are read
// as
//   element(b, d, t, n) = base + b * s_b + (d / d_per_group) * s_g + t * s_t + n * s_n,
// with the strides of the tensor as it comes (no copy).
// Blocks never straddle a group boundary, so a variable B_t[n] is one scalar for the whole block.
//
// float64 inputs are computed in float64 (with libm's exp / log1p, lane by lane); everything else
// in float32 with om_vec.h's branch-free vector functions: the decays exp(dt A) as
// exp2(dt * A log2 e) (under 2 ulp), log2 e folded into A once per block; on AVX-512 the forward
// rounds the product inside multiply-adds (exp2_prod) where a block's products are in its range,
// and its softplus and gate divide through recip (vrcp14ps and a Newton step, about 1 ulp).

#include "kernels.h"
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

// Two-source constant shuffle of 16-float vectors: indices 0-15 pick from a, 16-31 from b.
// (GCC >= 12 and Clang have __builtin_shufflevector; __builtin_shuffle covers older GCC.)
#if defined(__clang__)
#define OM_SHUFFLE16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define OM_SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, (Vec<float>::I){__VA_ARGS__})
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "om_parallel.h"
#include "om_vec.h"

namespace ouromamba_scan {

// Vector types and elementary functions: om_vec.h.
using ouromamba_vec::Vec;

#if defined(__AVX__) && !defined(__AVX512F__)
// One AVX register of floats. Without AVX-512, Vec<float>::V (16 lanes) is two of them; the
// AVX2 paths below work on a tile's 8-lane halves with this type, because GCC compiles some loops
// over 16-lane vectors through the stack on such CPUs (each vector stored as two or four pieces
// and reloaded whole, which stalls on store forwarding).
typedef float V8f __attribute__((vector_size(32), may_alias));
#endif

// ---------------------------------------------------------------------------------------------
// Problem description (raw pointers, compute dtype T)

// A (batch, dim, L) input, either time-contiguous (st == 1: a channel's sequence is one row) or
// channel-contiguous (sd == 1: the channels of one time step are adjacent, as after a transpose
// of a (batch, L, dim) projection), so that such inputs need no copy.
template <typename T>
struct Seq {
  const T* p = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
  bool rows = true;  // time-contiguous
  // read time-reversed: step t of the sequence is step L - 1 - t of the memory (the tile is loaded
  // in memory order and its steps reversed, so both layouts and the prefetcher read it as they lie)
  bool reverse = false;
  explicit operator bool() const { return p != nullptr; }
};

// The inputs of ouromamba::selective_scan_dt's delta, computed inside the scan (see dt_tile):
// W8A8's dt_proj on the x_proj columns dt_in, then the fake quantization of delta. float32 only.
struct DtFused {
  const float* x = nullptr;  // dt_in (batch, L, R), read through its strides
  int64_t sb = 0, st = 0, sr = 1, R = 0;
  const float* xs = nullptr;  // the per-token input scale, strides over (batch, L)
  int64_t xs_b = 0, xs_t = 0;
  float qmin = 0.0f, qmax = 0.0f;
  const float* wt = nullptr;    // the weight codes transposed: (R, dim) contiguous float32
  // AVX512-VNNI builds: the weight codes as int32 words of 4 consecutive codes of a channel,
  // (R4 / 4, dim) contiguous (R4: R rounded up to a multiple of 4, zero codes beyond R), and each
  // channel's sum of codes (dim,); null: the float product
  const int32_t* wg = nullptr;
  const int32_t* wsum = nullptr;
  int64_t R4 = 0;
  const float* ws = nullptr;    // the weight scales (dim,)
  const float* bias = nullptr;  // (dim,) or null
  const float* ds = nullptr;    // delta's scale and zero point, strides over (batch, dim, L)
  const float* dz = nullptr;
  int64_t ds_b = 0, ds_d = 0, ds_t = 0, dz_b = 0, dz_d = 0, dz_t = 0;
  float dqmin = 0.0f, dqmax = 0.0f;
};

// ouromamba::selective_scan_dt with `combine` (the backward scan of a bidirectional Vim mixer,
// finishing it): the block's output y (after the gate), reversed in time, is averaged with the
// forward scan's output and quantized to out_proj's int8 input codes, in the graph's order:
//   codes[b, t, d] = clamp(round_half_even(((yf[b, d, t] + y[b, d, L - 1 - t]) / 2) / xs[b, t]), qmin, qmax)
// written (batch, L, dim) contiguous. float32 only.
struct CombineOut {
  Seq<float> yf;             // (batch, dim, L)
  const float* xs = nullptr;  // out_proj's per-token scale, strides over (batch, L)
  int64_t xs_b = 0, xs_t = 0;
  float qmin = 0.0f, qmax = 0.0f;
  int8_t* codes = nullptr;    // (batch, L, dim) contiguous
};

// z given as the raw accumulator of the linear producing it (in_proj's z half: the z_scale /
// z_wscale / z_bias of ouromamba::selective_scan_cl and _dt), whose epilogue the scan applies as it
// loads the z tile: z[b, d, t] = ((acc[b, d, t] * xs[t]) * ws[d]) + bias[d], t the accumulator's
// own (memory) step, before any reversal. float32 only.
struct ZEpilogue {
  const float* xs = nullptr;  // the row scale: L values (xs_t == 1) or one (xs_t == 0)
  int64_t xs_t = 0;
  const float* ws = nullptr;    // (dim,)
  const float* bias = nullptr;  // (dim,) or null
};

template <typename T>
struct Problem {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  Seq<T> u;                  // (batch, dim, L)
  Seq<T> delta;              // (batch, dim, L)
  const T* A = nullptr;      // (dim, N) contiguous
  const T* D = nullptr;      // (dim,) or null
  Seq<T> z;                  // (batch, dim, L) or null
  const T* bias = nullptr;   // (dim,) or null
  bool softplus = false;
  bool out_cl = false;       // forward output channel-contiguous ((batch, L, dim) memory), else time-contiguous
  bool fast_decay = false;   // forward decays with the degree-4 exp2 (float32 only; om_vec.h kExp2Poly4)
  const DtFused* dt = nullptr;  // set: delta is computed from dt_in (float32 forward only), P.delta unused
  const CombineOut* combine = nullptr;  // set: the forward writes out_proj's codes (float32 only), no `out`
  const ZEpilogue* zepi = nullptr;      // set: z is a raw accumulator (float32 only), see ZEpilogue
  struct BC {
    const T* p = nullptr;
    int64_t s_b = 0, s_g = 0, dpg = 1, s_t = 0, s_n = 1, groups = 1;
    bool variable = true;
    const T* at(int64_t b, int64_t d) const { return p + b * s_b + (d / dpg) * s_g; }
  } B, C;
  // Channel blocks of one batch element: [starts[i], starts[i + 1]).
  std::vector<int64_t> starts;
};

// Split [0, dim) into blocks of at most W channels that never straddle a B or C group.
template <typename T>
void make_blocks(Problem<T>& P) {
  constexpr int W = Vec<T>::W;
  P.starts.clear();
  int64_t d = 0;
  while (d < P.dim) {
    P.starts.push_back(d);
    int64_t e = std::min<int64_t>(d + W, P.dim);
    if (P.B.variable) e = std::min<int64_t>(e, (d / P.B.dpg + 1) * P.B.dpg);
    if (P.C.variable) e = std::min<int64_t>(e, (d / P.C.dpg + 1) * P.C.dpg);
    d = e;
  }
  P.starts.push_back(P.dim);
}

// In-register transpose of a 16 x 16 float matrix (x[i][j] -> x[j][i]): four stages, stage s
// swapping bit s of the vector index with bit s of the lane index between vector pairs.
inline void transpose16(Vec<float>::V* x) {
  using V = Vec<float>::V;
  for (int v = 0; v < 16; v += 2) {
    const V a = x[v], b = x[v + 1];
    x[v] = OM_SHUFFLE16(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    x[v + 1] = OM_SHUFFLE16(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int v = 0; v < 16; v += 4) {
    for (int i = v; i < v + 2; ++i) {
      const V a = x[i], b = x[i + 2];
      x[i] = OM_SHUFFLE16(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      x[i + 2] = OM_SHUFFLE16(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
  }
  for (int v = 0; v < 16; v += 8) {
    for (int i = v; i < v + 4; ++i) {
      const V a = x[i], b = x[i + 4];
      x[i] = OM_SHUFFLE16(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
      x[i + 4] = OM_SHUFFLE16(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
  }
  for (int i = 0; i < 8; ++i) {
    const V a = x[i], b = x[i + 8];
    x[i] = OM_SHUFFLE16(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    x[i + 8] = OM_SHUFFLE16(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
}

#if defined(__AVX__) && !defined(__AVX512F__)
// Without AVX-512, 16 x 16 tiles are moved as four 8 x 8 blocks in 256-bit registers (the
// shuffles of transpose16 on 64-byte vectors went through the stack there).
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#define OM_TILE8 1
#endif

// tile[t][l] = x[b, d0 + l, t] for lanes l < nl, 0 for the others. Time-contiguous inputs go
// through in-register 16 x 16 transposes where the square is full (floats), element by element
// otherwise; channel-contiguous inputs are plain vector loads.
template <typename T>
inline void load_tile_as_stored(typename Vec<T>::V* tile, const Seq<T>& x, int64_t b, int64_t d0, int nl, int64_t L) {
  using V [[maybe_unused]] = typename Vec<T>::V;  // (not with OM_TILE8)
  constexpr int W = Vec<T>::W;
  T* s = reinterpret_cast<T*>(tile);
  if (!x.rows) {
    const T* src = x.p + b * x.sb + d0;
    // A constant size lets the compiler inline the copy as one vector load: with the size a
    // variable, each row was a libc memcpy call.
    if (nl == W) {
      for (int64_t t = 0; t < L; ++t) std::memcpy(&tile[t], src + t * x.st, sizeof(T) * W);
      return;
    }
    for (int64_t t = 0; t < L; ++t) {
      tile[t] = Vec<T>::splat(T(0));
      std::memcpy(&tile[t], src + t * x.st, sizeof(T) * nl);
    }
    return;
  }
  const T* src = x.p + b * x.sb + d0 * x.sd;
  const int64_t rs = x.sd;
  int64_t t0 = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(OM_TILE8)
    if (nl == W) {
      for (; t0 + 8 <= L; t0 += 8) {
        for (int h = 0; h < 2; ++h) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (8 * h + i) * rs + t0);
          transpose8(r);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(s + (t0 + j) * W + 8 * h, r[j]);
        }
      }
    }
#else
    if (nl == W) {
      for (; t0 + W <= L; t0 += W) {
        V r[W];
        for (int l = 0; l < W; ++l) std::memcpy(&r[l], src + l * rs + t0, sizeof(V));
        transpose16(r);
        for (int j = 0; j < W; ++j) tile[t0 + j] = r[j];
      }
    }
#endif
  }
  if (t0 == L) return;
  if (nl < W) std::memset(static_cast<void*>(s + t0 * W), 0, sizeof(T) * W * (L - t0));
  for (int l = 0; l < nl; ++l) {
    const T* row = src + l * rs;
    for (int64_t t = t0; t < L; ++t) s[t * W + l] = row[t];
  }
}

// load_tile_as_stored, then for a time-reversed input (x.reverse) the tile's steps reversed.
template <typename T>
inline void load_tile(typename Vec<T>::V* tile, const Seq<T>& x, int64_t b, int64_t d0, int nl, int64_t L) {
  load_tile_as_stored<T>(tile, x, b, d0, nl, L);
  if (x.reverse) std::reverse(tile, tile + L);
}

// Prefetches the next block's inputs while the current block computes: one cache line per input
// and time step, along a linear stream that covers the next block's W channels x L steps in L
// steps. Channel-contiguous inputs: the W channels of step t are one line. Time-contiguous
// inputs: W rows of L values; adjacent rows are one stretch of L lines, strided rows are walked
// with the stride scaled to fit L steps.
template <typename T>
struct Prefetcher {
  const T* base[4];
  int64_t step[4];
  int count = 0;
  void add(const Seq<T>& x, int64_t b, int64_t d0, int64_t L) {
    constexpr int W = Vec<T>::W;
    if (!x || L <= 0) return;
    if (x.rows) {
      base[count] = x.p + b * x.sb + d0 * x.sd;
      step[count] = x.sd == L ? W : (W * x.sd + L - 1) / L;
    } else {
      base[count] = x.p + b * x.sb + d0;
      step[count] = x.st;
    }
    ++count;
  }
  // An output the next block writes, one line per step (byte step): asked for with intent to
  // write, so the store of each step finds its line owned in the cache rather than waiting on it.
  const char* wbase = nullptr;
  int64_t wstep = 0;
  void add_write(const void* p, int64_t byte_step) {
    wbase = static_cast<const char*>(p);
    wstep = byte_step;
  }
  inline void at(int64_t t) const {
    for (int i = 0; i < count; ++i) __builtin_prefetch(base[i] + t * step[i]);
    if (wbase) __builtin_prefetch(wbase + t * wstep, 1, 3);
  }
};

// The block processed after the current one by the same thread, if any.
struct NextBlock {
  bool has = false;
  int64_t b = 0, d0 = 0;
};

// dst[l * L + t] = tile[t][l] for lanes l < nl.
template <typename T>
inline void store_tile(T* dst, const typename Vec<T>::V* tile, int64_t L, int nl) {
  using V [[maybe_unused]] = typename Vec<T>::V;  // (not with OM_TILE8)
  constexpr int W = Vec<T>::W;
  const T* s = reinterpret_cast<const T*>(tile);
  int64_t t0 = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(OM_TILE8)
    if (nl == W) {
      for (; t0 + 8 <= L; t0 += 8) {
        for (int h = 0; h < 2; ++h) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(s + (t0 + j) * W + 8 * h);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (8 * h + i) * L + t0, r[i]);
        }
      }
    }
#else
    if (nl == W) {
      for (; t0 + W <= L; t0 += W) {
        V x[W];
        for (int j = 0; j < W; ++j) x[j] = tile[t0 + j];
        transpose16(x);
        for (int l = 0; l < W; ++l) std::memcpy(dst + l * L + t0, &x[l], sizeof(V));
      }
    }
#endif
  }
  for (int l = 0; l < nl; ++l) {
    T* row = dst + l * L;
    for (int64_t t = t0; t < L; ++t) row[t] = s[t * W + l];
  }
}

// lanes(p, nl)[l] = p[l * stride] for l < nl, else 0; null p gives 0.
template <typename T>
inline typename Vec<T>::V lanes(const T* p, int nl, int64_t stride = 1) {
  typename Vec<T>::V v = Vec<T>::splat(T(0));
  if (p) {
    for (int l = 0; l < nl; ++l) v[l] = p[l * stride];
  }
  return v;
}

// Per-thread scratch space, in vectors of W lanes. Tiles are (L,) vectors, i.e. (L, W) values;
// the backward also keeps every state and decay of one block ((L + 1) * N and L * N vectors) and
// a few N-vector accumulators.
template <typename T>
struct Scratch {
  using V = typename Vec<T>::V;
  std::vector<V> buf;
  V* U = nullptr;    // u
  V* DT = nullptr;   // dt, then y (forward) / d delta (backward)
  V* X = nullptr;    // z (forward) / dout, then dy (backward)
  V* Y = nullptr;    // y, then du (backward)
  V* DSP = nullptr;  // d softplus / dx (backward)
  V* Z = nullptr;    // z, then dz (backward)
  V* AT = nullptr;   // A, A log2 e, constant B, constant C: N vectors each
  V* A2 = nullptr;
  V* BT = nullptr;
  V* CT = nullptr;
  V* H = nullptr;    // states: N vectors (forward), (L + 1) * N (backward)
  V* DEC = nullptr;  // decays exp(dt A): L * N (backward)
  V* G = nullptr;    // backward: dLoss/dh, dA, constant dB, constant dC accumulators (N each)
  V* DAc = nullptr;
  V* DBc = nullptr;
  V* DCc = nullptr;
  V* TB = nullptr;   // backward: one time step's per-lane dB / dC contributions (N each)
  V* TC = nullptr;
  // fused dt (forward of selective_scan_dt): the codes (L, R) of dt_in for batch element dq_b
  // and their scales (L,), computed once per batch element and thread; the block's weight
  // columns (R vectors of W lanes)
  std::vector<float> dq, dxs;
  std::vector<V> dw;
  int64_t dq_b = -1;
  // the same codes plus 128 as unsigned bytes, 4 per word, (L, R4 / 4), and the block's weight
  // words (the VNNI product)
  std::vector<uint32_t> dqw;
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  std::vector<__m512i> dwi;
#endif

  Scratch(int64_t L, int64_t N, bool backward) {
    const int64_t tiles = backward ? 6 * L : 3 * L;
    const int64_t states = backward ? (L + 1) * N + L * N + 6 * N : N;
    buf.assign(static_cast<size_t>(tiles + 4 * N + states), Vec<T>::splat(T(0)));
    V* p = buf.data();
    auto take = [&p](int64_t n) {
      V* r = p;
      p += n;
      return r;
    };
    U = take(L);
    DT = take(L);
    X = take(L);
    AT = take(N);
    A2 = take(N);
    BT = take(N);
    CT = take(N);
    if (!backward) {
      H = take(N);
      return;
    }
    Y = take(L);
    DSP = take(L);
    Z = take(L);
    H = take((L + 1) * N);
    DEC = take(L * N);
    G = take(N);
    DAc = take(N);
    DBc = take(N);
    DCc = take(N);
    TB = take(N);
    TC = take(N);
  }
};

// A (W,) vector of p[l * stride] for lanes l < nl, `fill` in the others.
inline Vec<float>::V lanes_or(const float* p, int nl, int64_t stride, float fill) {
  Vec<float>::V v = Vec<float>::splat(fill);
  for (int l = 0; l < nl; ++l) v[l] = p[l * stride];
  return v;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// dt_products' sums for S consecutive steps of a 16-lane block on AVX2: out[j * 16 + l] =
// sum_r q[j * R + r] * w[r][l], each a chain of multiply-adds in r order from 0. Six steps (12
// accumulators, the two weight halves and the broadcast code in 16 registers) keep both FMA units
// busy, where four (8 accumulators, each multiply-add reading its weight half from memory) left
// them idle part of the time.
template <int S>
inline void dt_rows_avx2(const float* __restrict__ q, int64_t R, const __m256* __restrict__ w8,
                         float* __restrict__ out) {
  __m256 a[S][2];
  for (int j = 0; j < S; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    const __m256 w0 = w8[2 * r], w1 = w8[2 * r + 1];
#pragma GCC unroll 6
    for (int j = 0; j < S; ++j) {
      const __m256 b = _mm256_broadcast_ss(q + j * R + r);
      a[j][0] = _mm256_fmadd_ps(b, w0, a[j][0]);
      a[j][1] = _mm256_fmadd_ps(b, w1, a[j][1]);
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < S; ++j) {
    _mm256_store_ps(out + j * 16, a[j][0]);
    _mm256_store_ps(out + j * 16 + 8, a[j][1]);
  }
}
#endif

// The integer products acc[t] = sum_r q[t, r] * w[d, r] of a block's dt_proj into S.DT, in
// float32 (integers below 2^24: exact in any order). Several steps share each weight vector load
// (six on AVX2, four in the generic code); R multiply-adds per step and block of W channels.
inline void dt_products(const DtFused& G, int64_t L, int64_t dim, int64_t d0, int nl, Scratch<float>& S) {
  using F = Vec<float>;
  using V = F::V;
  const int64_t R = G.R;
  S.dw.resize(static_cast<size_t>(R));
  V* __restrict__ w = S.dw.data();
  for (int64_t r = 0; r < R; ++r) w[r] = lanes<float>(G.wt + r * dim + d0, nl);
  const float* __restrict__ q = S.dq.data();
  V* __restrict__ DT = S.DT;
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  // AVX2: the same sums on the tiles' 8-lane halves in registers (the 16-lane code below kept its
  // accumulators on the stack here: 4x slower than this), six steps at a time (dt_rows_avx2).
  // Every partial sum is an integer below 2^24, so the multiply-adds round nothing.
  {
    const __m256* __restrict__ w8 = reinterpret_cast<const __m256*>(w);
    float* __restrict__ out = reinterpret_cast<float*>(DT);
    int64_t t = 0;
    for (; t + 6 <= L; t += 6) dt_rows_avx2<6>(q + t * R, R, w8, out + t * 16);
    for (; t + 4 <= L; t += 4) dt_rows_avx2<4>(q + t * R, R, w8, out + t * 16);
    for (; t < L; ++t) dt_rows_avx2<1>(q + t * R, R, w8, out + t * 16);
    return;
  }
#endif
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) {
    const float* q0 = q + t * R;
    V a0 = F::splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t r = 0; r < R; ++r) {
      const V wr = w[r];
      a0 += F::splat(q0[r]) * wr;
      a1 += F::splat(q0[R + r]) * wr;
      a2 += F::splat(q0[2 * R + r]) * wr;
      a3 += F::splat(q0[3 * R + r]) * wr;
    }
    DT[t] = a0;
    DT[t + 1] = a1;
    DT[t + 2] = a2;
    DT[t + 3] = a3;
  }
  for (; t < L; ++t) {
    V a = F::splat(0.0f);
    for (int64_t r = 0; r < R; ++r) a += F::splat(q[t * R + r]) * w[r];
    DT[t] = a;
  }
  OM_NO_CONTRACT();
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
// dt_products with AVX512-VNNI integer dot products: per step and group of 4 codes one vpdpbusd
// (16 channels x 4 products, exact int32 sums) instead of 4 float multiply-adds. vpdpbusd takes
// one unsigned operand: the codes plus 128 (S.dqw), and 128 * sum_r w[d, r] subtracted after.
// The same integers as dt_products, hence the same floats.
inline void dt_products_vnni(const DtFused& G, int64_t L, int64_t dim, int64_t d0, int nl, Scratch<float>& S) {
  const int64_t ng = G.R4 / 4;
  const __mmask16 m = static_cast<__mmask16>((1u << nl) - 1u);
  S.dwi.resize(static_cast<size_t>(ng));
  __m512i* __restrict__ w = S.dwi.data();
  for (int64_t g = 0; g < ng; ++g) w[g] = _mm512_maskz_loadu_epi32(m, G.wg + g * dim + d0);
  const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, G.wsum + d0), 7);
  const int32_t* __restrict__ q = reinterpret_cast<const int32_t*>(S.dqw.data());
  float* DT = reinterpret_cast<float*>(S.DT);
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) {
    const int32_t* q0 = q + t * ng;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0; g < ng; ++g) {
      const __m512i wg = w[g];
      a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(q0[g]), wg);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(q0[ng + g]), wg);
      a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(q0[2 * ng + g]), wg);
      a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(q0[3 * ng + g]), wg);
    }
    _mm512_storeu_ps(DT + t * 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(a0, corr)));
    _mm512_storeu_ps(DT + (t + 1) * 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(a1, corr)));
    _mm512_storeu_ps(DT + (t + 2) * 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(a2, corr)));
    _mm512_storeu_ps(DT + (t + 3) * 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(a3, corr)));
  }
  for (; t < L; ++t) {
    __m512i a = _mm512_setzero_si512();
    for (int64_t g = 0; g < ng; ++g) a = _mm512_dpbusd_epi32(a, _mm512_set1_epi32(q[t * ng + g]), w[g]);
    _mm512_storeu_ps(DT + t * 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(a, corr)));
  }
  OM_NO_CONTRACT();
}
#endif

// round_half_even(x) of the quantizations the scan does itself (delta's, out_proj's codes): as
// x + 1.5 * 2^23 - 1.5 * 2^23 on x clamped to +-2^22 first, beyond which every code is clamped to
// the integer range anyway.
inline Vec<float>::V round_even_clamped(Vec<float>::V x) {
  using F = Vec<float>;
  const F::V big = F::splat(4194304.0f), magic = F::splat(F::kMagic);
  return (F::vmin(F::vmax(x, -big), big) + magic) - magic;
}

// The delta tile of a block of ouromamba::selective_scan_dt, with the operations of the graph it
// replaces (ops/int8_linear.py int8_linear_decomposed, then ops/quant.py fake_quantize of the
// transposed result), in their order and without contractions, so the same bits:
//   q[t, r]  = clamp(round_half_even(dt_in[b, t, r] / xs[b, t]), qmin, qmax)   (once per b, thread)
//   acc[t]   = sum_r q[t, r] * w[d, r]       (integers below 2^24: exact in float32 in any order)
//   y[t]     = ((acc * xs[b, t]) * ws[d]) + bias[d]
//   delta[t] = (clamp(round_half_even(y / s) + zp, dqmin, dqmax) - zp) * s   (s, zp at (b, d, t))
// The products acc: dt_products (float multiply-adds), or dt_products_vnni on AVX512-VNNI builds.
inline void dt_tile(const DtFused& G, int64_t L, int64_t dim, int64_t b, int64_t d0, int nl, Scratch<float>& S) {
  using F = Vec<float>;
  using V = F::V;
  const int64_t R = G.R;
  if (S.dq_b != b) {
    S.dq.resize(static_cast<size_t>(L * R));
    S.dxs.resize(static_cast<size_t>(L));
    for (int64_t t = 0; t < L; ++t) {
      const float xs = G.xs[b * G.xs_b + t * G.xs_t];
      const float* row = G.x + b * G.sb + t * G.st;
      S.dxs[t] = xs;
      for (int64_t r = 0; r < R; ++r) {
        const float v = std::nearbyint(row[r * G.sr] / xs);  // (the default rounding: half to even)
        S.dq[t * R + r] = std::min(std::max(v, G.qmin), G.qmax);
      }
    }
    if (G.wg) {
      const int64_t ng = G.R4 / 4;
      S.dqw.assign(static_cast<size_t>(L * ng), 0u);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t r = 0; r < G.R4; ++r) {
          const uint32_t c = static_cast<uint32_t>(static_cast<int>(r < R ? S.dq[t * R + r] : 0.0f) + 128);
          S.dqw[t * ng + r / 4] |= c << (8 * (r % 4));
        }
      }
    }
    S.dq_b = b;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  if (G.wg) {
    dt_products_vnni(G, L, dim, d0, nl, S);
  } else
#endif
  {
    dt_products(G, L, dim, d0, nl, S);
  }
  const V ws = lanes<float>(G.ws + d0, nl);
  const float* __restrict__ xs = S.dxs.data();
  V* __restrict__ DT = S.DT;
  const float* ds = G.ds + b * G.ds_b + d0 * G.ds_d;
  const float* dz = G.dz + b * G.dz_b + d0 * G.dz_d;
#if defined(__AVX__) && !defined(__AVX512F__)
  // AVX2: the same operations, in the same order, on 8-lane halves (see V8f)
  {
    using F8 = ouromamba_vec::VecF<32>;
    const V bias = G.bias ? lanes<float>(G.bias + d0, nl) : F::splat(0.0f);
    const V8f* ws8 = reinterpret_cast<const V8f*>(&ws);
    const V8f* bias8 = reinterpret_cast<const V8f*>(&bias);
    V8f* __restrict__ D8 = reinterpret_cast<V8f*>(DT);
    const V8f lo = F8::splat(G.dqmin), hi = F8::splat(G.dqmax);
    const V8f big = F8::splat(4194304.0f), magic = F8::splat(F8::kMagic);
    for (int64_t t = 0; t < L; ++t) {
      V s16, zp16;
      if (G.ds_d == 0) {
        s16 = F::splat(ds[t * G.ds_t]);
      } else {
        s16 = lanes_or(ds + t * G.ds_t, nl, G.ds_d, 1.0f);
      }
      if (G.dz_d == 0) {
        zp16 = F::splat(dz[t * G.dz_t]);
      } else {
        zp16 = lanes_or(dz + t * G.dz_t, nl, G.dz_d, 0.0f);
      }
      const V8f* s8 = reinterpret_cast<const V8f*>(&s16);
      const V8f* zp8 = reinterpret_cast<const V8f*>(&zp16);
      const V8f x = F8::splat(xs[t]);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        V8f y = (D8[2 * t + h] * x) * ws8[h];
        __asm__("" : "+x"(y));  // y rounded before the bias is added (no multiply-add)
        if (G.bias) y = y + bias8[h];
        const V8f r = (F8::vmin(F8::vmax(y / s8[h], -big), big) + magic) - magic;
        const V8f code = F8::vmin(F8::vmax(r + zp8[h], lo), hi);
        D8[2 * t + h] = (code - zp8[h]) * s8[h];
      }
    }
    OM_NO_CONTRACT();
    return;
  }
#endif
  for (int64_t t = 0; t < L; ++t) DT[t] = (DT[t] * F::splat(xs[t])) * ws;
  OM_NO_CONTRACT();
  int64_t t = 0;
  if (G.bias) {
    const V bias = lanes<float>(G.bias + d0, nl);
    for (t = 0; t < L; ++t) DT[t] = DT[t] + bias;
  }
  // the fake quantization
  const V lo = F::splat(G.dqmin), hi = F::splat(G.dqmax);
  for (t = 0; t < L; ++t) {
    // padding lanes: scale 1, zero point 0 (their delta stays 0, as load_tile's)
    const V s = G.ds_d == 0 ? F::splat(ds[t * G.ds_t]) : lanes_or(ds + t * G.ds_t, nl, G.ds_d, 1.0f);
    const V zp = G.dz_d == 0 ? F::splat(dz[t * G.dz_t]) : lanes_or(dz + t * G.dz_t, nl, G.dz_d, 0.0f);
    const V code = F::vmin(F::vmax(round_even_clamped(DT[t] / s) + zp, lo), hi);
    DT[t] = (code - zp) * s;
  }
  OM_NO_CONTRACT();
}

#if defined(__AVX__) && !defined(__AVX512F__)
// AVX2 builds: the per-step elementwise work of a block on 8-lane halves, four vectors at a time
// (the K-chain functions of om_vec.h), with the same operations per lane as the 16-lane loops
// they replace, hence the same numbers. On the 64-byte type GCC also moved results through the
// stack and general registers.

// dt = softplus(delta + bias) over a tile in place, and d softplus into DSP (if given).
__attribute__((noinline)) void softplus_tile_avx2(Vec<float>::V* DT, Vec<float>::V* DSP, const Vec<float>::V& bias,
                                                  int64_t L) {
  using F8 = ouromamba_vec::VecF<32>;
  V8f* __restrict__ D8 = reinterpret_cast<V8f*>(DT);
  V8f* __restrict__ S8 = reinterpret_cast<V8f*>(DSP);
  const V8f b8[2] = {reinterpret_cast<const V8f*>(&bias)[0], reinterpret_cast<const V8f*>(&bias)[1]};
  const int64_t n = 2 * L;
  if (S8) {
    for (int64_t i = 0; i < n; ++i) S8[i] = F8::dsoftplus(D8[i] + b8[i & 1]);
  }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const V8f x[4] = {D8[i] + b8[0], D8[i + 1] + b8[1], D8[i + 2] + b8[0], D8[i + 3] + b8[1]};
    F8::softplus_k<4>(x, D8 + i);
  }
  for (; i < n; ++i) {
    const V8f x[1] = {D8[i] + b8[i & 1]};
    F8::softplus_k<1>(x, D8 + i);
  }
}

// y = (y + D u) * silu(z) (z given) or y + D u, over a tile: the forward's output of a block.
__attribute__((noinline)) void gate_tile_avx2(Vec<float>::V* Y, const Vec<float>::V* U, const Vec<float>::V* Z,
                                              const Vec<float>::V& Dv, int64_t L) {
  using F8 = ouromamba_vec::VecF<32>;
  V8f* __restrict__ Y8 = reinterpret_cast<V8f*>(Y);
  const V8f* __restrict__ U8 = reinterpret_cast<const V8f*>(U);
  const V8f* __restrict__ Z8 = reinterpret_cast<const V8f*>(Z);
  const V8f d8[2] = {reinterpret_cast<const V8f*>(&Dv)[0], reinterpret_cast<const V8f*>(&Dv)[1]};
  const int64_t n = 2 * L;
  if (!Z8) {
    for (int64_t i = 0; i < n; ++i) Y8[i] += d8[i & 1] * U8[i];
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    V8f sg[4];
    F8::sigmoid_rcp_k<4>(Z8 + i, sg);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) Y8[i + k] = (Y8[i + k] + d8[k & 1] * U8[i + k]) * (Z8[i + k] * sg[k]);
  }
  for (; i < n; ++i) {
    V8f sg[1];
    F8::sigmoid_rcp_k<1>(Z8 + i, sg);
    Y8[i] = (Y8[i] + d8[i & 1] * U8[i]) * (Z8[i] * sg[0]);
  }
}
#endif

// Loads the block's dt = softplus(delta + bias) tile (and d softplus / dx), A tile and constant
// B / C tiles.
template <typename T>
void load_block_params(const Problem<T>& P, int64_t b, int64_t d0, int nl, Scratch<T>& S,
                       typename Vec<T>::V* DSP) {
  using F = Vec<T>;
  using V = typename F::V;
  const int64_t L = P.L, N = P.N;
  if constexpr (std::is_same_v<T, float>) {
    if (P.dt) {
      dt_tile(*P.dt, L, P.dim, b, d0, nl, S);
    } else {
      load_tile<T>(S.DT, P.delta, b, d0, nl, L);
    }
  } else {
    load_tile<T>(S.DT, P.delta, b, d0, nl, L);
  }
  const V bias = lanes<T>(P.bias ? P.bias + d0 : nullptr, nl);
  bool done = false;  // (the AVX2 path below did the tile)
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (P.softplus) {
      softplus_tile_avx2(S.DT, DSP, bias, L);
      done = true;
    }
  }
#endif
  for (int64_t t = 0; !done && t < L; ++t) {
    const V x = S.DT[t] + bias;
    if (P.softplus) {
      S.DT[t] = F::template softplus<true>(x);  // (the division through recip: see om_vec.h)
      if (DSP) DSP[t] = F::dsoftplus(x);
    } else {
      S.DT[t] = x;
      if (DSP) DSP[t] = F::splat(T(1));
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    S.AT[n] = lanes<T>(P.A + d0 * N + n, nl, N);
    S.A2[n] = S.AT[n] * F::kLog2e;
  }
  if (!P.B.variable) {
    for (int64_t n = 0; n < N; ++n) S.BT[n] = lanes<T>(P.B.at(b, d0) + n * P.B.s_n, nl, P.B.s_g);
  }
  if (!P.C.variable) {
    for (int64_t n = 0; n < N; ++n) S.CT[n] = lanes<T>(P.C.at(b, d0) + n * P.C.s_n, nl, P.C.s_g);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// The codes of a block of ouromamba::selective_scan_dt with `combine` (see CombineOut) from its
// final output tile S.DT (the scan's own time order); S.U is free by now and takes y_f's tile.
// The graph's operations in its order: an addition, two divisions (no multiply-add can form),
// round half to even (round_even_clamped), the clamp.
inline void combine_block(const CombineOut& M, Scratch<float>& S, int64_t L, int64_t dim, int64_t b, int64_t d0,
                          int nl) {
  using F = Vec<float>;
  using V = F::V;
  load_tile<float>(S.U, M.yf, b, d0, nl, L);
  const V two = F::splat(2.0f), lo = F::splat(M.qmin), hi = F::splat(M.qmax);
  int8_t* dst = M.codes + b * L * dim + d0;
  for (int64_t t = 0; t < L; ++t) {
    const V x = (S.U[t] + S.DT[L - 1 - t]) / two;
    const V code = F::vmin(F::vmax(round_even_clamped(x / F::splat(M.xs[b * M.xs_b + t * M.xs_t])), lo), hi);
    int8_t c[F::W];
    for (int l = 0; l < F::W; ++l) c[l] = static_cast<int8_t>(static_cast<int>(code[l]));
    std::memcpy(dst + t * dim, c, static_cast<size_t>(nl));
  }
}

#if defined(__AVX__) && !defined(__AVX512F__)
// Whether every decay exponent dt * A of a block is <= 0 or NaN, where exp2's upper clamp changes
// nothing: no A > 0 and no dt < 0 (NaN compares false; padding lanes hold 0). A (N, 16) and dt
// (L, 16) tiles as 8-lane halves. (Written with GCC's 64-byte vector compares instead, this
// check cost more than the clamp it saves.)
inline bool decays_nonpos(const V8f* A8, int64_t N, const V8f* DT8, int64_t L) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 bad = zero;
  for (int64_t i = 0; i < 2 * N; ++i) bad = _mm256_or_ps(bad, _mm256_cmp_ps((__m256)A8[i], zero, _CMP_GT_OQ));
  for (int64_t i = 0; i < 2 * L; ++i) bad = _mm256_or_ps(bad, _mm256_cmp_ps((__m256)DT8[i], zero, _CMP_LT_OQ));
  return _mm256_movemask_ps(bad) == 0;
}

// Whether every decay exponent dt * A log2 e of a block lies in [-125, 0], where
// exp2_in_range applies: every A log2 e in [-a, 0] and every dt in [0, d] with a * d <= 125.
// Ordered compares: a NaN or infinite dt or A fails the check (so does a block whose bound
// is infinite), and such blocks take forward_avx2 with its clamps.
inline bool decays_in_range(const V8f* A8, int64_t N, const V8f* DT8, int64_t L) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1)), amax = zero, dmax = zero;
  for (int64_t i = 0; i < 2 * N; ++i) {
    const __m256 a = (__m256)A8[i];
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, zero, _CMP_LE_OQ));
    amax = _mm256_max_ps(amax, _mm256_sub_ps(zero, a));
  }
  for (int64_t i = 0; i < 2 * L; ++i) {
    const __m256 d = (__m256)DT8[i];
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(d, zero, _CMP_GE_OQ));
    dmax = _mm256_max_ps(dmax, d);
  }
  if (_mm256_movemask_ps(ok) != 0xff) return false;
  alignas(32) float av[8], dv[8];
  _mm256_store_ps(av, amax);
  _mm256_store_ps(dv, dmax);
  float am = 0.0f, dm = 0.0f;
  for (int l = 0; l < 8; ++l) {
    am = std::max(am, av[l]);
    dm = std::max(dm, dv[l]);
  }
  return am * dm <= 125.0f;  // (false for inf * anything and for NaN)
}

// One state of one step on both 8-lane halves of a 16-lane block: the decays a = exp(dt A)
// (kInRange: exp2_in_range, where the caller checked decays_in_range; else exp2 with its clamps),
// the states h = a * h_prev + (dt u) B and y += C h, in this order. The forward's in-range
// recurrence and the backward's recomputation both run it, so they compute the same numbers.
template <bool VB, bool VC, bool kInRange, bool kFast>
__attribute__((always_inline)) inline void state_step_avx2(V8f dt0, V8f dt1, V8f dtu0, V8f dtu1, const V8f* A2n,
                                                           const V8f* B2n, const V8f* C2n, const float* b,
                                                           const float* c, const V8f* hprev, V8f& a0, V8f& a1,
                                                           V8f& h0, V8f& h1, V8f& y0, V8f& y1) {
  using F8 = ouromamba_vec::VecF<32>;
  V8f x0 = dt0 * A2n[0], x1 = dt1 * A2n[1];
  if constexpr (kInRange) {
    // the products rounded, as exp2's clamp leaves them (no multiply-add with what follows)
    __asm__("" : "+x"(x0), "+x"(x1));
    a0 = F8::template exp2_in_range<kFast>(x0);
    a1 = F8::template exp2_in_range<kFast>(x1);
  } else {
    a0 = F8::template exp2<kFast>(x0);
    a1 = F8::template exp2<kFast>(x1);
  }
  const V8f bv0 = VB ? F8::splat(*b) : B2n[0];
  const V8f bv1 = VB ? bv0 : B2n[1];
  const V8f cv0 = VC ? F8::splat(*c) : C2n[0];
  const V8f cv1 = VC ? cv0 : C2n[1];
  h0 = a0 * hprev[0] + dtu0 * bv0;
  h1 = a1 * hprev[1] + dtu1 * bv1;
  y0 += cv0 * h0;
  y1 += cv1 * h1;
}

// forward_avx2 for a block of 16 lanes whose decay exponents are all in [-125, 0]
// (decays_in_range): both 8-lane halves in each step, one state at a time, the decays through
// exp2_in_range (no clamp, and 2^k added to the exponent instead of multiplied: fewer operations
// on the multiply pipes). The same operations per lane as forward_avx2, in the same order: the
// same bits.
template <bool VB, bool VC, bool kFast>
__attribute__((noinline)) void forward_avx2_in_range(V8f* __restrict__ H8, const V8f* __restrict__ A8,
                                                     const V8f* __restrict__ B8, const V8f* __restrict__ C8,
                                                     const V8f* __restrict__ U8, V8f* __restrict__ DT8,
                                                     const float* Bp, const float* Cp, int64_t Bst, int64_t Cst,
                                                     int64_t Bsn, int64_t Csn, int64_t L, int64_t N,
                                                     Prefetcher<float>& pf) {
  using F8 = ouromamba_vec::VecF<32>;
  for (int64_t t = 0; t < L; ++t) {
    const V8f dt0 = DT8[2 * t], dt1 = DT8[2 * t + 1];
    const V8f dtu0 = dt0 * U8[2 * t], dtu1 = dt1 * U8[2 * t + 1];
    const float* __restrict__ Bt = Bp + t * Bst;
    const float* __restrict__ Ct = Cp + t * Cst;
    pf.at(t);
    V8f y0 = F8::splat(0.0f), y1 = F8::splat(0.0f);
    for (int64_t n = 0; n < N; ++n) {
      V8f e0, e1, h0, h1;
      state_step_avx2<VB, VC, true, kFast>(dt0, dt1, dtu0, dtu1, A8 + 2 * n, B8 + 2 * n, C8 + 2 * n,
                                           VB ? Bt + n * Bsn : nullptr, VC ? Ct + n * Csn : nullptr, H8 + 2 * n,
                                           e0, e1, h0, h1, y0, y1);
      H8[2 * n] = h0;
      H8[2 * n + 1] = h1;
    }
    DT8[2 * t] = y0;  // dt[t] is no longer needed: the tile now holds y
    DT8[2 * t + 1] = y1;
  }
}

// The forward recurrence of one block at the CPU's own width (AVX2: 8 lanes), each 8-lane half of
// the tiles in turn (see forward_block). The states are updated two at a time, each step of the
// two decays side by side (exp2_k), and without the decays' upper clamp when kNonPos (every
// dt * A <= 0, checked per block by decays_nonpos). Same operations per lane as one state at a
// time with exp2, and the same order of y's sum: the same bits. A plain function of its
// arguments: as a lambda capturing them by reference, GCC reloaded the bounds and pointers
// through the captures inside the loop (36% slower); inlined into forward_block twice (with and
// without the clamp) it cost 15%.
template <bool VB, bool VC, bool kNonPos, bool kFast>
__attribute__((noinline)) void forward_avx2(V8f* __restrict__ H8, const V8f* __restrict__ A8, const V8f* __restrict__ B8,
                  const V8f* __restrict__ C8, const V8f* __restrict__ U8, V8f* __restrict__ DT8, const float* Bp,
                  const float* Cp, int64_t Bst, int64_t Cst, int64_t Bsn, int64_t Csn, int64_t L, int64_t N,
                  int halves, Prefetcher<float>& pf) {
  using F8 = ouromamba_vec::VecF<32>;
  for (int half = 0; half < halves; ++half) {
    for (int64_t t = 0; t < L; ++t) {
      const V8f dt = DT8[2 * t + half];
      const V8f dtu = dt * U8[2 * t + half];
      const float* __restrict__ Bt = Bp + t * Bst;
      const float* __restrict__ Ct = Cp + t * Cst;
      if (half == 0) pf.at(t);
      V8f y = F8::splat(0.0f);
      int64_t n = 0;
      for (; n + 2 <= N; n += 2) {
        const V8f x[2] = {dt * A8[2 * n + half], dt * A8[2 * n + 2 + half]};
        V8f e[2];
        F8::exp2_k<2, kNonPos, kFast>(x, e);
#pragma GCC unroll 2
        for (int k = 0; k < 2; ++k) {
          const V8f bv = VB ? F8::splat(Bt[(n + k) * Bsn]) : B8[2 * (n + k) + half];
          const V8f cv = VC ? F8::splat(Ct[(n + k) * Csn]) : C8[2 * (n + k) + half];
          const V8f h = e[k] * H8[2 * (n + k) + half] + dtu * bv;
          H8[2 * (n + k) + half] = h;
          y += cv * h;
        }
      }
      if (n < N) {
        const V8f bv = VB ? F8::splat(Bt[n * Bsn]) : B8[2 * n + half];
        const V8f cv = VC ? F8::splat(Ct[n * Csn]) : C8[2 * n + half];
        const V8f h = F8::template exp2<kFast>(dt * A8[2 * n + half]) * H8[2 * n + half] + dtu * bv;
        H8[2 * n + half] = h;
        y += cv * h;
      }
      DT8[2 * t + half] = y;  // dt[t] is no longer needed: the tile now holds y
    }
  }
}
#endif

// The forward recurrence of one block (AVX-512 and other builds without the AVX2 path below): the
// dt tile S.DT becomes y. kInRange: every decay exponent dt * A log2 e of the block is within
// exp2_prod's range (F::prod_in_range), so the decays take exp2_prod (on AVX-512 four
// instructions fewer per decay); otherwise exp2 of the rounded product, with its clamps.
template <typename T, bool VB, bool VC, bool kFast, bool kInRange>
inline void forward_recurrence(const Problem<T>& P, Scratch<T>& S, const T* Bp, const T* Cp, const Prefetcher<T>& pf) {
  using F = Vec<T>;
  using V = typename F::V;
  const int64_t L = P.L, N = P.N;
  V* __restrict__ H = S.H;
  const V* __restrict__ A2 = S.A2;  // A log2 e
  const V* __restrict__ BT = S.BT;
  const V* __restrict__ CT = S.CT;
  const int64_t Bsn = P.B.s_n, Csn = P.C.s_n;
  auto decay = [](V dt, V a2) {
    if constexpr (kInRange) {
      return F::template exp2_prod<kFast>(dt, a2);
    } else {
      return F::template exp2<kFast>(dt * a2);
    }
  };
  if (N == 16) {
    // d_state 16 (Vim, Mamba, MambaVision): the states live in registers for the whole block
    // (a compile-time trip count lets the compiler unroll the state loop and keep h[] out of
    // memory; with N a variable every state was stored and reloaded at every step).
    V h[16];
#pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) h[n] = F::splat(T(0));
    for (int64_t t = 0; t < L; ++t) {
      const V dt = S.DT[t];
      const V dtu = dt * S.U[t];
      const T* __restrict__ Bt = Bp + t * P.B.s_t;
      const T* __restrict__ Ct = Cp + t * P.C.s_t;
      pf.at(t);
      V y = F::splat(T(0));
#pragma GCC unroll 16
      for (int n = 0; n < 16; ++n) {
        const V bv = VB ? F::splat(Bt[n * Bsn]) : BT[n];
        const V cv = VC ? F::splat(Ct[n * Csn]) : CT[n];
        h[n] = decay(dt, A2[n]) * h[n] + dtu * bv;
        y += cv * h[n];
      }
      S.DT[t] = y;
    }
  } else {
    for (int64_t t = 0; t < L; ++t) {
      const V dt = S.DT[t];
      const V dtu = dt * S.U[t];
      const T* __restrict__ Bt = Bp + t * P.B.s_t;
      const T* __restrict__ Ct = Cp + t * P.C.s_t;
      pf.at(t);
      V y = F::splat(T(0));
      for (int64_t n = 0; n < N; ++n) {
        const V bv = VB ? F::splat(Bt[n * Bsn]) : BT[n];
        const V cv = VC ? F::splat(Ct[n * Csn]) : CT[n];
        const V h = decay(dt, A2[n]) * H[n] + dtu * bv;
        H[n] = h;
        y += cv * h;
      }
      S.DT[t] = y;  // dt[t] is no longer needed: the tile now holds y
    }
  }
}

// The forward's gate tile: load_tile of z, or, for a raw accumulator (P.zepi), the linear's
// epilogue applied in memory order (each step with its own row scale), then the reversal. The
// product, the addition of the bias and the gate after it are kept apart (OM_NO_CONTRACT): each
// rounds as the graph's separate epilogue does, so the same floats as the linear's output.
template <typename T>
inline void load_gate(typename Vec<T>::V* tile, const Problem<T>& P, int64_t b, int64_t d0, int nl, int64_t L) {
  if constexpr (std::is_same_v<T, float>) {
    if (P.zepi) {
      using F = Vec<float>;
      using V = F::V;
      const ZEpilogue& e = *P.zepi;
      load_tile_as_stored<float>(tile, P.z, b, d0, nl, L);
      const V ws = lanes<float>(e.ws + d0, nl);  // (padding lanes: zero accumulators and scales)
      for (int64_t t = 0; t < L; ++t) tile[t] = (tile[t] * F::splat(e.xs[t * e.xs_t])) * ws;
      if (e.bias) {
        OM_NO_CONTRACT();
        const V bv = lanes<float>(e.bias + d0, nl);
        for (int64_t t = 0; t < L; ++t) tile[t] = tile[t] + bv;
      }
      OM_NO_CONTRACT();  // (z is final: the gate's operations read it from the tile)
      if (P.z.reverse) std::reverse(tile, tile + L);
      return;
    }
  }
  load_tile<T>(tile, P.z, b, d0, nl, L);
}

template <typename T, bool VB, bool VC, bool kFast>
void forward_block(const Problem<T>& P, int64_t b, int64_t d0, int nl, T* out, Scratch<T>& S,
                   NextBlock next) {
  using F = Vec<T>;
  using V = typename F::V;
  const int64_t L = P.L, N = P.N;
  const int64_t row0 = b * P.dim + d0;
  load_tile<T>(S.U, P.u, b, d0, nl, L);
  load_block_params<T>(P, b, d0, nl, S, nullptr);
  Prefetcher<T> pf;
  if (next.has) {
    pf.add(P.u, next.b, next.d0, L);
    pf.add(P.delta, next.b, next.d0, L);
    pf.add(P.z, next.b, next.d0, L);
    // and the lines the next block stores: its output's rows, or (combining) its out_proj codes
    bool comb = false;
    if constexpr (std::is_same_v<T, float>) {
      if (P.combine) {
        pf.add(P.combine->yf, next.b, next.d0, L);
        pf.add_write(P.combine->codes + next.b * L * P.dim + next.d0, P.dim);
        comb = true;
      }
    }
    if (!comb) {
      if (P.out_cl)
        pf.add_write(out + next.b * L * P.dim + next.d0, P.dim * static_cast<int64_t>(sizeof(T)));
      else
        pf.add_write(out + (next.b * P.dim + next.d0) * L, F::W * static_cast<int64_t>(sizeof(T)));
    }
  }
  V* __restrict__ H = S.H;
  const V* __restrict__ A2 = S.A2;  // A log2 e
  [[maybe_unused]] const V* __restrict__ BT = S.BT;  // (the AVX2 path's; forward_recurrence reads S)
  [[maybe_unused]] const V* __restrict__ CT = S.CT;
  for (int64_t n = 0; n < N; ++n) H[n] = F::splat(T(0));
  const T* Bp = P.B.at(b, d0);
  const T* Cp = P.C.at(b, d0);
  [[maybe_unused]] const int64_t Bsn = P.B.s_n, Csn = P.C.s_n;
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // Without AVX-512 the 16 lanes are two 256-bit registers, and GCC moves whole 64-byte vectors
    // (the state stores, the loop-carried y) through the stack and general registers. So the
    // recurrence runs on each 8-lane half of the tiles in turn, at the CPU's own width: the same
    // operations per lane, hence the same numbers. (A half of padding lanes only is skipped.)
    using V8 = V8f;
    V8* __restrict__ H8 = reinterpret_cast<V8*>(H);
    const V8* __restrict__ A8 = reinterpret_cast<const V8*>(A2);
    const V8* __restrict__ B8 = reinterpret_cast<const V8*>(BT);
    const V8* __restrict__ C8 = reinterpret_cast<const V8*>(CT);
    const V8* __restrict__ U8 = reinterpret_cast<const V8*>(S.U);
    V8* __restrict__ DT8 = reinterpret_cast<V8*>(S.DT);
    const int halves = nl > 8 ? 2 : 1;
    if (halves == 2 && decays_in_range(A8, N, DT8, L))
      forward_avx2_in_range<VB, VC, kFast>(H8, A8, B8, C8, U8, DT8, Bp, Cp, P.B.s_t, P.C.s_t, Bsn, Csn, L, N, pf);
    else if (decays_nonpos(A8, N, DT8, L))
      forward_avx2<VB, VC, true, kFast>(H8, A8, B8, C8, U8, DT8, Bp, Cp, P.B.s_t, P.C.s_t, Bsn, Csn, L, N, halves, pf);
    else
      forward_avx2<VB, VC, false, kFast>(H8, A8, B8, C8, U8, DT8, Bp, Cp, P.B.s_t, P.C.s_t, Bsn, Csn, L, N, halves, pf);
  } else
#endif
  if (F::prod_in_range(S.DT, L, A2, N)) {
    forward_recurrence<T, VB, VC, kFast, true>(P, S, Bp, Cp, pf);
  } else {
    forward_recurrence<T, VB, VC, kFast, false>(P, S, Bp, Cp, pf);
  }
  const V Dv = lanes<T>(P.D ? P.D + d0 : nullptr, nl);
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (P.z) load_gate<T>(S.X, P, b, d0, nl, L);
    gate_tile_avx2(S.DT, S.U, P.z ? S.X : nullptr, Dv, L);
  } else
#endif
  if (P.z) {
    load_gate<T>(S.X, P, b, d0, nl, L);
    for (int64_t t = 0; t < L; ++t) {
      const V z = S.X[t];
      S.DT[t] = (S.DT[t] + Dv * S.U[t]) * (z * F::sigmoid_rcp(z));
    }
  } else {
    for (int64_t t = 0; t < L; ++t) S.DT[t] += Dv * S.U[t];
  }
  if constexpr (std::is_same_v<T, float>) {
    if (P.combine) {
      OM_NO_CONTRACT();  // (y is final: no multiply above may merge with the addition below)
      combine_block(*P.combine, S, L, P.dim, b, d0, nl);
      return;
    }
  }
  if (P.out_cl) {
    // channel-contiguous output: the tile's rows are the block's channels of each step, as they lie
    T* dst = out + b * L * P.dim + d0;
    if (nl == F::W) {  // a constant size: one vector store per step, not a libc memcpy call
      for (int64_t t = 0; t < L; ++t) std::memcpy(dst + t * P.dim, &S.DT[t], sizeof(V));
    } else {
      for (int64_t t = 0; t < L; ++t) std::memcpy(dst + t * P.dim, &S.DT[t], sizeof(T) * static_cast<size_t>(nl));
    }
  } else {
    store_tile<T>(out + row0 * L, S.DT, L, nl);
  }
}

template <typename T>
void forward(const Problem<T>& P, T* out) {
  const int64_t nb = static_cast<int64_t>(P.starts.size()) - 1;
  const int64_t work_per_block = std::max<int64_t>(1, P.L * P.N);
  const int64_t grain = std::max<int64_t>(1, 16384 / work_per_block);
  using Fn = void (*)(const Problem<T>&, int64_t, int64_t, int, T*, Scratch<T>&, NextBlock);
  // [fast][B variable][C variable]
  constexpr Fn table[2][2][2] = {
      {{&forward_block<T, false, false, false>, &forward_block<T, false, true, false>},
       {&forward_block<T, true, false, false>, &forward_block<T, true, true, false>}},
      {{&forward_block<T, false, false, true>, &forward_block<T, false, true, true>},
       {&forward_block<T, true, false, true>, &forward_block<T, true, true, true>}}};
  const bool fast = P.fast_decay && std::is_same_v<T, float>;
  const Fn fn = table[fast][P.B.variable][P.C.variable];
  ouromamba_parallel::parallel_items(P.batch * nb, grain, [&](ouromamba_parallel::Items& items) {
    Scratch<T> S(P.L, P.N, false);
    ouromamba_parallel::for_each_with_next(items, [&](int64_t i, int64_t j) {
      const int64_t b = i / nb, k = i % nb;
      const int64_t d0 = P.starts[k];
      NextBlock next;
      if (j >= 0) {  // the block this thread scans next, whose rows the recurrence prefetches
        next.has = true;
        next.b = j / nb;
        next.d0 = P.starts[j % nb];
      }
      fn(P, b, d0, static_cast<int>(P.starts[k + 1] - d0), out, S, next);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T>
struct GradPtrs {
  T* du = nullptr;        // (batch, dim, L)
  T* ddelta = nullptr;    // (batch, dim, L)
  T* dz = nullptr;        // (batch, dim, L) or null
  T* dA_part = nullptr;   // (batch, dim, N)
  T* dD_part = nullptr;   // (batch, dim)
  T* dbias_part = nullptr;// (batch, dim)
  T* dB_part = nullptr;   // variable: (batch, K, groups, N, L); constant: (batch, dim, N)
  T* dC_part = nullptr;
  int64_t K = 1;
};

// dst[n * ds] += sum over lanes of v[n], for n < count (count <= W).
inline void add_lane_sums(const Vec<float>::V* v, int count, float* dst, int64_t ds) {
  using V = Vec<float>::V;
  static_assert(Vec<float>::W == 16, "lane reduction written for 16 lanes");
  // Transpose-and-add: after each level, lane groups of the result hold partial sums of twice as
  // many input vectors; 15 two-source shuffles pairs plus adds instead of 16 full reductions.
  V x[16];
  for (int i = 0; i < 16; ++i) x[i] = i < count ? v[i] : V{};
  V a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {
    const V p = x[2 * i], q = x[2 * i + 1];
    a[i] = OM_SHUFFLE16(p, q, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           OM_SHUFFLE16(p, q, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const V p = a[2 * i], q = a[2 * i + 1];
    b[i] = OM_SHUFFLE16(p, q, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           OM_SHUFFLE16(p, q, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const V p = b[2 * i], q = b[2 * i + 1];
    c[i] = OM_SHUFFLE16(p, q, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           OM_SHUFFLE16(p, q, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  const V r = OM_SHUFFLE16(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
              OM_SHUFFLE16(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  if (count == 16 && ds == 1) {
    V d;
    std::memcpy(&d, dst, sizeof(V));
    d += r;
    std::memcpy(dst, &d, sizeof(V));
  } else {
    for (int n = 0; n < count; ++n) dst[n * ds] += r[n];
  }
}

inline void add_lane_sums(const Vec<double>::V* v, int count, double* dst, int64_t ds) {
  for (int n = 0; n < count; ++n) {
    double s = 0.0;
    for (int l = 0; l < Vec<double>::W; ++l) s += v[n][l];
    dst[n * ds] += s;
  }
}

// dst[n * ds] += sum over lanes of v[n] for all n < N.
template <typename T>
inline void add_lane_sums_all(const typename Vec<T>::V* v, int64_t N, T* dst, int64_t ds) {
  constexpr int W = Vec<T>::W;
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    add_lane_sums(v + n0, static_cast<int>(std::min<int64_t>(W, N - n0)), dst + n0 * ds, ds);
  }
}

#if defined(__AVX__) && !defined(__AVX512F__)
// The backward's forward recomputation on AVX2 builds: every state (HS, from step 1 on), decay
// (DEC) and output (Y) of a block, both 8-lane halves of each step (padding lanes included, as the
// 16-lane loop). The same operations per lane as that loop (exp2 with its clamps, then the state
// and the sum over states in order): the same numbers. kInRange: every decay exponent of the block
// is in [-125, 0] (decays_in_range), and the decays take exp2_in_range, as the forward does there
// (the same bits as exp2 for such exponents, with fewer operations). On the 64-byte type GCC moved
// every stored state and decay through the stack and general registers.
template <bool VB, bool VC, bool kInRange>
__attribute__((noinline)) void backward_recompute_avx2(V8f* __restrict__ HS8, V8f* __restrict__ DEC8,
                                                       V8f* __restrict__ Y8, const V8f* __restrict__ A8,
                                                       const V8f* __restrict__ B8, const V8f* __restrict__ C8,
                                                       const V8f* __restrict__ U8, const V8f* __restrict__ DT8,
                                                       const float* Bp, const float* Cp, int64_t Bst, int64_t Cst,
                                                       int64_t Bsn, int64_t Csn, int64_t L, int64_t N,
                                                       Prefetcher<float>& pf) {
  using F8 = ouromamba_vec::VecF<32>;
  for (int64_t t = 0; t < L; ++t) {
    const V8f dt0 = DT8[2 * t], dt1 = DT8[2 * t + 1];
    const V8f dtu0 = dt0 * U8[2 * t], dtu1 = dt1 * U8[2 * t + 1];
    const float* __restrict__ Bt = Bp + t * Bst;
    const float* __restrict__ Ct = Cp + t * Cst;
    const V8f* __restrict__ hp = HS8 + 2 * t * N;
    V8f* __restrict__ hn = HS8 + 2 * (t + 1) * N;
    V8f* __restrict__ dec = DEC8 + 2 * t * N;
    pf.at(t);
    V8f y0 = F8::splat(0.0f), y1 = F8::splat(0.0f);
    for (int64_t n = 0; n < N; ++n) {
      V8f a0, a1, h0, h1;
      state_step_avx2<VB, VC, kInRange, false>(dt0, dt1, dtu0, dtu1, A8 + 2 * n, B8 + 2 * n, C8 + 2 * n,
                                               VB ? Bt + n * Bsn : nullptr, VC ? Ct + n * Csn : nullptr,
                                               hp + 2 * n, a0, a1, h0, h1, y0, y1);
      dec[2 * n] = a0;
      dec[2 * n + 1] = a1;
      hn[2 * n] = h0;
      hn[2 * n + 1] = h1;
    }
    Y8[2 * t] = y0;
    Y8[2 * t + 1] = y1;
  }
}

// add_lane_sums_all on 16-lane vectors whose two 8-lane halves are already added (s1[n] = lanes
// 0-7 + lanes 8-15 of vector n), on AVX2 registers: dst[n * ds] += the sum of vector n's lanes,
// with add_lane_sums's tree (lane l with l + 8, which the caller did, then j with j + 4, j with
// j + 2, j with j + 1 within 128-bit halves), so the same sums. 16 vectors at a time, transposed
// as they are added.
inline void add_half_sums_avx2(const V8f* s, int64_t N, float* dst, int64_t ds) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, N - n0));
    __m256 s1[16];
    for (int i = 0; i < 16; ++i) s1[i] = i < count ? (__m256)s[n0 + i] : _mm256_setzero_ps();
    __m256 s2[8], s3[4], s4[2];
    for (int i = 0; i < 8; ++i) {  // lanes 0-3: vector 2i's j + (j + 4); lanes 4-7: vector 2i + 1's
      s2[i] = _mm256_add_ps(_mm256_permute2f128_ps(s1[2 * i], s1[2 * i + 1], 0x20),
                            _mm256_permute2f128_ps(s1[2 * i], s1[2 * i + 1], 0x31));
    }
    for (int i = 0; i < 4; ++i) {  // per 128-bit half: j + (j + 2) of two vectors
      s3[i] = _mm256_add_ps(_mm256_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm256_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int i = 0; i < 2; ++i) {  // j + (j + 1)
      s4[i] = _mm256_add_ps(_mm256_shuffle_ps(s3[2 * i], s3[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm256_shuffle_ps(s3[2 * i], s3[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    // s4[i] lane k holds the sum of vector 8i + kVec[k]
    static constexpr int kVec[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    alignas(32) float r[16];
    _mm256_store_ps(r, s4[0]);
    _mm256_store_ps(r + 8, s4[1]);
    for (int k = 0; k < 16; ++k) {
      const int n = 8 * (k / 8) + kVec[k % 8];
      if (n < count) dst[(n0 + n) * ds] += r[k];
    }
  }
}

// The backward's reverse recurrence on AVX2 builds, both 8-lane halves of each state side by side
// (two independent chains for the sums over states), then the step's variable dB / dC lane sums:
// the same operations per lane as the 16-lane loop of backward_block, in the same order (GCC moved
// that loop's 64-byte vectors through the stack and general registers). A variable B's (C's)
// per-step terms are stored with their halves already added (add_half_sums_avx2 takes them from
// there: add_lane_sums's first step, the same sum).
template <bool VB, bool VC>
__attribute__((noinline)) void backward_reverse_avx2(Scratch<float>& S, Vec<float>::V* dbias, const float* Bp,
                                                     const float* Cp, int64_t Bst, int64_t Cst, int64_t Bsn,
                                                     int64_t Csn, int64_t L, int64_t N, float* dBvar, float* dCvar) {
  using F8 = ouromamba_vec::VecF<32>;
  V8f* __restrict__ DT8 = reinterpret_cast<V8f*>(S.DT);
  const V8f* __restrict__ U8 = reinterpret_cast<const V8f*>(S.U);
  const V8f* __restrict__ X8 = reinterpret_cast<const V8f*>(S.X);
  V8f* __restrict__ Y8 = reinterpret_cast<V8f*>(S.Y);
  const V8f* __restrict__ DSP8 = reinterpret_cast<const V8f*>(S.DSP);
  const V8f* __restrict__ HS8 = reinterpret_cast<const V8f*>(S.H);
  const V8f* __restrict__ DEC8 = reinterpret_cast<const V8f*>(S.DEC);
  V8f* __restrict__ G8 = reinterpret_cast<V8f*>(S.G);
  V8f* __restrict__ DA8 = reinterpret_cast<V8f*>(S.DAc);
  V8f* __restrict__ TB8 = reinterpret_cast<V8f*>(VB ? S.TB : S.DBc);
  V8f* __restrict__ TC8 = reinterpret_cast<V8f*>(VC ? S.TC : S.DCc);
  const V8f* __restrict__ AT8 = reinterpret_cast<const V8f*>(S.AT);
  const V8f* __restrict__ BT8 = reinterpret_cast<const V8f*>(S.BT);
  const V8f* __restrict__ CT8 = reinterpret_cast<const V8f*>(S.CT);
  V8f db0 = reinterpret_cast<const V8f*>(dbias)[0], db1 = reinterpret_cast<const V8f*>(dbias)[1];
  for (int64_t t = L - 1; t >= 0; --t) {
    const float* __restrict__ Bt = Bp + t * Bst;
    const float* __restrict__ Ct = Cp + t * Cst;
    const V8f* __restrict__ hp = HS8 + 2 * t * N;
    const V8f* __restrict__ hc = HS8 + 2 * (t + 1) * N;
    const V8f* __restrict__ dec = DEC8 + 2 * t * N;
    const V8f dt0 = DT8[2 * t], dt1 = DT8[2 * t + 1];
    const V8f u0 = U8[2 * t], u1 = U8[2 * t + 1];
    const V8f dtu0 = dt0 * u0, dtu1 = dt1 * u1;
    const V8f dy0 = X8[2 * t], dy1 = X8[2 * t + 1];
    V8f sgB0 = F8::splat(0.0f), sgB1 = F8::splat(0.0f);
    V8f sqA0 = F8::splat(0.0f), sqA1 = F8::splat(0.0f);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = 2 * n;
      const V8f bv0 = VB ? F8::splat(Bt[n * Bsn]) : BT8[i];
      const V8f bv1 = VB ? bv0 : BT8[i + 1];
      const V8f cv0 = VC ? F8::splat(Ct[n * Csn]) : CT8[i];
      const V8f cv1 = VC ? cv0 : CT8[i + 1];
      const V8f gn0 = G8[i] + dy0 * cv0;
      const V8f gn1 = G8[i + 1] + dy1 * cv1;
      if (VC) {
        V8f tc0 = dy0 * hc[i], tc1 = dy1 * hc[i + 1];
        __asm__("" : "+x"(tc0), "+x"(tc1));  // each product rounded, as stored for the lane sums
        TC8[n] = tc0 + tc1;
      } else {
        TC8[i] += dy0 * hc[i];
        TC8[i + 1] += dy1 * hc[i + 1];
      }
      sgB0 += gn0 * bv0;
      sgB1 += gn1 * bv1;
      if (VB) {
        V8f tb0 = gn0 * dtu0, tb1 = gn1 * dtu1;
        __asm__("" : "+x"(tb0), "+x"(tb1));
        TB8[n] = tb0 + tb1;
      } else {
        TB8[i] += gn0 * dtu0;
        TB8[i + 1] += gn1 * dtu1;
      }
      const V8f a0 = dec[i], a1 = dec[i + 1];
      const V8f q0 = gn0 * hp[i] * a0;
      const V8f q1 = gn1 * hp[i + 1] * a1;
      sqA0 += q0 * AT8[i];
      sqA1 += q1 * AT8[i + 1];
      DA8[i] += q0 * dt0;
      DA8[i + 1] += q1 * dt1;
      G8[i] = gn0 * a0;
      G8[i + 1] = gn1 * a1;
    }
    const V8f dd0 = (sqA0 + u0 * sgB0) * DSP8[2 * t];
    const V8f dd1 = (sqA1 + u1 * sgB1) * DSP8[2 * t + 1];
    DT8[2 * t] = dd0;  // the dt tile now holds d delta
    DT8[2 * t + 1] = dd1;
    db0 += dd0;
    db1 += dd1;
    Y8[2 * t] += dt0 * sgB0;
    Y8[2 * t + 1] += dt1 * sgB1;
    if (VB) add_half_sums_avx2(TB8, N, dBvar + t, L);
    if (VC) add_half_sums_avx2(TC8, N, dCvar + t, L);
  }
  reinterpret_cast<V8f*>(dbias)[0] = db0;
  reinterpret_cast<V8f*>(dbias)[1] = db1;
}
#endif

template <typename T, bool VB, bool VC>
void backward_block(const Problem<T>& P, const Seq<T>& dout, int64_t b, int64_t d0, int nl,
                    const GradPtrs<T>& g, T* dB_task, T* dC_task, Scratch<T>& S, NextBlock next) {
  using F = Vec<T>;
  using V = typename F::V;
  const int64_t L = P.L, N = P.N;
  const int64_t row0 = b * P.dim + d0;
  V* __restrict__ DSP = S.DSP;
  load_tile<T>(S.U, P.u, b, d0, nl, L);
  load_block_params<T>(P, b, d0, nl, S, DSP);
  Prefetcher<T> pf;
  if (next.has) {
    pf.add(P.u, next.b, next.d0, L);
    pf.add(P.delta, next.b, next.d0, L);
    pf.add(dout, next.b, next.d0, L);
    pf.add(P.z, next.b, next.d0, L);
  }
  const V* __restrict__ AT = S.AT;
  const V* __restrict__ A2 = S.A2;  // A log2 e
  const V* __restrict__ BT = S.BT;
  const V* __restrict__ CT = S.CT;
  V* __restrict__ HS = S.H;     // HS[t * N + n] = h_{t-1}[n]; HS[0 .. N) = 0
  V* __restrict__ DEC = S.DEC;  // DEC[t * N + n] = exp(dt_t A[n])
  const T* Bp = P.B.at(b, d0);
  const T* Cp = P.C.at(b, d0);
  const int64_t Bsn = P.B.s_n, Csn = P.C.s_n;

  // Forward recomputation (the decays through exp2_prod where the block's products allow it,
  // as in the forward; a loop-invariant branch, which the compiler takes out of the loop).
  for (int64_t n = 0; n < N; ++n) HS[n] = F::splat(T(0));
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const auto* A8 = reinterpret_cast<const V8f*>(A2);
    const auto* DT8 = reinterpret_cast<const V8f*>(S.DT);
    auto recompute = decays_in_range(A8, N, DT8, L) ? backward_recompute_avx2<VB, VC, true>
                                                    : backward_recompute_avx2<VB, VC, false>;
    recompute(reinterpret_cast<V8f*>(HS), reinterpret_cast<V8f*>(DEC), reinterpret_cast<V8f*>(S.Y), A8,
              reinterpret_cast<const V8f*>(BT), reinterpret_cast<const V8f*>(CT),
              reinterpret_cast<const V8f*>(S.U), DT8, Bp, Cp, P.B.s_t, P.C.s_t, Bsn, Csn, L, N, pf);
  }
  for (int64_t t = 0; !std::is_same_v<T, float> && t < L; ++t) {
#else
  const bool in_range = F::prod_in_range(S.DT, L, A2, N);
  for (int64_t t = 0; t < L; ++t) {
#endif
    const V dt = S.DT[t];
    const V dtu = dt * S.U[t];
    const T* __restrict__ Bt = Bp + t * P.B.s_t;
    const T* __restrict__ Ct = Cp + t * P.C.s_t;
    const V* __restrict__ hp = HS + t * N;
    V* __restrict__ hn = HS + (t + 1) * N;
    V* __restrict__ dec = DEC + t * N;
    pf.at(t);
    V y = F::splat(T(0));
    for (int64_t n = 0; n < N; ++n) {
      const V bv = VB ? F::splat(Bt[n * Bsn]) : BT[n];
      const V cv = VC ? F::splat(Ct[n * Csn]) : CT[n];
#if defined(__AVX__) && !defined(__AVX512F__)
      const V a = F::exp2(dt * A2[n]);  // (exp2_prod is this without AVX-512)
#else
      const V a = in_range ? F::exp2_prod(dt, A2[n]) : F::exp2(dt * A2[n]);
#endif
      const V h = a * hp[n] + dtu * bv;
      dec[n] = a;
      hn[n] = h;
      y += cv * h;
    }
    S.Y[t] = y;
  }

  // Gate and skip connection: X holds dout and becomes dy, Y becomes du, Z gets dz.
  const V Dv = lanes<T>(P.D ? P.D + d0 : nullptr, nl);
  V dDacc = F::splat(T(0));
  load_tile<T>(S.X, dout, b, d0, nl, L);
  if (P.z) {
    load_tile<T>(S.Z, P.z, b, d0, nl, L);
    for (int64_t t = 0; t < L; ++t) {
      const V z = S.Z[t];
      const V sz = F::sigmoid(z);
      const V y = S.Y[t] + Dv * S.U[t];
      const V d_out = S.X[t];
      S.Z[t] = d_out * y * sz * (T(1) + z * (T(1) - sz));
      S.X[t] = d_out * z * sz;
    }
    store_tile<T>(g.dz + row0 * L, S.Z, L, nl);
  }
  for (int64_t t = 0; t < L; ++t) {
    const V dy = S.X[t];
    dDacc += dy * S.U[t];
    S.Y[t] = dy * Dv;  // du, first term
  }

  // Reverse recurrence.
  V* __restrict__ G = S.G;
  V* __restrict__ DAc = S.DAc;
  V* __restrict__ DBc = S.DBc;
  V* __restrict__ DCc = S.DCc;
  V* __restrict__ TB = S.TB;
  V* __restrict__ TC = S.TC;
  // Variable dB / dC: this block's group in its task's (groups, N, L) buffer.
  T* dBvar = VB ? dB_task + (d0 / P.B.dpg) * N * L : nullptr;
  T* dCvar = VC ? dC_task + (d0 / P.C.dpg) * N * L : nullptr;
  for (int64_t n = 0; n < N; ++n) {
    G[n] = F::splat(T(0));
    DAc[n] = F::splat(T(0));
    DBc[n] = F::splat(T(0));
    DCc[n] = F::splat(T(0));
  }
  V dbias = F::splat(T(0));
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    backward_reverse_avx2<VB, VC>(S, &dbias, Bp, Cp, P.B.s_t, P.C.s_t, Bsn, Csn, L, N, dBvar, dCvar);
  }
  for (int64_t t = std::is_same_v<T, float> ? -1 : L - 1; t >= 0; --t) {
#else
  for (int64_t t = L - 1; t >= 0; --t) {
#endif
    const V dt = S.DT[t];
    const V u = S.U[t];
    const V dtu = dt * u;
    const V dy = S.X[t];
    const T* __restrict__ Bt = Bp + t * P.B.s_t;
    const T* __restrict__ Ct = Cp + t * P.C.s_t;
    const V* __restrict__ hp = HS + t * N;
    const V* __restrict__ hc = HS + (t + 1) * N;
    const V* __restrict__ dec = DEC + t * N;
    V* __restrict__ dBt = VB ? TB : DBc;
    V* __restrict__ dCt = VC ? TC : DCc;
    V sgB = F::splat(T(0));
    V sqA = F::splat(T(0));
    for (int64_t n = 0; n < N; ++n) {
      const V bv = VB ? F::splat(Bt[n * Bsn]) : BT[n];
      const V cv = VC ? F::splat(Ct[n * Csn]) : CT[n];
      const V gn = G[n] + dy * cv;
      if (VC) {
        dCt[n] = dy * hc[n];
      } else {
        dCt[n] += dy * hc[n];
      }
      sgB += gn * bv;
      if (VB) {
        dBt[n] = gn * dtu;
      } else {
        dBt[n] += gn * dtu;
      }
      const V a = dec[n];
      const V q = gn * hp[n] * a;
      sqA += q * AT[n];
      DAc[n] += q * dt;
      G[n] = gn * a;
    }
    if (VB) add_lane_sums_all<T>(TB, N, dBvar + t, L);
    if (VC) add_lane_sums_all<T>(TC, N, dCvar + t, L);
    const V dd = (sqA + u * sgB) * DSP[t];
    S.DT[t] = dd;  // the dt tile now holds d delta
    dbias += dd;
    S.Y[t] += dt * sgB;
  }

  store_tile<T>(g.du + row0 * L, S.Y, L, nl);
  store_tile<T>(g.ddelta + row0 * L, S.DT, L, nl);
  for (int l = 0; l < nl; ++l) {
    const int64_t row = row0 + l;
    g.dD_part[row] = dDacc[l];
    g.dbias_part[row] = dbias[l];
    for (int64_t n = 0; n < N; ++n) g.dA_part[row * N + n] = DAc[n][l];
    if (!VB) {
      for (int64_t n = 0; n < N; ++n) g.dB_part[row * N + n] = DBc[n][l];
    }
    if (!VC) {
      for (int64_t n = 0; n < N; ++n) g.dC_part[row * N + n] = DCc[n][l];
    }
  }
}

// One task: batch element b, blocks [kb0, kb1) of the block list; it owns (and zeroes) the
// variable dB / dC buffers (groups, N, L) of index b * K + k.
template <typename T, bool VB, bool VC>
void backward_task(const Problem<T>& P, const Seq<T>& dout, int64_t b, int64_t k, int64_t kb0, int64_t kb1,
                   const GradPtrs<T>& g, Scratch<T>& S) {
  const int64_t LN = P.L * P.N;
  const int64_t task = b * g.K + k;
  T* dB_task = VB ? g.dB_part + task * P.B.groups * LN : nullptr;
  T* dC_task = VC ? g.dC_part + task * P.C.groups * LN : nullptr;
  if (VB) std::memset(static_cast<void*>(dB_task), 0, sizeof(T) * P.B.groups * LN);
  if (VC) std::memset(static_cast<void*>(dC_task), 0, sizeof(T) * P.C.groups * LN);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t d0 = P.starts[kb];
    NextBlock next;
    if (kb + 1 < kb1) {
      next.has = true;
      next.b = b;
      next.d0 = P.starts[kb + 1];
    }
    backward_block<T, VB, VC>(P, dout, b, d0, static_cast<int>(P.starts[kb + 1] - d0), g, dB_task,
                              dC_task, S, next);
  }
}

template <typename T>
void backward(const Problem<T>& P, const Seq<T>& dout, const GradPtrs<T>& g) {
  const int64_t nb = static_cast<int64_t>(P.starts.size()) - 1;
  const int64_t K = g.K;
  auto fn = P.B.variable ? (P.C.variable ? &backward_task<T, true, true> : &backward_task<T, true, false>)
                         : (P.C.variable ? &backward_task<T, false, true> : &backward_task<T, false, false>);
  ouromamba_parallel::parallel_items(P.batch * K, 1, [&](ouromamba_parallel::Items& items) {
    Scratch<T> S(P.L, P.N, true);
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, k = task % K;
        fn(P, dout, b, k, k * nb / K, (k + 1) * nb / K, g, S);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tensor glue

struct BCView {
  at::Tensor t;  // keeps the (possibly converted) storage alive
  int64_t s_b = 0, s_g = 0, dpg = 1, s_t = 0, s_n = 1, groups = 1;
  bool variable = true;
};

// B or C in the compute dtype, read through its own strides.
BCView make_bc_view(const at::Tensor& M, int64_t batch, int64_t dim, int64_t N, int64_t L,
                    at::ScalarType cdt, const char* name) {
  BCView v;
  v.t = M.to(cdt);
  const at::Tensor& t = v.t;
  if (M.dim() == 2) {
    TORCH_CHECK(M.size(0) == dim && M.size(1) == N, "selective_scan: ", name, " has shape ",
                M.sizes(), ", expected (", dim, ", ", N, ")");
    v.s_g = t.stride(0);
    v.s_n = t.stride(1);
    v.dpg = 1;
    v.groups = dim;
    v.variable = false;
  } else if (M.dim() == 3) {
    TORCH_CHECK(M.size(0) == batch && M.size(1) == N && M.size(2) == L, "selective_scan: ", name,
                " has shape ", M.sizes(), ", expected (", batch, ", ", N, ", ", L, ")");
    v.s_b = t.stride(0);
    v.s_n = t.stride(1);
    v.s_t = t.stride(2);
    v.dpg = std::max<int64_t>(dim, 1);
  } else if (M.dim() == 4) {
    const int64_t G = M.size(1);
    TORCH_CHECK(M.size(0) == batch && G >= 1 && dim % G == 0 && M.size(2) == N && M.size(3) == L,
                "selective_scan: ", name, " has shape ", M.sizes(), ", expected (", batch,
                ", groups, ", N, ", ", L, ") with groups dividing ", dim);
    v.s_b = t.stride(0);
    v.s_g = t.stride(1);
    v.s_n = t.stride(2);
    v.s_t = t.stride(3);
    v.dpg = std::max<int64_t>(dim / G, 1);
    v.groups = G;
  } else {
    TORCH_CHECK(false, "selective_scan: ", name, " must have 2, 3 or 4 dims, got ", M.dim());
  }
  return v;
}

// Converts a (batch, dim, L) input to the compute dtype, keeping a time- or channel-contiguous
// layout as it is (no copy) and copying any other.
at::Tensor seq_layout(const at::Tensor& x, at::ScalarType cdt) {
  at::Tensor t = x.to(cdt);
  const bool time_contiguous = t.size(2) <= 1 || t.stride(2) == 1;
  const bool channel_contiguous = t.size(1) <= 1 || t.stride(1) == 1;
  if (!time_contiguous && !channel_contiguous) t = t.contiguous();
  return t;
}

template <typename T>
Seq<T> make_seq(const at::Tensor& t) {
  Seq<T> s;
  s.p = t.data_ptr<T>();
  s.sb = t.stride(0);
  s.sd = t.stride(1);
  s.st = t.stride(2);
  s.rows = t.size(2) <= 1 || t.stride(2) == 1;
  if (s.rows) {
    s.st = 1;
  } else {
    s.sd = 1;
  }
  return s;
}

struct Inputs {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  at::ScalarType cdt = at::kFloat;
  at::Tensor u, delta, A, D, z, bias;
  BCView B, C;
  bool softplus = false;
};

Inputs prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
               const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
               const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
               bool softplus) {
  Inputs in;
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, d_inner, L), got ", u.sizes());
  TORCH_CHECK(!A.is_complex(), "selective_scan: complex A is not supported");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "selective_scan: A has shape ", A.sizes(),
              ", expected (", u.size(1), ", d_state)");
  // (delta undefined: selective_scan_dt, which computes it)
  TORCH_CHECK(!delta.defined() || delta.sizes() == u.sizes(), "selective_scan: delta has shape ", delta.sizes(),
              ", expected ", u.sizes());
  for (const at::Tensor* t : {&u, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan (C++ CPU kernel): all inputs must be on CPU");
  }
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.L = u.size(2);
  in.N = A.size(1);
  in.cdt = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.u = seq_layout(u, in.cdt);
  if (delta.defined()) {
    TORCH_CHECK(delta.device().is_cpu(), "selective_scan (C++ CPU kernel): all inputs must be on CPU");
    in.delta = seq_layout(delta, in.cdt);
  }
  in.A = A.to(in.cdt).contiguous();
  in.B = make_bc_view(B, in.batch, in.dim, in.N, in.L, in.cdt, "B");
  in.C = make_bc_view(C, in.batch, in.dim, in.N, in.L, in.cdt, "C");
  if (D.has_value() && D->defined()) {
    TORCH_CHECK(D->numel() == in.dim, "selective_scan: D must have d_inner = ", in.dim, " elements");
    in.D = D->to(in.cdt).contiguous().view({in.dim});
  }
  if (z.has_value() && z->defined()) {
    TORCH_CHECK(z->sizes() == u.sizes(), "selective_scan: z has shape ", z->sizes(), ", expected ",
                u.sizes());
    in.z = seq_layout(*z, in.cdt);
  }
  if (delta_bias.has_value() && delta_bias->defined()) {
    TORCH_CHECK(delta_bias->numel() == in.dim,
                "selective_scan: delta_bias must have d_inner = ", in.dim, " elements");
    in.bias = delta_bias->to(in.cdt).contiguous().view({in.dim});
  }
  in.softplus = softplus;
  return in;
}

template <typename T>
Problem<T> make_problem(const Inputs& in) {
  Problem<T> P;
  P.batch = in.batch;
  P.dim = in.dim;
  P.L = in.L;
  P.N = in.N;
  P.u = make_seq<T>(in.u);
  if (in.delta.defined()) P.delta = make_seq<T>(in.delta);
  P.A = in.A.data_ptr<T>();
  P.D = in.D.defined() ? in.D.data_ptr<T>() : nullptr;
  if (in.z.defined()) P.z = make_seq<T>(in.z);
  P.bias = in.bias.defined() ? in.bias.data_ptr<T>() : nullptr;
  P.softplus = in.softplus;
  auto set = [](typename Problem<T>::BC& dst, const BCView& v) {
    dst.p = v.t.data_ptr<T>();
    dst.s_b = v.s_b;
    dst.s_g = v.s_g;
    dst.dpg = v.dpg;
    dst.s_t = v.s_t;
    dst.s_n = v.s_n;
    dst.groups = v.groups;
    dst.variable = v.variable;
  };
  set(P.B, in.B);
  set(P.C, in.C);
  make_blocks(P);
  return P;
}

namespace {

// The z_scale / z_wscale / z_bias arguments (z the raw accumulator of in_proj's z half), checked
// and as float32 vectors; all undefined when z is the gate itself.
struct ZEpiArgs {
  at::Tensor xs, ws, bias;
  bool on() const { return xs.defined(); }
};

ZEpiArgs z_epilogue_args(const char* op, const std::optional<at::Tensor>& z, int64_t dim, int64_t L,
                         const std::optional<at::Tensor>& z_scale, const std::optional<at::Tensor>& z_wscale,
                         const std::optional<at::Tensor>& z_bias) {
  ZEpiArgs a;
  const bool has_s = z_scale.has_value() && z_scale->defined();
  const bool has_w = z_wscale.has_value() && z_wscale->defined();
  const bool has_b = z_bias.has_value() && z_bias->defined();
  if (!has_s && !has_w && !has_b) return a;
  TORCH_CHECK(has_s && has_w, op, ": z_scale and z_wscale go together (z is then the raw accumulator of the linear "
              "producing it, with its row scale and weight scales); pass both, or neither");
  TORCH_CHECK(z.has_value() && z->defined(), op, ": z_scale / z_wscale were given without z");
  for (const at::Tensor* t : {&*z_scale, &*z_wscale}) {
    TORCH_CHECK(t->device().is_cpu(), op, " (C++ CPU kernel): all inputs must be on CPU");
  }
  a.xs = z_scale->to(at::kFloat).contiguous().view({-1});
  TORCH_CHECK(a.xs.numel() == L || a.xs.numel() == 1, op, ": z_scale (the accumulator's row scale, per step of z) "
              "must have L (", L, ") or 1 values, got ", a.xs.numel());
  a.ws = z_wscale->to(at::kFloat).contiguous().view({-1});
  TORCH_CHECK(a.ws.numel() == dim, op, ": z_wscale must have d_inner = ", dim, " values, got ", a.ws.numel());
  if (has_b) {
    TORCH_CHECK(z_bias->device().is_cpu(), op, " (C++ CPU kernel): all inputs must be on CPU");
    a.bias = z_bias->to(at::kFloat).contiguous().view({-1});
    TORCH_CHECK(a.bias.numel() == dim, op, ": z_bias must have d_inner = ", dim, " values, got ", a.bias.numel());
  }
  return a;
}

// z's epilogue with ATen ops in float32, for the paths that do not apply it on load: the graph's
// operations ((acc * xs) * ws) + bias, each rounded, on z (batch, dim, L).
at::Tensor z_epilogue_aten(const at::Tensor& z, const ZEpiArgs& a) {
  at::Tensor y = (z.to(at::kFloat) * a.xs) * a.ws.view({-1, 1});
  if (a.bias.defined()) y = y + a.bias.view({-1, 1});
  return y;
}

// The kernel's view of the checked arguments (float32 scans).
ZEpilogue z_epilogue(const ZEpiArgs& a) {
  ZEpilogue e;
  e.xs = a.xs.data_ptr<float>();
  e.xs_t = a.xs.numel() == 1 ? 0 : 1;
  e.ws = a.ws.data_ptr<float>();
  e.bias = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  return e;
}

}  // namespace

at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                              const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                              bool channels_last, bool fast_decay, bool z_reverse,
                              const std::optional<at::Tensor>& z_scale, const std::optional<at::Tensor>& z_wscale,
                              const std::optional<at::Tensor>& z_bias) {
  Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  const ZEpiArgs ze = z_epilogue_args("selective_scan", z, in.dim, in.L, z_scale, z_wscale, z_bias);
  // float64 scans: the epilogue in float32 with ATen first (the graph's dtype), then the plain gate
  if (ze.on() && in.cdt != at::kFloat) in.z = seq_layout(z_epilogue_aten(*z, ze), in.cdt);
  // channels_last: (batch, dim, L) seen through a transpose of (batch, L, dim) memory, the layout
  // the transposed out_proj input of a Mamba mixer reads contiguously
  at::Tensor out = channels_last ? at::empty({in.batch, in.L, in.dim}, in.A.options()).transpose(1, 2)
                                 : at::empty({in.batch, in.dim, in.L}, in.A.options());
  if (out.numel() > 0) {
    if (in.cdt == at::kDouble) {
      auto P = make_problem<double>(in);
      P.out_cl = channels_last;
      if (P.z) P.z.reverse = z_reverse;
      forward<double>(P, out.data_ptr<double>());
    } else {
      auto P = make_problem<float>(in);
      P.out_cl = channels_last;
      P.fast_decay = fast_decay;
      if (P.z) P.z.reverse = z_reverse;
      const ZEpilogue E = ze.on() ? z_epilogue(ze) : ZEpilogue();
      if (ze.on()) P.zepi = &E;
      forward<float>(P, out.data_ptr<float>());
    }
  }
  return out.to(u.scalar_type());
}

namespace {

// The delta of selective_scan_dt with ATen ops, in float32 (for the inputs the fused tile does not
// take): the operations of dt_tile, as the graph it replaces computes them.
at::Tensor dt_delta_aten(const at::Tensor& dt_in, const at::Tensor& dt_scale, int64_t qmin, int64_t qmax,
                         const at::Tensor& w, const at::Tensor& ws, const std::optional<at::Tensor>& bias,
                         const at::Tensor& ds, const at::Tensor& dz, int64_t dqmin, int64_t dqmax) {
  const at::Tensor xs = dt_scale.to(at::kFloat);
  const at::Tensor q = at::clamp(at::round(dt_in.to(at::kFloat) / xs), qmin, qmax);
  // integer sums, exact in float64 (and then rounded to float32 as torch's int32 -> float32)
  const at::Tensor acc = at::matmul(q.to(at::kDouble), w.to(at::kDouble).t()).to(at::kFloat);
  at::Tensor y = (acc * xs) * ws.to(at::kFloat).reshape({-1});
  if (bias.has_value() && bias->defined()) y = y + bias->to(at::kFloat);
  const at::Tensor s = ds.to(at::kFloat), z = dz.to(at::kFloat);
  const at::Tensor code = at::clamp(at::round(y.transpose(1, 2) / s) + z, dqmin, dqmax);
  return (code - z) * s;
}

}  // namespace

at::Tensor selective_scan_dt_fwd(const at::Tensor& u, const at::Tensor& dt_in, const at::Tensor& dt_scale,
                                 int64_t dt_qmin, int64_t dt_qmax, const at::Tensor& dt_weight,
                                 const at::Tensor& dt_wscale, const std::optional<at::Tensor>& dt_bias,
                                 const at::Tensor& delta_scale, const at::Tensor& delta_zp, int64_t delta_qmin,
                                 int64_t delta_qmax, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                 bool channels_last, bool fast_decay, bool z_reverse,
                                 const std::optional<at::Tensor>& combine, const std::optional<at::Tensor>& code_scale,
                                 int64_t code_qmin, int64_t code_qmax, const std::optional<at::Tensor>& z_scale,
                                 const std::optional<at::Tensor>& z_wscale, const std::optional<at::Tensor>& z_bias) {
  TORCH_CHECK(u.dim() == 3, "selective_scan_dt: u must be (batch, d_inner, L), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(!z.has_value() || !z->defined() || z->sizes() == u.sizes(), "selective_scan_dt: z has shape ",
              z->sizes(), ", expected ", u.sizes());
  const ZEpiArgs ze = z_epilogue_args("selective_scan_dt", z, dim, L, z_scale, z_wscale, z_bias);
  TORCH_CHECK(dt_in.dim() == 3 && dt_in.size(0) == batch && dt_in.size(1) == L,
              "selective_scan_dt: dt_in has shape ", dt_in.sizes(), ", expected (", batch, ", ", L, ", dt_rank)");
  const int64_t R = dt_in.size(2);
  TORCH_CHECK(dt_weight.scalar_type() == at::kChar && dt_weight.dim() == 2 && dt_weight.size(0) == dim &&
                  dt_weight.size(1) == R,
              "selective_scan_dt: dt_weight must be int8 (d_inner, dt_rank) = (", dim, ", ", R, "), got ",
              dt_weight.scalar_type(), " ", dt_weight.sizes());
  TORCH_CHECK(dt_wscale.numel() == dim, "selective_scan_dt: dt_wscale must have d_inner = ", dim, " elements");
  TORCH_CHECK(!dt_bias.has_value() || !dt_bias->defined() || dt_bias->numel() == dim,
              "selective_scan_dt: dt_bias must have d_inner = ", dim, " elements");
  for (const at::Tensor* t : {&dt_in, &dt_scale, &dt_weight, &dt_wscale, &delta_scale, &delta_zp}) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan_dt (C++ CPU kernel): all inputs must be on CPU");
  }
  const bool has_combine = combine.has_value() && combine->defined();
  at::Tensor cs;  // out_proj's scale as (batch, L, 1)
  if (has_combine) {
    TORCH_CHECK(combine->sizes() == u.sizes() && combine->device().is_cpu(), "selective_scan_dt: combine (the forward "
                "scan's output) must be a CPU tensor of u's shape ", u.sizes(), ", got ", combine->sizes());
    TORCH_CHECK(code_scale.has_value() && code_scale->defined() && code_scale->device().is_cpu() &&
                    code_scale->dim() <= 3 && (code_scale->dim() == 0 || code_scale->size(-1) == 1),
                "selective_scan_dt: combine needs code_scale, out_proj's input scale broadcastable to (batch, L, 1)");
    TORCH_CHECK(-128 <= code_qmin && code_qmin < code_qmax && code_qmax <= 127, "selective_scan_dt: code range [",
                code_qmin, ", ", code_qmax, "] does not fit int8");
    cs = code_scale->to(at::kFloat).expand({batch, L, 1});
  }
  const at::Tensor xs = dt_scale.to(at::kFloat).expand({batch, L, 1});
  const at::Tensor ds = delta_scale.to(at::kFloat).expand({batch, dim, L});
  const at::Tensor dz = delta_zp.to(at::kFloat).expand({batch, dim, L});
  // The fused tile: float32 compute (float64 scans get the delta from ATen, in float32 as the graph
  // computes it), codes within int8 (every partial sum of R <= 1024 products of |q|, |w| <= 128 is
  // an integer below 2^24, exact in float32 in any order). The fused codes: float32 scan output
  // and forward output (other dtypes: ATen after the scan, in the graph's dtypes).
  const bool fused = u.scalar_type() != at::kDouble && R >= 1 && R <= 1024 && dt_qmin >= -128 && dt_qmax <= 127;
  const bool fused_codes = fused && u.scalar_type() == at::kFloat && (!has_combine || combine->scalar_type() == at::kFloat);
  if (!fused || (has_combine && !fused_codes)) {
    const at::Tensor delta = fused ? at::Tensor() : dt_delta_aten(dt_in, xs, dt_qmin, dt_qmax, dt_weight, dt_wscale,
                                                                  dt_bias, ds, dz, delta_qmin, delta_qmax);
    // (z's epilogue first, on its own steps, then the reversal)
    const std::optional<at::Tensor> ze_z = ze.on() ? std::optional<at::Tensor>(z_epilogue_aten(*z, ze)) : z;
    const std::optional<at::Tensor> zz = (z_reverse && ze_z.has_value() && ze_z->defined())
                                             ? std::optional<at::Tensor>(ze_z->flip({-1})) : ze_z;
    const at::Tensor y = fused ? selective_scan_dt_fwd(u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale,
                                                       dt_bias, delta_scale, delta_zp, delta_qmin, delta_qmax, A, B, C,
                                                       D, zz, delta_bias, delta_softplus, false, fast_decay, false,
                                                       std::nullopt, std::nullopt, code_qmin, code_qmax, std::nullopt,
                                                       std::nullopt, std::nullopt)
                               : selective_scan_fwd(u, delta.to(u.scalar_type()), A, B, C, D, zz, delta_bias,
                                                    delta_softplus, channels_last && !has_combine, fast_decay,
                                                    false, std::nullopt, std::nullopt, std::nullopt);
    if (!has_combine) return y;
    // the graph's operations: (yf + flip(y)) / 2 in their dtype, then out_proj's quantization in float32
    const at::Tensor x = ((*combine + y.flip({-1})) / 2).transpose(1, 2).to(at::kFloat);
    return at::clamp(at::round(x / cs), code_qmin, code_qmax).to(at::kChar).contiguous();
  }
  Inputs in = prepare(u, at::Tensor(), A, B, C, D, z, delta_bias, delta_softplus);
  const at::Tensor x = dt_in.to(at::kFloat);
  const at::Tensor wt = dt_weight.to(at::kFloat).t().contiguous();
  const at::Tensor ws = dt_wscale.to(at::kFloat).contiguous().view({dim});
  at::Tensor bias;
  if (dt_bias.has_value() && dt_bias->defined()) bias = dt_bias->to(at::kFloat).contiguous().view({dim});
  DtFused G;
  G.x = x.data_ptr<float>();
  G.sb = x.stride(0);
  G.st = x.stride(1);
  G.sr = x.stride(2);
  G.R = R;
  G.xs = xs.data_ptr<float>();
  G.xs_b = xs.stride(0);
  G.xs_t = xs.stride(1);
  G.qmin = static_cast<float>(dt_qmin);
  G.qmax = static_cast<float>(dt_qmax);
  G.wt = wt.data_ptr<float>();
  G.ws = ws.data_ptr<float>();
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  // the weight codes as words of 4 codes of a channel, (R4 / 4, dim), and each channel's sum
  const int64_t R4 = (R + 3) / 4 * 4;
  at::Tensor wpad = at::zeros({dim, R4}, dt_weight.options().dtype(at::kChar));
  wpad.narrow(1, 0, R).copy_(dt_weight);
  const at::Tensor wg = wpad.view(at::kInt).t().contiguous();
  const at::Tensor wsum = dt_weight.to(at::kInt).sum(1, false, at::kInt).contiguous();
  G.wg = wg.data_ptr<int32_t>();
  G.wsum = wsum.data_ptr<int32_t>();
  G.R4 = R4;
#endif
  G.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  G.ds = ds.data_ptr<float>();
  G.ds_b = ds.stride(0);
  G.ds_d = ds.stride(1);
  G.ds_t = ds.stride(2);
  G.dz = dz.data_ptr<float>();
  G.dz_b = dz.stride(0);
  G.dz_d = dz.stride(1);
  G.dz_t = dz.stride(2);
  G.dqmin = static_cast<float>(delta_qmin);
  G.dqmax = static_cast<float>(delta_qmax);
  CombineOut M;
  at::Tensor yf, codes;
  if (has_combine) {
    yf = seq_layout(*combine, at::kFloat);
    M.yf = make_seq<float>(yf);
    M.xs = cs.data_ptr<float>();
    M.xs_b = cs.stride(0);
    M.xs_t = cs.stride(1);
    M.qmin = static_cast<float>(code_qmin);
    M.qmax = static_cast<float>(code_qmax);
    codes = at::empty({in.batch, in.L, in.dim}, u.options().dtype(at::kChar));
    M.codes = codes.data_ptr<int8_t>();
  }
  at::Tensor out = has_combine ? at::Tensor()
                   : channels_last ? at::empty({in.batch, in.L, in.dim}, in.A.options()).transpose(1, 2)
                                   : at::empty({in.batch, in.dim, in.L}, in.A.options());
  if (in.batch * in.dim * in.L > 0) {
    auto P = make_problem<float>(in);
    P.out_cl = channels_last;
    P.fast_decay = fast_decay;
    P.dt = &G;
    if (P.z) P.z.reverse = z_reverse;
    if (has_combine) P.combine = &M;
    const ZEpilogue E = ze.on() ? z_epilogue(ze) : ZEpilogue();
    if (ze.on()) P.zepi = &E;
    forward<float>(P, has_combine ? nullptr : out.data_ptr<float>());
  }
  return has_combine ? codes : out.to(u.scalar_type());
}

// out[i] = sum over b of part[b, i] for a (batch, n) partial, in one serial pass (these are
// small; a separate parallel torch op per reduction costs more than the sum on a busy machine).
template <typename T>
void sum_rows(const at::Tensor& part, at::Tensor& out) {
  const int64_t rows = part.size(0), n = out.numel();
  const T* p = part.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) o[i] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] += row[i];
  }
}

at::Tensor sum_over_batch(const at::Tensor& part, at::IntArrayRef out_size) {
  at::Tensor out = at::empty(out_size, part.options());
  if (part.scalar_type() == at::kDouble) {
    sum_rows<double>(part, out);
  } else {
    sum_rows<float>(part, out);
  }
  return out;
}

// The gradient of B / C in its own shape (contiguous), from the kernel's partials:
// variable (batch, K, G, N, L) summed over K; constant (batch, dim, N) summed over the batch.
at::Tensor finish_bc_grad(const at::Tensor& part, const BCView& v, const at::Tensor& M) {
  at::Tensor g;
  if (!v.variable) {
    g = sum_over_batch(part, M.sizes());
  } else {
    g = (part.size(1) == 1 ? part.select(1, 0) : part.sum(1)).view(M.sizes());
  }
  return g.to(M.scalar_type()).contiguous();
}

std::vector<c10::optional<at::Tensor>> selective_scan_bwd(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
    bool delta_softplus) {
  Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  TORCH_CHECK(dout.sizes() == u.sizes(), "selective_scan_bwd: dout has shape ", dout.sizes(),
              ", expected ", u.sizes());
  const at::Tensor dout_c = seq_layout(dout, in.cdt);
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const auto opts = in.A.options();

  // The kernel writes every element of the per-row outputs and zeroes the variable dB / dC
  // buffers it accumulates into, so nothing needs a zero fill. With nothing to compute, every
  // gradient is zero.
  const bool runs = batch * dim > 0 && L > 0;
  auto alloc = [&](std::vector<int64_t> size) {
    return runs ? at::empty(size, opts) : at::zeros(size, opts);
  };
  at::Tensor du = alloc({batch, dim, L});
  at::Tensor ddelta = alloc({batch, dim, L});
  at::Tensor dz = in.z.defined() ? alloc({batch, dim, L}) : at::Tensor();
  at::Tensor dA_part = alloc({batch, dim, N});
  at::Tensor dD_part = alloc({batch, dim});
  at::Tensor dbias_part = alloc({batch, dim});
  at::Tensor dB_part, dC_part;

  auto run = [&](auto tag) {
    using T = decltype(tag);
    Problem<T> P = make_problem<T>(in);
    // Runs of blocks per batch element: one, unless the batch alone gives fewer than
    // kBackwardTasks tasks (enough to keep 16 threads busy). Each run sums into its own partial
    // dB / dC buffer and the buffers are added in a fixed order afterwards, so K follows from the
    // problem alone, never from the thread count: the gradients have the same bits on any number
    // of threads.
    constexpr int64_t kBackwardTasks = 32;
    const int64_t nb = static_cast<int64_t>(P.starts.size()) - 1;
    int64_t K = 1;
    if (batch > 0 && batch < kBackwardTasks) {
      K = std::max<int64_t>(1, std::min<int64_t>(nb, (kBackwardTasks + batch - 1) / batch));
    }
    dB_part = in.B.variable ? alloc({batch, K, in.B.groups, N, L}) : alloc({batch, dim, N});
    dC_part = in.C.variable ? alloc({batch, K, in.C.groups, N, L}) : alloc({batch, dim, N});
    if (!runs) return;
    GradPtrs<T> g;
    g.du = du.data_ptr<T>();
    g.ddelta = ddelta.data_ptr<T>();
    g.dz = dz.defined() ? dz.data_ptr<T>() : nullptr;
    g.dA_part = dA_part.data_ptr<T>();
    g.dD_part = dD_part.data_ptr<T>();
    g.dbias_part = dbias_part.data_ptr<T>();
    g.dB_part = dB_part.data_ptr<T>();
    g.dC_part = dC_part.data_ptr<T>();
    g.K = K;
    backward<T>(P, make_seq<T>(dout_c), g);
  };
  if (in.cdt == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }

  std::vector<c10::optional<at::Tensor>> res(8);
  res[0] = du.to(u.scalar_type());
  res[1] = ddelta.to(delta.scalar_type());
  res[2] = sum_over_batch(dA_part, {dim, N}).to(A.scalar_type());
  res[3] = finish_bc_grad(dB_part, in.B, B);
  res[4] = finish_bc_grad(dC_part, in.C, C);
  if (in.D.defined()) res[5] = sum_over_batch(dD_part, D->sizes()).to(D->scalar_type());
  if (in.z.defined()) res[6] = dz.to(z->scalar_type());
  if (in.bias.defined()) res[7] = sum_over_batch(dbias_part, delta_bias->sizes()).to(delta_bias->scalar_type());
  return res;
}

}  // namespace ouromamba_scan
