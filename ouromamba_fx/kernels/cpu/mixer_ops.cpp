// CPU kernels for the parts of a quantized Mamba mixer around its GEMMs and its scan:
//
// conv_silu       depthwise causal conv1d + SiLU, with the fake quantization of its input fused
//                 in (one pass over memory instead of quantize -> conv -> slice -> SiLU), reading
//                 the input where it lies (a channel-contiguous slice of in_proj's output, no
//                 transposed copy), optionally in reverse time order (the backward direction of
//                 a bidirectional Vim block: conv(flip(x)) without materialising flip(x)), and
//                 writing channel-contiguous output, the layout x_proj and the scan read fastest;
//                 optionally also x_proj's int8 input codes, quantized from that very output
//                 while its row is in L1 (the compiled graph's quantize pass over it then goes).
// mixed_quant     OuroMamba-Quant's mixed-precision activation quantization in one pass per
//                 sample: per time-step |x| statistics over channels (mean, population std, max),
//                 the outlier rule with its window of n_refresh steps, then the int8 codes of the
//                 inliers (static per-step scale) and of the outliers (dynamic per-token scale),
//                 or their dequantized values (fake quantization).
// w4a4o8_epilogue the W4A4O8 linear's epilogue over the int32 inlier accumulator, with each
//                 token's few outlier channels added as rows of the weights (exact integer sums, two
//                 channels per vpmaddubsw on AVX2) instead of a GEMM.
// w4a4o8_finish   the same epilogue with the outlier term from a dense GEMM of the outlier codes
//                 (CPUs with AMX, where that GEMM costs less than the tiles at many outliers per row).
// u4_mm           the inlier GEMM itself on AVX2 CPUs without VNNI/AMX: 4-bit codes x int4
//                 weights, exact, with int16 accumulation (u4_pack lays the weights out for it).
// u4_linear       u4_mm and the epilogue, a block of rows at a time, so that the epilogue reads
//                 the int32 products from L2 rather than memory (4-6% off in_proj and out_proj).
// s16_mm          W8A8's 8-bit x 8-bit GEMMs on the same CPUs: int16 pairs through vpmaddwd into
//                 int32, exact (s16_pack lays the weights out for it).
//
// Semantics: ouromamba_fx/lowering/mixer.py (module docstring). Both kernels compute in float32;
// quantization divides by the scale (as ouromamba::quantize does) and rounds half to even, so
// codes equal the reference's except where float rounding elsewhere moves a value across a
// rounding boundary or an outlier threshold.

#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "om_parallel.h"
#include "om_vec.h"

namespace ouromamba_mixer {

// conv_silu works at the CPU's own vector width (one register: the ring of rows and the taps
// stay in registers; GCC moves 64-byte vectors through the stack without AVX-512).
using VF = ouromamba_vec::VecF<ouromamba_vec::kNativeBytes>;
using V = VF::V;
constexpr int W = VF::W;

// Loads / stores of nl <= W lanes; full vectors (the common case) are single instructions (a
// memcpy of constant size), partial ones a library call.
inline V load(const float* p, int nl) {
  V v;
  if (nl == W) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    v = VF::splat(0.0f);
    std::memcpy(&v, p, sizeof(float) * nl);
  }
  return v;
}

inline void store(float* p, V v, int nl) {
  if (nl == W) {
    std::memcpy(p, &v, sizeof(V));
  } else {
    std::memcpy(p, &v, sizeof(float) * nl);
  }
}

// Asks for the C floats at x (a row read next) to be brought into the cache.
inline void prefetch_row(const float* x, int64_t C) {
  for (int64_t c = 0; c < C; c += 16) __builtin_prefetch(x + c);
}

// a * b + c rounded once, lane by lane.
// (One branch per vector width, chosen by the preprocessor: V is not a template parameter here, so
// a discarded `if constexpr` branch is still compiled, and a 256-bit cast of a 512-bit V does not.)
inline V vfma(V a, V b, V c) {
#if defined(__AVX512F__)
  static_assert(W == 16, "AVX-512 builds use 64-byte vectors");
  return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && defined(__AVX__)
  static_assert(W == 8, "AVX2 builds use 32-byte vectors");
  return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  V r;
  for (int l = 0; l < W; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}

// Round half to even, exact for |x| < 2^22 (callers clamp to the integer range first).
inline V round_even(V x) { return (x + VF::kMagic) - VF::kMagic; }

inline V clamp(V x, float lo, float hi) { return VF::vmin(VF::splat(hi), VF::vmax(VF::splat(lo), x)); }  // NaN stays NaN

// The same on one float, for plain loops the compiler vectorizes (vminps / vmaxps argument order
// kept, so NaN stays NaN as above; magic-number rounding needs no -ffast-math).
inline float round_even1(float x) { return (x + VF::kMagic) - VF::kMagic; }
inline float clamp1(float x, float lo, float hi) {
  const float a = lo > x ? lo : x;
  return hi < a ? hi : a;
}
inline float keep1(float v, int32_t m) {  // v where m is -1, +0 where m is 0
  int32_t i;
  std::memcpy(&i, &v, sizeof(i));
  i &= m;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}
inline float pick1(float a, float b, int32_t m) {  // a where m is -1, b where m is 0
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof(ia));
  std::memcpy(&ib, &b, sizeof(ib));
  ia = (ia & m) | (ib & ~m);
  std::memcpy(&a, &ia, sizeof(a));
  return a;
}

// ---------------------------------------------------------------------------------------------
// conv_silu

// One output channel block of a row: bias[c] + sum_k w[k, c] * taps[k][c] for the nl <= W lanes
// of block j (contracted into multiply-adds, as GCC does for `acc += w * tap`).
template <int kK>
inline V conv_block(const V* const* taps, int64_t K, const float* __restrict__ w, const float* __restrict__ bias,
                    int64_t D, int64_t j, int nl) {
  if constexpr (kK > 0) K = kK;
  V acc = bias ? load(bias + j * W, nl) : VF::splat(0.0f);
  for (int64_t k = 0; k < K; ++k) acc += load(w + k * D + j * W, nl) * taps[k][j];
  return acc;
}

// One output row: dst[c] = silu(bias[c] + sum_k w[k, c] * taps[k][c]) for the D channels, in one
// pass: four blocks' sums stay in registers for their SiLU (VF::exp_k: four exp / divide chains
// side by side) and are stored once, a vector at a time (GCC copies a memcpy of a whole array of
// vectors through the stack in 16-byte pieces, which the vector loads after it cannot take
// straight from the store buffer). A plain function of locals: written inside the threads'
// lambda, with the captures read through references, GCC reloads the bounds every vector and
// keeps each vector's exp / divide chain from overlapping the next one's.
// kK > 0: the kernel width as a constant (4 in every Mamba), so the taps' loop unrolls with its
// pointers in registers; 0: K at run time.
template <int kK>
inline void conv_silu_row(float* __restrict__ dst, const V* const* taps, int64_t K, const float* __restrict__ w,
                          const float* __restrict__ bias, int64_t D) {
  const int64_t nb = (D + W - 1) / W, nv = D / W;
  int64_t j = 0;
  for (; j + 4 <= nv; j += 4) {
    V v[4], m[4], e[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      v[k] = conv_block<kK>(taps, K, w, bias, D, j + k, W);
      m[k] = -v[k];
    }
    VF::exp_k<4>(m, e);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      v[k] = v[k] / (1.0f + e[k]);
      std::memcpy(dst + (j + k) * W, &v[k], sizeof(V));
    }
  }
  for (; j < nb; ++j) {
    const int nl = j < nv ? W : static_cast<int>(D - j * W);
    const V v = conv_block<kK>(taps, K, w, bias, D, j, nl);
    store(dst + j * W, v / (1.0f + VF::exp(-v)), nl);
  }
}

// The epilogue of the linear producing the conv's input (in_proj), applied to one row of its raw
// accumulator as it is loaded: row[c] = ((acc[c] * xs) * ws[c]) + bias[c], in that order and
// without contracting the last product and the addition (the graph's separate epilogue rounds
// each operation), so the same floats as the linear's output. Rows are whole vectors; the tail
// lanes past D (zero accumulators, zero weight scales) stay 0.
inline void epilogue_row(V* __restrict__ row, const float* __restrict__ src, int64_t D, float xs,
                         const float* __restrict__ ws, const float* __restrict__ bias) {
  const int64_t nb = (D + W - 1) / W, nv = D / W;
  const V vxs = VF::splat(xs);
  for (int64_t j = 0; j < nb; ++j) {
    const int nl = j < nv ? W : static_cast<int>(D - j * W);
    row[j] = (load(src + j * W, nl) * vxs) * load(ws + j * W, nl);
  }
  if (bias) {
    OM_NO_CONTRACT();
    for (int64_t j = 0; j < nb; ++j) {
      const int nl = j < nv ? W : static_cast<int>(D - j * W);
      row[j] = row[j] + load(bias + j * W, nl);
    }
  }
}

// One input row of the conv into the ring, fake-quantized (round(clamp(x / s, lo, hi)) * s) when
// fq; with ews, src is the linear's accumulator and epilogue_row first makes it the linear's
// output (in the ring, then quantized there). A plain function of locals for the same reason as
// conv_silu_row (as a lambda over the captures it took about a third of the conv's time).
inline void conv_input_row(V* __restrict__ row, const float* __restrict__ src, int64_t D, bool fq, float s, float lo,
                           float hi, float exs, const float* __restrict__ ews, const float* __restrict__ eb) {
  const int64_t nv = D / W;
  if (ews) {
    epilogue_row(row, src, D, exs, ews, eb);
    if (fq) {
      for (int64_t j = 0; j < (D + W - 1) / W; ++j) row[j] = round_even(clamp(row[j] / s, lo, hi)) * s;
    }
    return;
  }
  if (fq) {
    for (int64_t j = 0; j < nv; ++j) {
      V v;
      std::memcpy(&v, src + j * W, sizeof(V));
      row[j] = round_even(clamp(v / s, lo, hi)) * s;
    }
  } else {
    for (int64_t j = 0; j < nv; ++j) std::memcpy(&row[j], src + j * W, sizeof(V));
  }
  if (nv * W < D) {
    const int nl = static_cast<int>(D - nv * W);
    V v = load(src + nv * W, nl);
    if (fq) v = round_even(clamp(v / s, lo, hi)) * s;
    row[nv] = v;
  }
}

// The int8 codes of one output row: q[c] = clamp(round_half_even(y[c] / s), lo, hi), computed
// (as clamp-then-round, the same integers for integer bounds) with a true division, as the
// graph's quantize divides: the same bits as quantizing the stored output afterwards. A plain
// loop the compiler vectorizes (vdivps, the magic-number rounding, a narrowing store). A NaN y
// gives an unspecified code (the graph's cast of a NaN to int8 is undefined too).
inline void codes_row(int8_t* __restrict__ q, const float* __restrict__ y, int64_t D, float s, float lo, float hi) {
  for (int64_t c = 0; c < D; ++c) {
    q[c] = static_cast<int8_t>(static_cast<int32_t>(round_even1(clamp1(y[c] / s, lo, hi))));
  }
}

namespace {

// conv_silu and conv_silu_codes: x: (B, D, L) float32 with channel stride 1; w: (K, D) (the conv
// weight transposed); bias (D,) or empty; scale / zp: (L,) or (1,) float32, or empty (no input
// quantization); code_scale: (L,) or (1,) float32 (with codes (B, L, D) int8 to fill) or empty;
// in_scale: empty, or x is the raw accumulator of the linear producing it, whose epilogue
// ((x * in_scale[t]) * in_wscale[c]) + in_bias[c] is applied as rows are loaded (in_scale (L,) or
// (1,), indexed by x's own time step, before any reversal; in_wscale (D,); in_bias (D,) or empty).
// Returns (B, L, D).
torch::Tensor conv_silu_impl(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias,
                             const torch::Tensor& scale, const torch::Tensor& zp, int64_t qmin, int64_t qmax,
                             bool reverse, const torch::Tensor& code_scale, int64_t code_qmin, int64_t code_qmax,
                             torch::Tensor* codes, const torch::Tensor& in_scale, const torch::Tensor& in_wscale,
                             const torch::Tensor& in_bias) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat && x.stride(1) == 1,
              "conv_silu: x must be float32 (B, D, L) with channel stride 1");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "conv_silu: w must be (K, D)");
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), K = w.size(0);
  TORCH_CHECK(K >= 1 && K <= 16, "conv_silu: kernel width must be in [1, 16]");
  const bool fq = scale.defined() && scale.numel() > 0;
  if (fq) {
    TORCH_CHECK(scale.is_contiguous() && zp.is_contiguous() && (scale.numel() == L || scale.numel() == 1) &&
                    zp.numel() == scale.numel(),
                "conv_silu: scale / zero point must have L or 1 values");
  }
  const bool epi = in_scale.defined() && in_scale.numel() > 0;
  if (epi) {
    TORCH_CHECK(in_scale.scalar_type() == torch::kFloat && in_scale.is_contiguous() &&
                    (in_scale.numel() == L || in_scale.numel() == 1),
                "conv_silu: the accumulator's row scale must be float32 with L (", L, ") or 1 values, got ",
                in_scale.numel());
    TORCH_CHECK(in_wscale.scalar_type() == torch::kFloat && in_wscale.is_contiguous() && in_wscale.numel() == D,
                "conv_silu: the accumulator's weight scale must be float32 with D (", D, ") values");
    TORCH_CHECK(!in_bias.defined() || in_bias.numel() == 0 ||
                    (in_bias.scalar_type() == torch::kFloat && in_bias.is_contiguous() && in_bias.numel() == D),
                "conv_silu: the accumulator's bias must be float32 with D (", D, ") values");
  }
  const float* exsp = epi ? in_scale.data_ptr<float>() : nullptr;
  const bool e_per_step = epi && in_scale.numel() == L;
  const float* ewsp = epi ? in_wscale.data_ptr<float>() : nullptr;
  const float* ebp = epi && in_bias.defined() && in_bias.numel() ? in_bias.data_ptr<float>() : nullptr;
  const bool emit = codes != nullptr;
  if (emit) {
    TORCH_CHECK(code_scale.scalar_type() == torch::kFloat && code_scale.is_contiguous() &&
                    (code_scale.numel() == L || code_scale.numel() == 1),
                "conv_silu_codes: the codes' scale must be float32 with L (", L, ") or 1 values, got ",
                code_scale.numel());
    TORCH_CHECK(-128 <= code_qmin && code_qmin <= code_qmax && code_qmax <= 127,
                "conv_silu_codes: the codes' range [", code_qmin, ", ", code_qmax, "] must lie in [-128, 127]");
    *codes = torch::empty({B, L, D}, x.options().dtype(torch::kChar));
  }
  const float* csp = emit ? code_scale.data_ptr<float>() : nullptr;
  const bool code_per_step = emit && code_scale.numel() == L;
  int8_t* cp = emit ? codes->data_ptr<int8_t>() : nullptr;
  const float clo = static_cast<float>(code_qmin), chi = static_cast<float>(code_qmax);
  auto out = torch::empty({B, L, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* sp = fq ? scale.data_ptr<float>() : nullptr;
  const float* zpp = fq ? zp.data_ptr<float>() : nullptr;
  const bool per_step = fq && scale.numel() == L;
  float* op = out.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(2);
  // Work items: (batch element, chunk of time steps). Inside an item the loop runs over time
  // steps and, for each, over all channels: every row read and written is contiguous, and the
  // K - 1 previous quantized rows wait in a small per-thread ring (K * D floats). An item starts
  // by quantizing the K - 1 rows before its chunk again (cheap next to the chunk).
  const int64_t chunk = 32;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int64_t nb = (D + W - 1) / W;
  ouromamba_parallel::parallel_items(B * nchunks, 1, [&](ouromamba_parallel::Items& items) {
    std::vector<V> ring(static_cast<size_t>(K * nb));
    auto quantized_row = [&](int64_t b, int64_t t, V* row) {
      const int64_t ts = reverse ? L - 1 - t : t;  // x's own time step
      const float* src = xp + b * sb + ts * st;
      float s = 1.0f, lo = 0.0f, hi = 0.0f;
      if (fq) {
        s = sp[per_step ? t : 0];
        const float z = zpp[per_step ? t : 0];
        lo = float(qmin) - z;
        hi = float(qmax) - z;
      }
      conv_input_row(row, src, D, fq, s, lo, hi, epi ? exsp[e_per_step ? ts : 0] : 1.0f, ewsp, ebp);
    };
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / nchunks, t0 = (i % nchunks) * chunk, t1 = std::min(L, t0 + chunk);
        for (int64_t t = t0 - (K - 1); t < t0; ++t) {
          V* row = ring.data() + ((t + K) % K) * nb;
          if (t < 0) {
            for (int64_t j = 0; j < nb; ++j) row[j] = VF::splat(0.0f);
          } else {
            quantized_row(b, t, row);
          }
        }
        for (int64_t t = t0; t < t1; ++t) {
          // the next step's input row (x's rows are strided: in_proj's output holds z beside them)
          if (t + 1 < t1) prefetch_row(xp + b * sb + (reverse ? L - 2 - t : t + 1) * st, D);
          quantized_row(b, t, ring.data() + (t % K) * nb);
          const V* taps[16];  // taps[k]: the quantized row K - 1 - k steps back
          for (int64_t k = 0; k < K; ++k) taps[k] = ring.data() + ((t - (K - 1) + k + K) % K) * nb;
          float* dst = op + (b * L + t) * D;
          if (K == 4)
            conv_silu_row<4>(dst, taps, K, wp, bp, D);
          else
            conv_silu_row<0>(dst, taps, K, wp, bp, D);
          if (emit) codes_row(cp + (b * L + t) * D, dst, D, csp[code_per_step ? t : 0], clo, chi);
        }
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor conv_silu(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor scale,
                        torch::Tensor zp, int64_t qmin, int64_t qmax, bool reverse, torch::Tensor in_scale,
                        torch::Tensor in_wscale, torch::Tensor in_bias) {
  return conv_silu_impl(x, w, bias, scale, zp, qmin, qmax, reverse, torch::Tensor(), 0, 0, nullptr, in_scale,
                        in_wscale, in_bias);
}

std::vector<torch::Tensor> conv_silu_codes(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor scale,
                                           torch::Tensor zp, int64_t qmin, int64_t qmax, bool reverse,
                                           torch::Tensor code_scale, int64_t code_qmin, int64_t code_qmax,
                                           torch::Tensor in_scale, torch::Tensor in_wscale, torch::Tensor in_bias) {
  torch::Tensor codes;
  torch::Tensor y = conv_silu_impl(x, w, bias, scale, zp, qmin, qmax, reverse, code_scale, code_qmin, code_qmax,
                                   &codes, in_scale, in_wscale, in_bias);
  return {y, codes};
}

// ---------------------------------------------------------------------------------------------
// mixed_quant

// |x| statistics over one time step's channels: mean, population std (two passes), max. Each
// pass keeps four vector accumulators (a single one made the loop wait on the add's latency, and
// the first pass on the row's cache misses, which the next row's prefetch below hides); the tail
// of fewer than W channels is added lane by lane. A NaN |x| is skipped by the max.
struct RowStats {
  float mean, std, amax;
};
inline float lane_sum(V v) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}
// The largest lane, or 0 (the lanes hold values >= 0, or NaN, which is skipped): a tree of
// vmaxps on AVX-512 (a chain of W dependent compares otherwise, about 60 cycles per row twice per
// time step, which short rows feel); max is exact in any order, so the same value either way.
inline float lane_max(V v) {
#if defined(__AVX512F__)
  static_assert(W == 16, "AVX-512 builds use 64-byte vectors");
  const __m512 x = reinterpret_cast<__m512>(v);
  const __m512 no_nan = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x);
  const float m = _mm512_reduce_max_ps(no_nan);
  return m > 0.0f ? m : 0.0f;
#else
  float m = 0.0f;
  for (int l = 0; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}
inline RowStats row_stats(const float* __restrict__ x, int64_t C) {
  const int64_t nv = C / W, n4 = nv / 4 * 4;
  V s0 = VF::splat(0.0f), s1 = s0, s2 = s0, s3 = s0, m0 = s0, m1 = s0, m2 = s0, m3 = s0;
  for (int64_t j = 0; j < n4; j += 4) {
    const V a0 = VF::abs(load(x + j * W, W)), a1 = VF::abs(load(x + (j + 1) * W, W));
    const V a2 = VF::abs(load(x + (j + 2) * W, W)), a3 = VF::abs(load(x + (j + 3) * W, W));
    s0 += a0, s1 += a1, s2 += a2, s3 += a3;
    m0 = VF::vmax(a0, m0), m1 = VF::vmax(a1, m1), m2 = VF::vmax(a2, m2), m3 = VF::vmax(a3, m3);
  }
  for (int64_t j = n4; j < nv; ++j) {
    const V a = VF::abs(load(x + j * W, W));
    s0 += a;
    m0 = VF::vmax(a, m0);
  }
  float sum = lane_sum((s0 + s1) + (s2 + s3));
  float amax = lane_max(VF::vmax(VF::vmax(m0, m1), VF::vmax(m2, m3)));
  for (int64_t c = nv * W; c < C; ++c) {
    const float a = std::fabs(x[c]);
    sum += a;
    amax = a > amax ? a : amax;
  }
  const float mean = sum / static_cast<float>(C);
  const V mv = VF::splat(mean);
  V q0 = VF::splat(0.0f), q1 = q0, q2 = q0, q3 = q0;
  for (int64_t j = 0; j < n4; j += 4) {
    const V d0 = VF::abs(load(x + j * W, W)) - mv, d1 = VF::abs(load(x + (j + 1) * W, W)) - mv;
    const V d2 = VF::abs(load(x + (j + 2) * W, W)) - mv, d3 = VF::abs(load(x + (j + 3) * W, W)) - mv;
    q0 += d0 * d0, q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3;
  }
  for (int64_t j = n4; j < nv; ++j) {
    const V d = VF::abs(load(x + j * W, W)) - mv;
    q0 += d * d;
  }
  float ss = lane_sum((q0 + q1) + (q2 + q3));
  for (int64_t c = nv * W; c < C; ++c) {
    const float d = std::fabs(x[c]) - mean;
    ss += d * d;
  }
  return {mean, std::sqrt(ss / static_cast<float>(C)), amax};
}

// The outlier rule's flags of this step and what the codes need, in one pass: when trigger,
// mask[c] |= -1 where |x[c]| > theta (else the window's mask as it is); returns the max |x| over
// the flagged channels (0 if none; a NaN |x| is skipped) and sets any if a channel is flagged.
// Four vector accumulators, like row_stats.
inline float flag_and_max(const float* __restrict__ x, int32_t* __restrict__ mask, int64_t C, bool trigger,
                          float theta, bool& any) {
  using I = VF::I;
  const int64_t nv = C / W;
  const V th = VF::splat(theta);
  const I on = I{} + (trigger ? -1 : 0);
  V m[4] = {VF::splat(0.0f), VF::splat(0.0f), VF::splat(0.0f), VF::splat(0.0f)};
  I fl[4] = {I{}, I{}, I{}, I{}};
  auto step = [&](int64_t j, V& mj, I& fj) {
    const V a = VF::abs(load(x + j * W, W));
    I f;
    std::memcpy(&f, mask + j * W, sizeof(I));
    f |= on & VF::gt(a, th);
    std::memcpy(mask + j * W, &f, sizeof(I));
    mj = VF::vmax((V)((I)a & f), mj);
    fj |= f;
  };
  int64_t j = 0;
  for (; j + 4 <= nv; j += 4) {
    for (int u = 0; u < 4; ++u) step(j + u, m[u], fl[u]);
  }
  for (; j < nv; ++j) step(j, m[0], fl[0]);
  float mx = lane_max(VF::vmax(VF::vmax(m[0], m[1]), VF::vmax(m[2], m[3])));
  const I fa = (fl[0] | fl[1]) | (fl[2] | fl[3]);
  int32_t flags = 0;
  for (int l = 0; l < W; ++l) flags |= fa[l];
  for (int64_t c = nv * W; c < C; ++c) {
    const float av = std::fabs(x[c]);
    const int32_t f = mask[c] | ((trigger ? -1 : 0) & -static_cast<int32_t>(av > theta));
    mask[c] = f;
    const float k = keep1(av, f);
    mx = k > mx ? k : mx;
    flags |= f;
  }
  any = flags != 0;
  return mx;
}

// The per-channel quantization of one time step, as plain loops in functions of their own (with
// restrict pointers and values, not a lambda's captures, which an int8 store may alias): the
// compiler vectorizes them at the CPU's own width.
// codes: round(clamp(x / s, -qmax, qmax)) of the channels in (outliers) or out of the mask, plus
// offset, as int8 bits (offset 128: the u8 codes oneDNN's u8 x s8 GEMM reads). Not inlined: inlined with constant arguments GCC 12 left the clamps as branches.
__attribute__((noinline)) void codes_row(const float* __restrict__ x, const int32_t* __restrict__ mask,
                                         int8_t* __restrict__ q, int64_t C, float s, float qmax, bool outliers,
                                         int32_t offset) {
  const int32_t flip = outliers ? 0 : -1;
  for (int64_t c = 0; c < C; ++c) {
    const int32_t code = static_cast<int32_t>(round_even1(clamp1(keep1(x[c], mask[c] ^ flip) / s, -qmax, qmax)));
    q[c] = static_cast<int8_t>(code + offset);
  }
}

// Both codes of a step with outliers in one pass, one division per channel (the divisor and the
// bound chosen per lane): qin = codes of the inliers (+ offset; offset alone on outlier channels),
// qout = codes of the outliers (0 elsewhere). The same numbers as codes_row for each.
__attribute__((noinline)) void codes_both(const float* __restrict__ x, const int32_t* __restrict__ mask,
                                          int8_t* __restrict__ qin, int8_t* __restrict__ qout, int64_t C, float s,
                                          float qi, float so, float qo, int32_t offset) {
  for (int64_t c = 0; c < C; ++c) {
    const int32_t m = mask[c];
    const float lim = pick1(qo, qi, m);
    const int32_t code = static_cast<int32_t>(round_even1(clamp1(x[c] / pick1(so, s, m), -lim, lim)));
    qin[c] = static_cast<int8_t>((code & ~m) + offset);
    qout[c] = static_cast<int8_t>(code & m);
  }
}

// fake quantization: outliers at qmax qo with scale so, the rest at qi with scale s, one
// division per channel (the divisor and the bound chosen per lane, as in codes_both; qo is an
// argument, not the constant 127: with constant bounds GCC 12 kept the clamps as branches).
__attribute__((noinline)) void fake_row(const float* __restrict__ x, const int32_t* __restrict__ mask,
                                        float* __restrict__ y, int64_t C, float s, float qi, float so, float qo) {
  for (int64_t c = 0; c < C; ++c) {
    const int32_t m = mask[c];
    const float d = pick1(so, s, m), lim = pick1(qo, qi, m);
    y[c] = round_even1(clamp1(x[c] / d, -lim, lim)) * d;
  }
}


// One time step t of the outlier rule on its row src: the |x| statistics, the window's mask
// (cleared at the window's first step, then OR-ed with this step's flags when its max would clip
// at the inlier scale s), and the outliers' per-token scale, returned; any: a channel is flagged.
inline float rule_step(const float* __restrict__ src, int32_t* __restrict__ mask, int64_t C, int64_t t, float s,
                       float qif, float kf, int64_t n_refresh, bool& any) {
  const RowStats stats = row_stats(src, C);
  const float theta = stats.mean + kf * stats.std;
  const bool trigger = stats.amax / qif > s;
  if (n_refresh <= 1 || t % n_refresh == 0) std::fill(mask, mask + C, 0);
  const float omax = flag_and_max(src, mask, C, trigger, theta, any);
  return std::max(omax / 127.0f, 1e-8f);
}

// Time steps per work item of the outlier rule's kernels: whole windows of n_refresh steps (the
// mask is reset at each window's first step, so items are independent), at least 16.
inline int64_t rule_chunk(int64_t n_refresh) {
  const int64_t window = std::max<int64_t>(n_refresh, 1);
  return window * ((16 + window - 1) / window);
}

// x: (R, L, C) float32, any strides (channel-contiguous is the fast path); s_in: (L,) float32 (the
// static inlier scale of each time step); qi: inlier qmax (7 for 4 bits); k, n_refresh: the outlier
// rule. Integer mode returns [q_in (R, L, C) int8, q_out (R, L, C) int8, s_out (R, L) float32]
// (with in_offset > 0, q_in is uint8 holding the codes + in_offset: 128 for oneDNN's u8 x s8
// GEMM, 8 for u4_mm below); fake mode returns [y (R, L, C)
// float32], the dequantized values (outliers at 8 bits with their per-token scale, inliers at qi).
std::vector<torch::Tensor> mixed_quant(torch::Tensor x, torch::Tensor s_in, int64_t qi, double k,
                                       int64_t n_refresh, bool fake, int64_t in_offset) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat, "mixed_quant: x must be float32 (R, L, C)");
  const int64_t R = x.size(0), L = x.size(1), C = x.size(2);
  TORCH_CHECK(s_in.scalar_type() == torch::kFloat && s_in.is_contiguous() && s_in.numel() == L,
              "mixed_quant: s_in must be float32 with one value per time step");
  const int64_t sr = x.stride(0), st = x.stride(1), sc = x.stride(2);
  auto f_opts = x.options();
  auto i_opts = x.options().dtype(torch::kInt8);
  torch::Tensor q_in, q_out, s_out, y;
  if (fake) {
    y = torch::empty({R, L, C}, f_opts);
  } else {
    q_in = torch::empty({R, L, C}, i_opts);
    q_out = torch::empty({R, L, C}, i_opts);
    s_out = torch::empty({R, L}, f_opts);
  }
  const float* xp = x.data_ptr<float>();
  const float* sp = s_in.data_ptr<float>();
  const float kf = static_cast<float>(k);
  const float qif = static_cast<float>(qi);
  TORCH_CHECK(in_offset >= 0 && qi >= 1 && qi <= 127 && (in_offset == 0 || (in_offset >= qi && in_offset + qi <= 255)),
              "mixed_quant: in_offset must be 0 or shift the codes [-qi, qi] into 0..255");
  float* yp = fake ? y.data_ptr<float>() : nullptr;
  int8_t* qip = fake ? nullptr : q_in.data_ptr<int8_t>();
  int8_t* qop = fake ? nullptr : q_out.data_ptr<int8_t>();
  float* sop = fake ? nullptr : s_out.data_ptr<float>();
  // Work items: (row, chunk of time steps), independent (rule_chunk).
  const int64_t chunk = rule_chunk(n_refresh);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  ouromamba_parallel::parallel_items(R * nchunks, 1, [&](ouromamba_parallel::Items& items) {
    // Every pass over a step's channels is a plain loop (row_stats .. codes_row above), which
    // the compiler vectorizes at the CPU's own width. The outlier mask: -1 / 0 per channel, the
    // window's running OR (or this step's flags when n_refresh <= 1).
    // Channel-strided x is first copied into (chunk, C) rows: time-contiguous x (a transposed
    // (batch, C, L) tensor, e.g. the scan's output before out_proj) as runs of a chunk's steps
    // per channel, one or two cache lines each; any other layout element by element.
    std::vector<int32_t> mask_buf(static_cast<size_t>(C));
    std::vector<float> gather(sc != 1 ? static_cast<size_t>(chunk * C) : 0);
    int32_t* __restrict__ mask = mask_buf.data();
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / nchunks, t0 = (i % nchunks) * chunk, t1 = std::min(L, t0 + chunk);
        if (sc != 1) {
          float* __restrict__ g = gather.data();
          const float* base = xp + r * sr;
          if (st == 1) {
            for (int64_t c = 0; c < C; ++c) {
              const float* run = base + c * sc;
              if (c + 16 < C) {  // each run starts a cache miss: ask for the runs 16 channels on early
                __builtin_prefetch(run + 16 * sc + t0);
                __builtin_prefetch(run + 16 * sc + t1 - 1);
              }
              for (int64_t t = t0; t < t1; ++t) g[(t - t0) * C + c] = run[t];
            }
          } else {
            for (int64_t t = t0; t < t1; ++t) {
              for (int64_t c = 0; c < C; ++c) g[(t - t0) * C + c] = base[t * st + c * sc];
            }
          }
        }
        for (int64_t t = t0; t < t1; ++t) {
          const float* src = sc != 1 ? gather.data() + (t - t0) * C : xp + r * sr + t * st;
          if (sc == 1 && t + 1 < t1) prefetch_row(src + st, C);
          const float s = sp[t];
          bool any_out = false;
          const float so = rule_step(src, mask, C, t, s, qif, kf, n_refresh, any_out);
          const int64_t o = (r * L + t) * C;
          if (fake) {
            fake_row(src, mask, yp + o, C, s, qif, so, 127.0f);
          } else {
            if (any_out) {
              codes_both(src, mask, qip + o, qop + o, C, s, qif, so, 127.0f, static_cast<int32_t>(in_offset));
            } else {
              codes_row(src, mask, qip + o, C, s, qif, false, static_cast<int32_t>(in_offset));
              std::memset(qop + o, 0, static_cast<size_t>(C));
            }
            sop[r * L + t] = so;
          }
        }
      }
    }
  });
  if (fake) return {y};
  return {in_offset > 0 ? q_in.view(torch::kUInt8) : q_in, q_out, s_out};
}

// linear_mixed_fake: y = x @ wt + bias for a short reduction (x (R, L, K) float32 contiguous,
// wt (K, N) float32 contiguous, bias (N,) or empty), then y's mixed fake quantization as
// mixed_quant(fake) does it (inliers at qi with the step scale s_out[t], outliers at 8 bits),
// without y ever leaving the cache: a work item is a run of whole windows of one row, whose
// products go into a per-thread (steps, N) buffer several steps at a time (they share each
// weight load), and each step is then quantized into the output. Vim's dt_proj, whose output is
// the scan's delta. The products are summed in k order with fused multiply-adds.
// Columns [j_begin, N) of MR rows, two vectors of columns at a time (any N: partial vectors).
template <int MR>
inline void small_gemm_rows(const float* __restrict__ x, int64_t K, const float* __restrict__ wt,
                            const float* __restrict__ bias, float* __restrict__ y, int64_t N, int64_t j_begin = 0) {
  for (int64_t j0 = j_begin; j0 < N; j0 += 2 * W) {
    const int n0 = static_cast<int>(std::min<int64_t>(W, N - j0));
    const int n1 = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(W, N - j0 - W)));
    V acc[MR][2];
    const V b0 = bias ? load(bias + j0, n0) : VF::splat(0.0f);
    const V b1 = bias && n1 ? load(bias + j0 + W, n1) : VF::splat(0.0f);
    for (int r = 0; r < MR; ++r) acc[r][0] = b0, acc[r][1] = b1;
    for (int64_t kk = 0; kk < K; ++kk) {
      const V w0 = load(wt + kk * N + j0, n0);
      const V w1 = n1 ? load(wt + kk * N + j0 + W, n1) : VF::splat(0.0f);
      for (int r = 0; r < MR; ++r) {
        const V xb = VF::splat(x[r * K + kk]);
        acc[r][0] = vfma(xb, w0, acc[r][0]);
        acc[r][1] = vfma(xb, w1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      store(y + r * N + j0, acc[r][0], n0);
      if (n1) store(y + r * N + j0 + W, acc[r][1], n1);
    }
  }
}

// The whole tiles of kCols = kWideVecs vectors of columns of MR rows; returns the first column left
// (small_gemm_rows does the rest). Each output is the same chain of FMAs in k order from the bias,
// so the same numbers as small_gemm_rows. The tiles give enough independent FMA chains to keep both
// FMA units busy (the two-vector tiles of four rows waited on the FMA's latency) with the weight
// vectors in registers: 4 rows x 4 vectors (16 accumulators) on AVX-512; 6 rows x 2 vectors on
// AVX2, whose 16 registers do not hold 16 accumulators beside the row value (two of them went
// through the stack every step) and whose loads could not feed 4 x 3 tiles from memory operands.
constexpr int kWideVecs = W == 8 ? 2 : 4;
constexpr int kWideRows = W == 8 ? 6 : 4;
template <int MR>
inline int64_t small_gemm_rows_wide(const float* __restrict__ x, int64_t K, const float* __restrict__ wt,
                                    const float* __restrict__ bias, float* __restrict__ y, int64_t N) {
  constexpr int64_t kCols = kWideVecs * W;
  int64_t j0 = 0;
  for (; j0 + kCols <= N; j0 += kCols) {
    V acc[MR][kWideVecs];
    for (int v = 0; v < kWideVecs; ++v) {
      const V b = bias ? load(bias + j0 + v * W, W) : VF::splat(0.0f);
      for (int r = 0; r < MR; ++r) acc[r][v] = b;
    }
    for (int64_t kk = 0; kk < K; ++kk) {
      V w[kWideVecs];
      for (int v = 0; v < kWideVecs; ++v) w[v] = load(wt + kk * N + j0 + v * W, W);
      for (int r = 0; r < MR; ++r) {
        const V xb = VF::splat(x[r * K + kk]);
        for (int v = 0; v < kWideVecs; ++v) acc[r][v] = vfma(xb, w[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < kWideVecs; ++v) store(y + r * N + j0 + v * W, acc[r][v], W);
    }
  }
  return j0;
}

torch::Tensor linear_mixed_fake(torch::Tensor x, torch::Tensor wt, torch::Tensor bias, torch::Tensor s_out,
                                int64_t qi, double k, int64_t n_refresh) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "linear_mixed_fake: x must be contiguous float32 (R, L, K)");
  const int64_t R = x.size(0), L = x.size(1), K = x.size(2);
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == torch::kFloat && wt.is_contiguous() && wt.size(0) == K,
              "linear_mixed_fake: wt must be contiguous float32 (K, N)");
  const int64_t N = wt.size(1);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == N),
              "linear_mixed_fake: bias must be float32 (N,) or empty");
  TORCH_CHECK(s_out.scalar_type() == torch::kFloat && s_out.is_contiguous() && s_out.numel() == L,
              "linear_mixed_fake: s_out must be float32 with one value per time step");
  TORCH_CHECK(qi >= 1 && qi <= 127, "linear_mixed_fake: qi must be in [1, 127]");
  auto y = torch::empty({R, L, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* sp = s_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float kf = static_cast<float>(k), qif = static_cast<float>(qi);
  const int64_t chunk = rule_chunk(n_refresh);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  ouromamba_parallel::parallel_items(R * nchunks, 1, [&](ouromamba_parallel::Items& items) {
    std::vector<int32_t> mask_buf(static_cast<size_t>(N));
    std::vector<float> buf(static_cast<size_t>(chunk * N));
    int32_t* mask = mask_buf.data();
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / nchunks, t0 = (i % nchunks) * chunk, t1 = std::min(L, t0 + chunk);
        const float* xr = xp + (r * L + t0) * K;
        int64_t t = t0;
        for (; t + kWideRows <= t1; t += kWideRows) {
          const float* xt = xr + (t - t0) * K;
          float* yt = buf.data() + (t - t0) * N;
          small_gemm_rows<kWideRows>(xt, K, wp, bp, yt, N, small_gemm_rows_wide<kWideRows>(xt, K, wp, bp, yt, N));
        }
        for (; t + 4 <= t1; t += 4) {
          const float* xt = xr + (t - t0) * K;
          float* yt = buf.data() + (t - t0) * N;
          small_gemm_rows<4>(xt, K, wp, bp, yt, N, small_gemm_rows_wide<4>(xt, K, wp, bp, yt, N));
        }
        for (; t < t1; ++t) {
          const float* xt = xr + (t - t0) * K;
          float* yt = buf.data() + (t - t0) * N;
          small_gemm_rows<1>(xt, K, wp, bp, yt, N, small_gemm_rows_wide<1>(xt, K, wp, bp, yt, N));
        }
        for (t = t0; t < t1; ++t) {
          const float* src = buf.data() + (t - t0) * N;
          bool any_out = false;
          const float so = rule_step(src, mask, N, t, sp[t], qif, kf, n_refresh, any_out);
          fake_row(src, mask, yp + (r * L + t) * N, N, sp[t], qif, so, 127.0f);
        }
      }
    }
  });
  return y;
}

// AVX2 with FMA (every AVX2 CPU but a few VIA ones); elsewhere u4_available() is false.
#if defined(__AVX2__) && defined(__FMA__)
#define OM_U4 1
#else
#define OM_U4 0
#endif

// Bit i set where p[i] != 0, for the n <= 32 bytes at p.
inline uint32_t nonzero_bits(const int8_t* p, int n) {
#if defined(__AVX2__)
  if (n == 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
  }
#endif
  uint32_t bits = 0;
  for (int i = 0; i < n; ++i) bits |= static_cast<uint32_t>(p[i] != 0) << i;
  return bits;
}

// The W4A4O8 epilogue's arithmetic, written with explicit fused multiply-adds so that its rounding
// does not depend on what the compiler contracts:
//   o[n] = fma(q, w[c, n], o[n]) for each outlier (c, q) of the row, in channel order, from 0
//          (on AVX2 in another order: integer sums, the same values);
//   x[n] = fma(acc[n], s_in, o[n] * s_out), or acc[n] * s_in for a row without outliers;
//   y[n] = fma(x[n], w_scale[n], bias[n]), or x[n] * w_scale[n] without bias.
// (w: a row of the outlier weights, w + 8 as uint8)
inline void axpy_w8(float* __restrict__ o, float a, const uint8_t* __restrict__ w, int64_t N) {
  for (int64_t i = 0; i < N; ++i) o[i] = std::fma(a, static_cast<float>(w[i]) - 8.0f, o[i]);
}

// The last two lines above for n < N (oacc null: no outliers; b null: no bias; y may be acc's
// own memory); acc is int32, or float32 holding the same integers (oneDNN's u8 x s8 GEMM).
template <typename Acc>
inline void finish_row(float* __restrict__ y, const Acc* __restrict__ acc, const float* __restrict__ oacc,
                       float si, float so, const float* __restrict__ ws, const float* __restrict__ b, int64_t N) {
  if (oacc && b) {
    for (int64_t i = 0; i < N; ++i) y[i] = std::fma(std::fma(static_cast<float>(acc[i]), si, oacc[i] * so), ws[i], b[i]);
  } else if (oacc) {
    for (int64_t i = 0; i < N; ++i) y[i] = std::fma(static_cast<float>(acc[i]), si, oacc[i] * so) * ws[i];
  } else if (b) {
    for (int64_t i = 0; i < N; ++i) y[i] = std::fma(static_cast<float>(acc[i]) * si, ws[i], b[i]);
  } else {
    for (int64_t i = 0; i < N; ++i) y[i] = (static_cast<float>(acc[i]) * si) * ws[i];
  }
}

// ---------------------------------------------------------------------------------------------
// w4a4o8_epilogue

// The W4A4O8 linear's epilogue in one pass over the (M, N) output, in place of the inlier
// accumulator acc (M, N): int32 (reinterpreted as float32 and returned), or float32 holding the
// same integers (from oneDNN's u8 x s8 GEMM on CPUs without VNNI):
//   y = ((acc * s_in[m % L] + (q_out[m, :] @ w^T) * s_out[m]) * w_scale) + bias
// (rows m are (batch, step) pairs, s_in holds the L per-step inlier scales)
// q_out (M, K) int8 holds the outlier codes (zero off the outlier channels); per row only its
// non-zero codes are visited. The int4 weights w (N, K) come as w_o (K, Np) uint8 = w^T + 8, the
// rows padded to Np = N rounded up to kOutCols (outlier_weights makes it): the row of channel c is
// what an outlier of c adds to the output. The outlier term's sums are of integers below 2^24
// (K * 128 * 8 at most), exact in float32 in any order: the same numbers as an int32 GEMM of the
// outliers. Rows with no outlier skip that term (it is exactly 0).
// The epilogue's operands (acc null: y holds the accumulator as float32, else acc int32 and y may
// be the same memory).
struct Epilogue {
  const int32_t* acc;
  float* y;
  const int8_t* q_out;
  const uint8_t* w_o;
  const float *s_in, *s_out, *w_scale, *bias;
  int64_t steps, K, N, ldw;
};

constexpr int64_t kOutCols = 64;  // columns of a tile of the outlier term; w_o's rows are padded to it

// Rows of the epilogue's outlier terms computed together (their terms in about 128 KB, 4 to 64
// rows): the columns of the weights that a tile of the term reads stay in cache over them.
constexpr int64_t kOutBlockRows = 64;
inline int64_t outlier_block_rows(int64_t N) {
  return std::max<int64_t>(4, std::min<int64_t>(kOutBlockRows, 128 * 1024 / (4 * std::max<int64_t>(N, 1))));
}

// Per-thread scratch of the epilogue, for blocks of up to `rows` rows: their outlier terms
// (rows x N floats), each row's outlier channels (as offsets c * ldw into w_o) and their codes
// (on AVX2 in pairs).
// A row's lists hold up to K + 1 entries (the outliers and an odd count's partner), plus room for
// gather_outliers' whole-vector stores past the last one (8 offsets, 64 codes).
struct EpilogueScratch {
  int64_t rows, off_stride, codes_stride;
  // Left uninitialized (about 128 KB per thread and call): a row's terms are written whole
  // (outlier_tile, or zeros and then the axpys) before they are read, and a row without outliers
  // is not read.
  std::unique_ptr<float[]> o;
  std::unique_ptr<int64_t[]> off;    // rows x off_stride
  std::unique_ptr<int16_t[]> codes;  // rows x codes_stride: two int8 codes each
  std::vector<int64_t> pairs;
  std::vector<int32_t> shift;
  EpilogueScratch(int64_t K_, int64_t N_)
      : rows(outlier_block_rows(N_)), off_stride(K_ + 1 + 8), codes_stride((K_ + 1 + 64) / 2 + 1),
        o(new float[static_cast<size_t>(rows * N_)]),
        off(new int64_t[static_cast<size_t>(rows * off_stride)]),
        codes(new int16_t[static_cast<size_t>(rows * codes_stride)]),
        pairs(static_cast<size_t>(rows)), shift(static_cast<size_t>(rows)) {}
  int64_t* off_of(int64_t r) const { return off.get() + r * off_stride; }
  int16_t* codes_of(int64_t r) const { return codes.get() + r * codes_stride; }
};

// A row's outlier channels (non-zero codes of q) in channel order: their offsets c * ldw into w_o
// and their codes; returns their count, *sum the sum of their codes. May write up to 8 offsets and
// 64 codes past the last one (EpilogueScratch leaves room).
inline int64_t gather_outliers(const int8_t* __restrict__ q, int64_t K, int64_t ldw, int64_t* __restrict__ off,
                               int8_t* __restrict__ codes, int32_t* sum) {
  int64_t n = 0;
  int32_t total = 0;
  int64_t c0 = 0;
#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
  // 64 channels at a time without a branch per outlier: the non-zero codes compressed into place
  // (vpcompressb), their offsets 8 at a time (vpcompressq), the codes' sum from vpsadbw of q + 128.
  // The bit-by-bit loop below (the other CPUs' path) takes a branch per outlier whose exit is
  // mispredicted once per 32 channels, which costs more than the tiles' arithmetic at the outlier
  // counts of real models.
  alignas(64) int64_t lane_off[8];
  for (int i = 0; i < 8; ++i) lane_off[i] = i * ldw;
  const __m512i iota = _mm512_load_si512(lane_off), step = _mm512_set1_epi64(8 * ldw);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  __m512i sad = zero;
  int64_t blocks = 0;
  for (; c0 + 64 <= K; c0 += 64) {
    const __m512i v = _mm512_loadu_si512(q + c0);
    const __mmask64 m = _mm512_test_epi8_mask(v, v);
    if (!m) continue;
    ++blocks;
    sad = _mm512_add_epi64(sad, _mm512_sad_epu8(_mm512_xor_si512(v, bias), zero));  // sum of q + 128
    _mm512_storeu_si512(codes + n, _mm512_maskz_compress_epi8(m, v));
    __m512i idx = _mm512_add_epi64(iota, _mm512_set1_epi64(c0 * ldw));
    for (int g = 0; g < 8; ++g) {
      const __mmask8 mg = static_cast<__mmask8>(m >> (8 * g));
      _mm512_storeu_si512(off + n, _mm512_maskz_compress_epi64(mg, idx));
      n += __builtin_popcount(static_cast<unsigned>(mg));
      idx = _mm512_add_epi64(idx, step);
    }
  }
  total = static_cast<int32_t>(_mm512_reduce_add_epi64(sad) - 128 * 64 * blocks);
#endif
  // found 32 bytes at a time (a row holds a few per cent of K)
  for (; c0 < K; c0 += 32) {
    uint32_t bits = nonzero_bits(q + c0, static_cast<int>(std::min<int64_t>(32, K - c0)));
    while (bits) {
      const int64_t c = c0 + __builtin_ctz(bits);
      bits &= bits - 1;
      off[n] = c * ldw;
      codes[n++] = q[c];
      total += q[c];
    }
  }
  *sum = total;
  return n;
}

#if OM_U4
// The outlier term with vpmaddubsw, two outlier channels per instruction:
//   o[n] = sum_j q[c_j] * w[n, c_j]
// over a row's outlier channels c_j, whose codes come in pairs (codes: the two int8 codes of
// pair j side by side; an odd count is padded with a code 0). The rows of w_o (w + 8 in [0, 16]
// for int4 weights in [-8, 8]) of each pair are interleaved byte by byte and multiplied by the
// pair of codes: |pair sum| <= 2 * 16 * 128 = 4096, so int16 lanes hold kOutPairs = 7 pairs
// (28,672) before they are widened into int32; the + 8 comes out as -8 * sum_j q_j (`shift`).
// The sums are integers, so this is exactly the value of the scalar axpys in channel order (each
// partial sum is below 2^24, exact in float32), with a fraction of the scalar axpys' instructions.
constexpr int64_t kOutPairs = 7;

inline void widen_add(int32_t* acc, __m256i v16) {
  __m256i* a = reinterpret_cast<__m256i*>(acc);
  _mm256_store_si256(a, _mm256_add_epi32(_mm256_load_si256(a), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v16))));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Columns [0, cols) (cols <= kOutCols) of one row's outlier term into o, from the kOutCols
// columns of w_o at w (its row of channel c at w + c * ldw = w + off[i]).
void outlier_tile_u4(const uint8_t* __restrict__ w, const int64_t* __restrict__ off,
                     const int16_t* __restrict__ codes, int64_t pairs, int32_t shift, float* __restrict__ o,
                     int64_t cols) {
  alignas(32) int32_t acc[kOutCols];
  for (int64_t i = 0; i < kOutCols; ++i) acc[i] = shift;
  for (int64_t j0 = 0; j0 < pairs; j0 += kOutPairs) {
    const int64_t j1 = std::min(pairs, j0 + kOutPairs);
    // lo_h: columns 32 h + (0-7 | 16-23) (low | high lane); hi_h: 32 h + (8-15 | 24-31)
    __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* a = w + off[2 * j];
      const uint8_t* b = w + off[2 * j + 1];
      // the same channels' lines of the next tile, which the caller runs after this one over all
      // its rows: into L2, so that they are not each a miss to L3 or memory then
      _mm_prefetch(reinterpret_cast<const char*>(a + kOutCols), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(b + kOutCols), _MM_HINT_T1);
      const __m256i qq = _mm256_set1_epi16(codes[j]);
      const __m256i a0 = load32(a), b0 = load32(b);
      lo0 = _mm256_add_epi16(lo0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a0, b0), qq));
      hi0 = _mm256_add_epi16(hi0, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a0, b0), qq));
      const __m256i a1 = load32(a + 32), b1 = load32(b + 32);
      lo1 = _mm256_add_epi16(lo1, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a1, b1), qq));
      hi1 = _mm256_add_epi16(hi1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a1, b1), qq));
    }
    widen_add(acc + 0, lo0);
    widen_add(acc + 8, hi0);
    widen_add(acc + 16, _mm256_permute2x128_si256(lo0, lo0, 1));
    widen_add(acc + 24, _mm256_permute2x128_si256(hi0, hi0, 1));
    widen_add(acc + 32, lo1);
    widen_add(acc + 40, hi1);
    widen_add(acc + 48, _mm256_permute2x128_si256(lo1, lo1, 1));
    widen_add(acc + 56, _mm256_permute2x128_si256(hi1, hi1, 1));
  }
  if (cols == kOutCols) {
    for (int64_t i = 0; i < kOutCols; i += 8) {
      _mm256_storeu_ps(o + i, _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc + i))));
    }
  } else {
    for (int64_t i = 0; i < cols; ++i) o[i] = static_cast<float>(acc[i]);
  }
}

#endif  // OM_U4

#if defined(__AVX512BW__)
// outlier_tile_u4 with 64-byte vectors (AVX-512BW): one load per channel row covers the tile's 64
// columns, so a pair of channels costs two unpacks, two vpmaddubsw and two adds where the 32-byte
// form needs four of each. Same pairs, same int16
// bound of kOutPairs pairs, same integer sums. The unpacks work within 128-bit lanes: lane i of
// the low one holds columns 16 i + 0-7 of the tile, of the high one 16 i + 8-15; the int16 sums
// are widened into four int32 accumulators in that order and put back in column order once.
void outlier_tile_512(const uint8_t* __restrict__ w, const int64_t* __restrict__ off,
                      const int16_t* __restrict__ codes, int64_t pairs, int32_t shift, float* __restrict__ o,
                      int64_t cols) {
  // acc0: columns 0-7, 16-23; acc1: 8-15, 24-31; acc2: 32-39, 48-55; acc3: 40-47, 56-63
  __m512i acc0 = _mm512_set1_epi32(shift), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int64_t j0 = 0; j0 < pairs; j0 += kOutPairs) {
    const int64_t j1 = std::min(pairs, j0 + kOutPairs);
    __m512i lo = _mm512_setzero_si512(), hi = lo;
    for (int64_t j = j0; j < j1; ++j) {
      const __m512i a = _mm512_loadu_si512(w + off[2 * j]), b = _mm512_loadu_si512(w + off[2 * j + 1]);
      const __m512i qq = _mm512_set1_epi16(codes[j]);
      lo = _mm512_add_epi16(lo, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(a, b), qq));
      hi = _mm512_add_epi16(hi, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(a, b), qq));
    }
    acc0 = _mm512_add_epi32(acc0, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo)));
    acc1 = _mm512_add_epi32(acc1, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi)));
    acc2 = _mm512_add_epi32(acc2, _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
    acc3 = _mm512_add_epi32(acc3, _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
  }
  // 128-bit blocks (4 columns each) back in order: 0-15 = acc0's blocks 0, 1 then acc1's 0, 1; ...
  const __m512i c[4] = {_mm512_shuffle_i32x4(acc0, acc1, _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_i32x4(acc0, acc1, _MM_SHUFFLE(3, 2, 3, 2)),
                        _mm512_shuffle_i32x4(acc2, acc3, _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_i32x4(acc2, acc3, _MM_SHUFFLE(3, 2, 3, 2))};
  for (int i = 0; i < 4; ++i) {
    const int64_t left = cols - 16 * i;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    _mm512_mask_storeu_ps(o + 16 * i, m, _mm512_cvtepi32_ps(c[i]));
  }
}
#endif  // __AVX512BW__

#if OM_U4
// The widest tile this build has.
#if defined(__AVX512BW__)
constexpr auto outlier_tile = outlier_tile_512;
#else
constexpr auto outlier_tile = outlier_tile_u4;
#endif
#endif

// The outlier terms of rows [m0, m1) (at most s.rows) into s.o (row r at r * N); any[r]: row r
// has outliers (else its term is 0 and not written).
void outlier_block(const Epilogue& e, int64_t m0, int64_t m1, EpilogueScratch& s, bool* any) {
  const int64_t K = e.K, N = e.N;
  [[maybe_unused]] bool some = false;  // (read by the AVX2 path)
  for (int64_t r = 0; r < m1 - m0; ++r) {
    int64_t* off = s.off_of(r);
    int8_t* codes = reinterpret_cast<int8_t*>(s.codes_of(r));
    int32_t sum = 0;
    int64_t n = gather_outliers(e.q_out + (m0 + r) * K, K, e.ldw, off, codes, &sum);
    any[r] = n > 0;
    some |= any[r];
#if OM_U4
    if (n % 2 == 1) {  // a partner with code 0 (its weights count for nothing)
      off[n] = off[0];
      codes[n++] = 0;
    }
    s.pairs[r] = n / 2;
    s.shift[r] = -8 * sum;
#else
    // the scalar form: an axpy over N per outlier channel, in channel order
    float* __restrict__ o = s.o.get() + r * N;
    if (n > 0) std::fill(o, o + N, 0.0f);
    for (int64_t i = 0; i < n; ++i) axpy_w8(o, static_cast<float>(codes[i]), e.w_o + off[i], N);
#endif
  }
#if OM_U4
  if (!some) return;
  // tile by tile of 64 columns over all rows: the tile's weights stay in cache
  for (int64_t n0 = 0; n0 < N; n0 += kOutCols) {
    const int64_t cols = std::min<int64_t>(kOutCols, N - n0);
    for (int64_t r = 0; r < m1 - m0; ++r) {
      if (!any[r]) continue;
      outlier_tile(e.w_o + n0, s.off_of(r), s.codes_of(r), s.pairs[r], s.shift[r], s.o.get() + r * N + n0, cols);
    }
  }
#endif
}

// Rows [m0, m1) of the epilogue, in blocks of s.rows. finish_row's plain loops over N with
// restrict pointers: the compiler vectorizes them at the CPU's own width (GCC lowers the 64-byte
// vector types poorly without AVX-512: int8 widening and scalar broadcasts went lane by lane
// through the stack).
void epilogue_rows(const Epilogue& e, int64_t m0, int64_t m1, EpilogueScratch& s) {
  const int64_t N = e.N;
  bool any[kOutBlockRows];
  for (int64_t b0 = m0; b0 < m1; b0 += s.rows) {
    const int64_t b1 = std::min(m1, b0 + s.rows);
    outlier_block(e, b0, b1, s, any);
    for (int64_t m = b0; m < b1; ++m) {
      float* yr = e.y + m * N;
      const float* o = any[m - b0] ? s.o.get() + (m - b0) * N : nullptr;
      const float si = e.s_in[m % e.steps], so = e.s_out[m];
      if (e.acc) {
        finish_row(yr, e.acc + m * N, o, si, so, e.w_scale, e.bias, N);
      } else {
        finish_row(yr, yr, o, si, so, e.w_scale, e.bias, N);
      }
    }
  }
}

// The epilogue's operands for an (M, N) product (what w4a4o8_epilogue and u4_linear share).
// The operands every epilogue of an (M, N) product takes: the outlier codes, the scales, the bias.
void check_epilogue_scales(const char* op, int64_t M, int64_t N, const torch::Tensor& s_in, const torch::Tensor& q_out,
                           const torch::Tensor& s_out, const torch::Tensor& w_scale, const torch::Tensor& bias) {
  TORCH_CHECK(q_out.dim() == 2 && q_out.is_contiguous() && q_out.scalar_type() == torch::kInt8 && q_out.size(0) == M,
              op, ": q_out must be contiguous int8 (M, K) outlier codes");
  TORCH_CHECK(s_out.is_contiguous() && s_out.numel() == M && s_out.scalar_type() == torch::kFloat,
              op, ": s_out must be float32 with one value per row");
  const int64_t steps = s_in.numel();
  TORCH_CHECK(s_in.is_contiguous() && s_in.scalar_type() == torch::kFloat && steps > 0 && M % steps == 0,
              op, ": s_in must be float32 with one value per time step (rows are (batch, step))");
  TORCH_CHECK(w_scale.is_contiguous() && w_scale.numel() == N && w_scale.scalar_type() == torch::kFloat,
              op, ": w_scale must be float32 with one value per output channel");
  TORCH_CHECK(!(bias.defined() && bias.numel() > 0) ||
                  (bias.is_contiguous() && bias.numel() == N && bias.scalar_type() == torch::kFloat),
              op, ": bias must be empty or float32 with one value per output channel");
}

// check_epilogue_scales and the tiles' outlier weights w_o (outlier_weights of the (N, K) weights).
void check_epilogue(const char* op, int64_t M, int64_t N, const torch::Tensor& s_in, const torch::Tensor& q_out,
                    const torch::Tensor& s_out, const torch::Tensor& w_o, const torch::Tensor& w_scale,
                    const torch::Tensor& bias) {
  check_epilogue_scales(op, M, N, s_in, q_out, s_out, w_scale, bias);
  const int64_t K = q_out.size(1);
  TORCH_CHECK(w_o.dim() == 2 && w_o.is_contiguous() && w_o.scalar_type() == torch::kUInt8 && w_o.size(0) == K &&
                  w_o.size(1) == (N + kOutCols - 1) / kOutCols * kOutCols,
              op, ": w_o must be outlier_weights of the (", N, ", ", K, ") int4 weights: contiguous uint8 (", K, ", ",
              (N + kOutCols - 1) / kOutCols * kOutCols, ")");
}

// The Epilogue over checked operands: acc the int32 products (null: y holds them as float32).
Epilogue epilogue_of(const int32_t* acc, float* y, const torch::Tensor& s_in, const torch::Tensor& q_out,
                     const torch::Tensor& s_out, const torch::Tensor& w_o, const torch::Tensor& w_scale,
                     const torch::Tensor& bias) {
  const bool has_bias = bias.defined() && bias.numel() > 0;
  return Epilogue{acc, y, q_out.data_ptr<int8_t>(), w_o.data_ptr<uint8_t>(), s_in.data_ptr<float>(),
                  s_out.data_ptr<float>(), w_scale.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr,
                  s_in.numel(), q_out.size(1), w_scale.numel(), w_o.size(1)};
}

// All M rows of the epilogue, on all threads.
void epilogue_all(const Epilogue& e, int64_t M) {
  ouromamba_parallel::parallel_items(M, outlier_block_rows(e.N), [&](ouromamba_parallel::Items& items) {
    EpilogueScratch scratch(e.K, e.N);
    int64_t begin, end;
    while (items.next(begin, end)) epilogue_rows(e, begin, end, scratch);
  });
}

// The epilogue's form of the int4 weights w (N, K), values in [-8, 8]: w_o (K, Np) uint8 = w^T + 8,
// each row padded with 8 (a weight 0) to Np = N rounded up to kOutCols, so that a tile of the
// outlier term reads whole vectors without bounds checks.
torch::Tensor outlier_weights(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "outlier_weights: w must be an int8 (N, K) matrix");
  TORCH_CHECK(w.numel() == 0 || (w.min().item<int>() >= -8 && w.max().item<int>() <= 8),
              "outlier_weights: weights must lie in [-8, 8] (int4)");
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kOutCols - 1) / kOutCols * kOutCols;
  auto w_o = torch::full({K, Np}, 8, w.options().dtype(torch::kUInt8));
  w_o.narrow(1, 0, N).copy_((w.t().to(torch::kInt) + 8).to(torch::kUInt8));
  return w_o;
}

torch::Tensor w4a4o8_epilogue(torch::Tensor acc, torch::Tensor s_in, torch::Tensor q_out, torch::Tensor s_out,
                              torch::Tensor w_o, torch::Tensor w_scale, torch::Tensor bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() &&
                  (acc.scalar_type() == torch::kInt || acc.scalar_type() == torch::kFloat),
              "w4a4o8_epilogue: acc must be a contiguous int32 or float32 (M, N) matrix");
  const bool acc_float = acc.scalar_type() == torch::kFloat;
  const int64_t M = acc.size(0), N = acc.size(1);
  check_epilogue("w4a4o8_epilogue", M, N, s_in, q_out, s_out, w_o, w_scale, bias);
  int32_t* ap = reinterpret_cast<int32_t*>(acc.data_ptr());
  epilogue_all(epilogue_of(acc_float ? nullptr : ap, reinterpret_cast<float*>(ap), s_in, q_out, s_out, w_o, w_scale,
                           bias),
               M);
  return acc_float ? acc : acc.view(torch::kFloat);
}

// ---------------------------------------------------------------------------------------------
// The outlier term as a dense product (CPUs whose int8 matmul is much faster than the tiles above)

// Whether a row of n int8 codes holds a non-zero one (the epilogue's test for an outlier row).
inline bool any_nonzero(const int8_t* __restrict__ q, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512BW__)
  for (; c + 64 <= n; c += 64) {
    const __m512i v = _mm512_loadu_si512(q + c);
    if (_mm512_test_epi8_mask(v, v)) return true;
  }
#endif
  int8_t any = 0;
  for (; c < n; ++c) any |= q[c];
  return any != 0;
}

// The fraction of non-zero outlier codes in q_out (M, K), counted on every 8th row (a sample that
// costs little next to the GEMMs): how much of a dense outlier GEMM's work the tiles would do.
double outlier_density(torch::Tensor q_out) {
  TORCH_CHECK(q_out.dim() == 2 && q_out.is_contiguous() && q_out.scalar_type() == torch::kInt8,
              "outlier_density: q_out must be contiguous int8 (M, K)");
  const int64_t M = q_out.size(0), K = q_out.size(1);
  if (M == 0 || K == 0) return 0.0;
  const int8_t* q = q_out.data_ptr<int8_t>();
  int64_t nnz = 0, rows = 0;
  for (int64_t m = 0; m < M; m += 8, ++rows) {
    const int8_t* r = q + m * K;
    int64_t c = 0;
#if defined(__AVX512BW__)
    for (; c + 64 <= K; c += 64) {
      const __m512i v = _mm512_loadu_si512(r + c);
      nnz += __builtin_popcountll(_mm512_test_epi8_mask(v, v));
    }
#endif
    for (; c < K; ++c) nnz += r[c] != 0;
  }
  return static_cast<double>(nnz) / static_cast<double>(rows * K);
}

// The epilogue of w4a4o8_epilogue with the outlier term given: o (M, N) float32 holding the exact
// integer sums q_out @ w^T (a GEMM of the outlier codes), y written over acc (float32 holding the
// inlier products). The same finish_row arithmetic, with the term taken from o on the rows whose
// codes hold a non-zero one (as the tiles do), so the same numbers as w4a4o8_epilogue.
torch::Tensor w4a4o8_finish(torch::Tensor acc, torch::Tensor o, torch::Tensor s_in, torch::Tensor q_out,
                            torch::Tensor s_out, torch::Tensor w_scale, torch::Tensor bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == torch::kFloat,
              "w4a4o8_finish: acc must be a contiguous float32 (M, N) matrix");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(o.sizes() == acc.sizes() && o.is_contiguous() && o.scalar_type() == torch::kFloat,
              "w4a4o8_finish: o must be a contiguous float32 matrix shaped like acc");
  check_epilogue_scales("w4a4o8_finish", M, N, s_in, q_out, s_out, w_scale, bias);
  const int64_t steps = s_in.numel(), K = q_out.size(1);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  float* y = acc.data_ptr<float>();
  const float* op = o.data_ptr<float>();
  const int8_t* q = q_out.data_ptr<int8_t>();
  const float *si = s_in.data_ptr<float>(), *so = s_out.data_ptr<float>(), *ws = w_scale.data_ptr<float>();
  const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
  ouromamba_parallel::parallel_items(M, 64, [&](ouromamba_parallel::Items& items) {
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t m = begin; m < end; ++m) {
        const float* om = any_nonzero(q + m * K, K) ? op + m * N : nullptr;
        finish_row(y + m * N, y + m * N, om, si[m % steps], so[m], ws, b, N);
      }
    }
  });
  return acc;
}

// ---------------------------------------------------------------------------------------------
// u4_pack / u4_mm: the inlier GEMM of W4A4O8 on AVX2 CPUs without VNNI or AMX
//
// C (M, N) int32 = q (M, K) @ w (N, K)^T for 4-bit activation codes q in [-7, 7] and int4 weights
// w in [-8, 8], exactly. The activations come as u = q + 8 in [1, 15] (mixed_quant with
// in_offset 8); vpmaddubsw multiplies 16 columns x 2 consecutive k of u8 x s8 and adds each pair
// into int16: |pair| <= 2 * 15 * 8 = 240, so int16 lanes hold 128 pairs (30,720 < 32,767) before
// they are widened into the int32 tile. That is 32 multiply-adds per instruction with one add,
// against 8 per fp32 FMA; oneDNN's u8 x s8 kernel on the same CPUs widens every pair through
// vpmaddwd (a third instruction) and takes the +128-shifted codes. The shift comes out exactly:
// sum_k (q + 8) w = q @ w^T + 8 * colsum(w).
//
// Packed weights: panels of 32 columns, (P, K2, 32, 2) int8 with K2 = ceil(K / 2): for each pair
// of k, the 32 columns' two weights side by side, one 64-byte line per pair (zeros past N and K).

constexpr int64_t kU4Cols = 32;
constexpr int64_t kU4Pairs = 128;  // k pairs summed in int16 before widening (see above)
constexpr int64_t kU4RowBlock = 64;

bool u4_available() {
#if OM_U4
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> u4_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "u4_pack: w must be an int8 (N, K) matrix");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), K2 = (K + 1) / 2, P = (N + kU4Cols - 1) / kU4Cols;
  TORCH_CHECK(w.numel() == 0 || (w.min().item<int>() >= -8 && w.max().item<int>() <= 8),
              "u4_pack: weights must lie in [-8, 8] (int4)");
  auto packed = torch::zeros({P, K2, kU4Cols, 2}, w.options());
  auto colsum = w.to(torch::kInt).sum(1).to(torch::kInt).contiguous();  // sum() widens to int64
  const int8_t* wp = w.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n) {
    int8_t* col = pp + (n / kU4Cols) * K2 * kU4Cols * 2 + (n % kU4Cols) * 2;
    for (int64_t k = 0; k < K; ++k) col[(k / 2) * kU4Cols * 2 + (k & 1)] = wp[n * K + k];
  }
  return {packed, colsum};
}

#if OM_U4

// acc[r][h] += the pairs [0, n) of rows a + r * lda against a panel's pairs, for MR rows.
template <int MR>
inline void u4_pairs(const uint8_t* a, int64_t lda, const int8_t* w, int64_t n, __m256i (&acc)[4][2]) {
  for (int64_t kp = 0; kp < n; ++kp) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + kp * 64));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + kp * 64 + 32));
    for (int r = 0; r < MR; ++r) {
      int16_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, 2);
      const __m256i b = _mm256_set1_epi16(pair);
      acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(b, w0));
      acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(b, w1));
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The 4-row case by hand: GCC 12 schedules the eight products ahead of the adds, runs out of the
// 16 ymm registers and copies every accumulator each step (eight extra moves per 16 instructions,
// about 25% of the kernel's time).
template <>
inline void u4_pairs<4>(const uint8_t* a, int64_t lda, const int8_t* w, int64_t n, __m256i (&acc)[4][2]) {
  if (n <= 0) return;
  const uint8_t* a3 = a + 3 * lda;
  __m256i w0, w1, b, t;
  asm volatile(
      "1:\n\t"
      "vmovdqa (%[w]), %[w0]\n\t"
      "vmovdqa 32(%[w]), %[w1]\n\t"
      "vpbroadcastw (%[a]), %[b]\n\t"
      "vpmaddubsw %[w0], %[b], %[t]\n\t"
      "vpaddw %[t], %[c00], %[c00]\n\t"
      "vpmaddubsw %[w1], %[b], %[t]\n\t"
      "vpaddw %[t], %[c01], %[c01]\n\t"
      "vpbroadcastw (%[a],%[lda]), %[b]\n\t"
      "vpmaddubsw %[w0], %[b], %[t]\n\t"
      "vpaddw %[t], %[c10], %[c10]\n\t"
      "vpmaddubsw %[w1], %[b], %[t]\n\t"
      "vpaddw %[t], %[c11], %[c11]\n\t"
      "vpbroadcastw (%[a],%[lda],2), %[b]\n\t"
      "vpmaddubsw %[w0], %[b], %[t]\n\t"
      "vpaddw %[t], %[c20], %[c20]\n\t"
      "vpmaddubsw %[w1], %[b], %[t]\n\t"
      "vpaddw %[t], %[c21], %[c21]\n\t"
      "vpbroadcastw (%[a3]), %[b]\n\t"
      "vpmaddubsw %[w0], %[b], %[t]\n\t"
      "vpaddw %[t], %[c30], %[c30]\n\t"
      "vpmaddubsw %[w1], %[b], %[t]\n\t"
      "vpaddw %[t], %[c31], %[c31]\n\t"
      "add $2, %[a]\n\t"
      "add $2, %[a3]\n\t"
      "add $64, %[w]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1]),
        [a] "+r"(a), [a3] "+r"(a3), [w] "+r"(w), [n] "+r"(n), [w0] "=&x"(w0), [w1] "=&x"(w1), [b] "=&x"(b),
        [t] "=&x"(t)
      : [lda] "r"(lda)
      : "memory", "cc");
}
#endif

// Rows [0, MR) of a against one panel: c[r][j] = sum_k a[r][k] * w[n0 + j][k] - 8 * colsum for
// the panel's first cols columns.
template <int MR>
inline void u4_tile(const uint8_t* a, int64_t lda, const int8_t* panel, int64_t K2, const int32_t* colsum8,
                    int32_t* c, int64_t ldc, int64_t cols) {
  // The first run of pairs stores its sums and later runs add to them, so the tile is not zeroed
  // first (GCC zeroes such an array with a call to memset, once per tile).
  alignas(32) int32_t tile[4][kU4Cols];
  if (K2 <= 0) std::fill(&tile[0][0], &tile[0][0] + 4 * kU4Cols, 0);
  for (int64_t k0 = 0; k0 < K2; k0 += kU4Pairs) {
    const int64_t n = std::min(kU4Pairs, K2 - k0);
    __m256i acc[4][2];
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    u4_pairs<MR>(a + 2 * k0, lda, panel + k0 * 64, n, acc);
    for (int r = 0; r < MR; ++r) {
      for (int h = 0; h < 2; ++h) {
        __m256i* t = reinterpret_cast<__m256i*>(tile[r] + 16 * h);
        const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[r][h]));
        const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[r][h], 1));
        if (k0 == 0) {
          _mm256_store_si256(t, lo);
          _mm256_store_si256(t + 1, hi);
        } else {
          _mm256_store_si256(t, _mm256_add_epi32(_mm256_load_si256(t), lo));
          _mm256_store_si256(t + 1, _mm256_add_epi32(_mm256_load_si256(t + 1), hi));
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = tile[r][j] - colsum8[j];
  }
}

// Rows [m0, m1) of c against panel p, in 4-row tiles.
inline void u4_panel_rows(const uint8_t* ap, int64_t lda, int64_t m0, int64_t m1, const int8_t* pp, int64_t p,
                          int64_t K2, const int32_t* colsum8, int32_t* c, int64_t N) {
  const int64_t n0 = p * kU4Cols, cols = std::min(kU4Cols, N - n0);
  const int8_t* panel = pp + p * K2 * kU4Cols * 2;
  const int32_t* cs = colsum8 + n0;
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) u4_tile<4>(ap + m * lda, lda, panel, K2, cs, c + m * N + n0, N, cols);
  switch (m1 - m) {
    case 3: u4_tile<3>(ap + m * lda, lda, panel, K2, cs, c + m * N + n0, N, cols); break;
    case 2: u4_tile<2>(ap + m * lda, lda, panel, K2, cs, c + m * N + n0, N, cols); break;
    case 1: u4_tile<1>(ap + m * lda, lda, panel, K2, cs, c + m * N + n0, N, cols); break;
    default: break;
  }
}

// Every (row, panel) tile of a (M, K2 pairs) against the packed weights into c (M, N), on all
// threads.
void u4_gemm(const uint8_t* ap, int64_t lda, int64_t M, const int8_t* pp, int64_t P, int64_t K2,
             const int32_t* colsum8, int32_t* c, int64_t N) {
  const int64_t blocks = (M + kU4RowBlock - 1) / kU4RowBlock;
  // Work items: (panel of 32 columns, block of 64 rows), panel-major: a thread runs one panel
  // (64 bytes per pair of k, 24 KB at K = 768) over consecutive row blocks while the codes stream
  // past.
  ouromamba_parallel::parallel_items(blocks * P, 1, [&](ouromamba_parallel::Items& items) {
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p = i / blocks, mb = i % blocks;
        const int64_t m0 = mb * kU4RowBlock, m1 = std::min(M, m0 + kU4RowBlock);
        u4_panel_rows(ap, lda, m0, m1, pp, p, K2, colsum8, c, N);
      }
    }
  });
}

// Rows per block of u4_gemm_epilogue: their products in about 128 KB, 4 to 64 rows (a multiple of
// the 4-row tile).
inline int64_t u4_block_rows(int64_t N) {
  return std::max<int64_t>(4, std::min<int64_t>(kU4RowBlock, (128 * 1024 / (4 * N)) / 4 * 4));
}

// u4_gemm's tiles row block by row block instead (all panels of a block of `rows` rows, then the
// W4A4O8 epilogue of those rows while their int32 products are still in L2: e.acc / e.y point at
// c).
void u4_gemm_epilogue(const uint8_t* ap, int64_t lda, int64_t M, const int8_t* pp, int64_t P, int64_t K2,
                      const int32_t* colsum8, int32_t* c, int64_t N, int64_t rows, const Epilogue& e) {
  const int64_t blocks = (M + rows - 1) / rows;
  ouromamba_parallel::parallel_items(blocks, 1, [&](ouromamba_parallel::Items& items) {
    EpilogueScratch scratch(e.K, N);
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t mb = begin; mb < end; ++mb) {
        const int64_t m0 = mb * rows, m1 = std::min(M, m0 + rows);
        for (int64_t p = 0; p < P; ++p) {
          u4_panel_rows(ap, lda, m0, m1, pp, p, K2, colsum8, c, N);
        }
        epilogue_rows(e, m0, m1, scratch);
      }
    }
  });
}

#endif  // OM_U4

// u4_mm / u4_linear's GEMM operands: a (M, K) uint8, the panels and column sums from u4_pack.
// Returns a contiguous, padded with a zero column when K is odd (the kernel reads whole pairs of
// k; those weights are zero).
torch::Tensor check_u4(const char* op, torch::Tensor a, const torch::Tensor& packed, const torch::Tensor& colsum) {
  TORCH_CHECK(u4_available(), op, ": this build has no AVX2 and FMA (check u4_available first)");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == torch::kUInt8, op, ": a must be a uint8 (M, K) matrix");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt8 && packed.is_contiguous() &&
                  packed.size(2) == kU4Cols && packed.size(3) == 2,
              op, ": packed must come from u4_pack");
  const int64_t K = a.size(1), K2 = packed.size(1), P = packed.size(0), N = colsum.numel();
  TORCH_CHECK(K2 == (K + 1) / 2, op, ": a has ", K, " columns; the packed weights were made for ", 2 * K2 - 1,
              " or ", 2 * K2);
  TORCH_CHECK(colsum.scalar_type() == torch::kInt && colsum.is_contiguous() && P == (N + kU4Cols - 1) / kU4Cols,
              op, ": colsum must be u4_pack's int32 column sums of the same weights");
  a = a.contiguous();
  if (K % 2 == 1) a = torch::constant_pad_nd(a, {0, 1}, 0);
  return a;
}

// 8 * colsum, padded with zeros to whole panels.
std::vector<int32_t> colsum8_of(const torch::Tensor& colsum) {
  const int64_t N = colsum.numel();
  std::vector<int32_t> c8(static_cast<size_t>((N + kU4Cols - 1) / kU4Cols * kU4Cols), 0);
  for (int64_t n = 0; n < N; ++n) c8[n] = 8 * colsum.data_ptr<int32_t>()[n];
  return c8;
}

// a (M, K) uint8 holding q + 8 for codes q in [-7, 7]; packed, colsum from u4_pack of the (N, K)
// weights. Returns q @ w^T as int32 (M, N). Exact for operands in those ranges (callers hold
// them: mixed_quant with qi 7 and in_offset 8, weights from int4).
torch::Tensor u4_mm(torch::Tensor a, torch::Tensor packed, torch::Tensor colsum) {
  a = check_u4("u4_mm", a, packed, colsum);
  const int64_t M = a.size(0), N = colsum.numel();
  const std::vector<int32_t> colsum8 = colsum8_of(colsum);
  auto c = torch::empty({M, N}, a.options().dtype(torch::kInt));
#if OM_U4
  u4_gemm(a.data_ptr<uint8_t>(), a.size(1), M, packed.data_ptr<int8_t>(), packed.size(0), packed.size(1),
          colsum8.data(), c.data_ptr<int32_t>(), N);
#endif
  return c;
}

// The W4A4O8 linear after mixed_quant: w4a4o8_epilogue(u4_mm(a, packed, colsum), ...), the same
// numbers bit for bit, with each block of rows finished while its products are in cache (the
// int32 (M, N) product is not written out and read back). Returns float32 (M, N).
torch::Tensor u4_linear(torch::Tensor a, torch::Tensor packed, torch::Tensor colsum, torch::Tensor s_in,
                        torch::Tensor q_out, torch::Tensor s_out, torch::Tensor w_o, torch::Tensor w_scale,
                        torch::Tensor bias) {
  a = check_u4("u4_linear", a, packed, colsum);
  const int64_t M = a.size(0), N = colsum.numel();
  check_epilogue("u4_linear", M, N, s_in, q_out, s_out, w_o, w_scale, bias);
  TORCH_CHECK(q_out.size(1) == a.size(1) || q_out.size(1) + 1 == a.size(1),
              "u4_linear: q_out must have a's ", a.size(1), " columns");
  const std::vector<int32_t> colsum8 = colsum8_of(colsum);
  auto c = torch::empty({M, N}, a.options().dtype(torch::kInt));
#if OM_U4
  int32_t* cp = c.data_ptr<int32_t>();
  const Epilogue e = epilogue_of(cp, reinterpret_cast<float*>(cp), s_in, q_out, s_out, w_o, w_scale, bias);
  const uint8_t* a_p = a.data_ptr<uint8_t>();
  const int8_t* pk = packed.data_ptr<int8_t>();
  const int64_t rows = u4_block_rows(N);
  if ((M + rows - 1) / rows >= 8 * at::get_num_threads()) {
    u4_gemm_epilogue(a_p, a.size(1), M, pk, packed.size(0), packed.size(1), colsum8.data(), cp, N, rows, e);
  } else {
    // too few row blocks to share among the threads (a batch of one image): u4_mm's finer work
    // items (panel x rows), then the epilogue over all rows
    u4_gemm(a_p, a.size(1), M, pk, packed.size(0), packed.size(1), colsum8.data(), cp, N);
    epilogue_all(e, M);
  }
#endif
  return c.view(torch::kFloat);
}

// ---------------------------------------------------------------------------------------------
// s16_pack / s16_mm: W8A8's integer GEMMs on AVX2 CPUs without VNNI or AMX
//
// C (M, N) = float32(q (M, K) @ w (N, K)^T) for int8 codes q and int8 weights w, exactly (the
// integers of torch._int_mm, converted to float32 once, round to nearest even). There,
// torch._int_mm is a slow reference loop and oneDNN's u8 x s8 kernel adds pairs of products in
// saturating int16 (inexact for 8-bit codes), so these products ran as fp32 GEMMs of the codes.
// vpmaddwd multiplies 8 columns x 2 consecutive k of int16 operands and adds each pair into an
// int32 lane: 16 multiply-adds per instruction, against 8 per fp32 FMA, and no pair can overflow
// (|pair| <= 2 * 128 * 128). int32 sums are exact for K < 2^31 / 128^2 = 131,072 products.
//
// Packed weights: panels of 16 columns, (P, K2, 16, 2) int16 with K2 = ceil(K / 2): for each pair
// of k, the 16 columns' two weights side by side, one 64-byte line per pair (zeros past N and K).
// The codes are widened to int16 a block of rows at a time (in cache) as the block starts.

constexpr int64_t kS16Cols = 16;
constexpr int64_t kS16RowBlock = 64;
constexpr int64_t kS16MaxK = 131071;

torch::Tensor s16_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "s16_pack: w must be an int8 (N, K) matrix");
  TORCH_CHECK(w.size(1) <= kS16MaxK, "s16_pack: K = ", w.size(1), " is over ", kS16MaxK,
              " (int32 sums could overflow)");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), K2 = (K + 1) / 2, P = (N + kS16Cols - 1) / kS16Cols;
  auto packed = torch::zeros({P, K2, kS16Cols, 2}, w.options().dtype(torch::kShort));
  const int8_t* wp = w.data_ptr<int8_t>();
  int16_t* pp = packed.data_ptr<int16_t>();
  for (int64_t n = 0; n < N; ++n) {
    int16_t* col = pp + (n / kS16Cols) * K2 * kS16Cols * 2 + (n % kS16Cols) * 2;
    for (int64_t k = 0; k < K; ++k) col[(k / 2) * kS16Cols * 2 + (k & 1)] = wp[n * K + k];
  }
  return packed;
}

#if OM_U4

// acc[r][h] += the pairs [0, n) of rows a + r * lda (int16) against a panel's pairs, for MR rows.
template <int MR>
inline void s16_pairs(const int16_t* a, int64_t lda, const int16_t* w, int64_t n, __m256i (&acc)[4][2]) {
  for (int64_t kp = 0; kp < n; ++kp) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + kp * 32));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + kp * 32 + 16));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, 4);
      const __m256i b = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(b, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(b, w1));
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The 4-row case by hand, as u4_pairs<4>: GCC 12 keeps some accumulators on the stack and copies
// the others every step (measured: 35% of the loop's samples on moves and spills).
template <>
inline void s16_pairs<4>(const int16_t* a, int64_t lda, const int16_t* w, int64_t n, __m256i (&acc)[4][2]) {
  if (n <= 0) return;
  const int16_t* a3 = a + 3 * lda;
  const int64_t ldb = 2 * lda;  // bytes
  __m256i w0, w1, b, t;
  asm volatile(
      "1:\n\t"
      "vmovdqa (%[w]), %[w0]\n\t"
      "vmovdqa 32(%[w]), %[w1]\n\t"
      "vpbroadcastd (%[a]), %[b]\n\t"
      "vpmaddwd %[w0], %[b], %[t]\n\t"
      "vpaddd %[t], %[c00], %[c00]\n\t"
      "vpmaddwd %[w1], %[b], %[t]\n\t"
      "vpaddd %[t], %[c01], %[c01]\n\t"
      "vpbroadcastd (%[a],%[ldb]), %[b]\n\t"
      "vpmaddwd %[w0], %[b], %[t]\n\t"
      "vpaddd %[t], %[c10], %[c10]\n\t"
      "vpmaddwd %[w1], %[b], %[t]\n\t"
      "vpaddd %[t], %[c11], %[c11]\n\t"
      "vpbroadcastd (%[a],%[ldb],2), %[b]\n\t"
      "vpmaddwd %[w0], %[b], %[t]\n\t"
      "vpaddd %[t], %[c20], %[c20]\n\t"
      "vpmaddwd %[w1], %[b], %[t]\n\t"
      "vpaddd %[t], %[c21], %[c21]\n\t"
      "vpbroadcastd (%[a3]), %[b]\n\t"
      "vpmaddwd %[w0], %[b], %[t]\n\t"
      "vpaddd %[t], %[c30], %[c30]\n\t"
      "vpmaddwd %[w1], %[b], %[t]\n\t"
      "vpaddd %[t], %[c31], %[c31]\n\t"
      "add $4, %[a]\n\t"
      "add $4, %[a3]\n\t"
      "add $64, %[w]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]),
        [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c30] "+x"(acc[3][0]), [c31] "+x"(acc[3][1]),
        [a] "+r"(a), [a3] "+r"(a3), [w] "+r"(w), [n] "+r"(n), [w0] "=&x"(w0), [w1] "=&x"(w1), [b] "=&x"(b),
        [t] "=&x"(t)
      : [ldb] "r"(ldb)
      : "memory", "cc");
}
#endif

// Rows [0, MR) of the int16 codes a (row stride lda, whole pairs) against one panel: c[r][j] for
// the panel's first cols columns, as float32.
template <int MR>
inline void s16_tile(const int16_t* a, int64_t lda, const int16_t* panel, int64_t K2, float* c, int64_t ldc,
                     int64_t cols) {
  __m256i acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  s16_pairs<MR>(a, lda, panel, K2, acc);
  for (int r = 0; r < MR; ++r) {
    if (cols == kS16Cols) {
      _mm256_storeu_ps(c + r * ldc, _mm256_cvtepi32_ps(acc[r][0]));
      _mm256_storeu_ps(c + r * ldc + 8, _mm256_cvtepi32_ps(acc[r][1]));
    } else {
      alignas(32) float t[kS16Cols];
      _mm256_store_ps(t, _mm256_cvtepi32_ps(acc[r][0]));
      _mm256_store_ps(t + 8, _mm256_cvtepi32_ps(acc[r][1]));
      for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = t[j];
    }
  }
}

#endif  // OM_U4

// q (M, K) int8 codes, packed from s16_pack of the (N, K) weights: float32(q @ w^T) (M, N).
torch::Tensor s16_mm(torch::Tensor q, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(u4_available(), "s16_mm: this build has no AVX2 and FMA (check u4_available first)");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "s16_mm: q must be an int8 (M, K) matrix");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kShort && packed.is_contiguous() &&
                  packed.size(2) == kS16Cols && packed.size(3) == 2,
              "s16_mm: packed must come from s16_pack");
  const int64_t M = q.size(0), K = q.size(1), K2 = packed.size(1), P = packed.size(0);
  TORCH_CHECK(K2 == (K + 1) / 2, "s16_mm: q has ", K, " columns; the packed weights were made for ", 2 * K2 - 1,
              " or ", 2 * K2);
  TORCH_CHECK(N >= 0 && P == (N + kS16Cols - 1) / kS16Cols, "s16_mm: the packed weights do not have ", N, " rows");
  q = q.contiguous();
  auto c = torch::empty({M, N}, q.options().dtype(torch::kFloat));
#if OM_U4
  if (M == 0 || N == 0) return c;
  const int8_t* qp = q.data_ptr<int8_t>();
  const int16_t* pp = packed.data_ptr<int16_t>();
  float* cp = c.data_ptr<float>();
  const int64_t lda = 2 * K2, blocks = (M + kS16RowBlock - 1) / kS16RowBlock;
  // Work items: blocks of 64 rows, each over all panels or, when there are too few blocks to keep
  // every thread busy (a batch of one image), over one of `groups` runs of panels. A thread widens
  // its block's codes once per item (64 rows x K in L2), then runs the item's panels (64 bytes per
  // pair of k, 24 KB at K = 768: in L1 while the block's 4-row tiles pass over it).
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t groups = blocks >= want ? 1 : std::min(P, (want + blocks - 1) / blocks);
  const int64_t per_group = (P + groups - 1) / groups;
  ouromamba_parallel::parallel_items(blocks * groups, 1, [&](ouromamba_parallel::Items& items) {
    std::vector<int16_t> a(static_cast<size_t>(kS16RowBlock * lda), 0);
    int64_t begin, end;
    while (items.next(begin, end)) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t mb = i / groups, g = i % groups;
        const int64_t m0 = mb * kS16RowBlock, rows = std::min(kS16RowBlock, M - m0);
        for (int64_t r = 0; r < rows; ++r) {
          const int8_t* src = qp + (m0 + r) * K;
          int16_t* dst = a.data() + r * lda;
          for (int64_t k = 0; k < K; ++k) dst[k] = src[k];
        }
        for (int64_t p = g * per_group; p < std::min(P, (g + 1) * per_group); ++p) {
          const int64_t n0 = p * kS16Cols, cols = std::min(kS16Cols, N - n0);
          const int16_t* panel = pp + p * K2 * kS16Cols * 2;
          float* cb = cp + m0 * N + n0;
          int64_t r = 0;
          for (; r + 4 <= rows; r += 4) s16_tile<4>(a.data() + r * lda, lda, panel, K2, cb + r * N, N, cols);
          switch (rows - r) {
            case 3: s16_tile<3>(a.data() + r * lda, lda, panel, K2, cb + r * N, N, cols); break;
            case 2: s16_tile<2>(a.data() + r * lda, lda, panel, K2, cb + r * N, N, cols); break;
            case 1: s16_tile<1>(a.data() + r * lda, lda, panel, K2, cb + r * N, N, cols); break;
            default: break;
          }
        }
      }

    }
  });
#endif
  return c;
}

}  // namespace ouromamba_mixer
