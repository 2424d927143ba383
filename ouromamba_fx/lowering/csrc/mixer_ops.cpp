// CPU kernels for the parts of a quantized Mamba mixer around its GEMMs and its scan:
//
// conv_silu       depthwise causal conv1d + SiLU, with the fake quantization of its input fused
//                 in (one pass over memory instead of quantize -> conv -> slice -> SiLU), reading
//                 the input where it lies (a channel-contiguous slice of in_proj's output, no
//                 transposed copy), optionally in reverse time order (the backward direction of
//                 a bidirectional Vim block: conv(flip(x)) without materialising flip(x)), and
//                 writing channel-contiguous output, the layout x_proj and the scan read fastest.
// mixed_quant     OuroMamba-Quant's mixed-precision activation quantization in one pass per
//                 sample: per time-step |x| statistics over channels (mean, population std, max),
//                 the outlier rule with its window of n_refresh steps, then the int8 codes of the
//                 inliers (static per-step scale) and of the outliers (dynamic per-token scale),
//                 or their dequantized values (fake quantization).
// w4a4o8_epilogue the W4A4O8 linear's epilogue over the int32 inlier accumulator, with each
//                 token's few outlier channels added as exact vector axpys instead of a GEMM.
//
// Semantics: ouromamba_fx/lowering/mixer.py (module docstring). Both kernels compute in float32;
// quantization divides by the scale (as ouromamba::quantize does) and rounds half to even, so
// codes equal the reference's except where float rounding elsewhere moves a value across a
// rounding boundary or an outlier threshold.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// ---------------------------------------------------------------------------------------------
// conv_silu

// x: (B, D, L) float32 with channel stride 1; w: (K, D) (the conv weight transposed); bias (D,)
// or empty; scale / zp: (L,) or (1,) float32, or empty (no input quantization). Returns (B, L, D).
torch::Tensor conv_silu(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor scale,
                        torch::Tensor zp, int64_t qmin, int64_t qmax, bool reverse) {
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
  at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> ring(static_cast<size_t>(K * nb));
    auto quantized_row = [&](int64_t b, int64_t t, V* row) {
      const float* src = xp + b * sb + (reverse ? L - 1 - t : t) * st;
      float s = 1.0f, lo = 0.0f, hi = 0.0f;
      if (fq) {
        s = sp[per_step ? t : 0];
        const float z = zpp[per_step ? t : 0];
        lo = float(qmin) - z;
        hi = float(qmax) - z;
      }
      for (int64_t j = 0; j < nb; ++j) {
        const int nl = static_cast<int>(std::min<int64_t>(W, D - j * W));
        V v = load(src + j * W, nl);
        if (fq) v = round_even(clamp(v / s, lo, hi)) * s;
        row[j] = v;
      }
    };
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
        quantized_row(b, t, ring.data() + (t % K) * nb);
        float* dst = op + (b * L + t) * D;
        const V* taps[16];  // taps[k]: the quantized row K - 1 - k steps back
        for (int64_t k = 0; k < K; ++k) taps[k] = ring.data() + ((t - (K - 1) + k + K) % K) * nb;
        for (int64_t j = 0; j < nb; ++j) {
          const int nl = static_cast<int>(std::min<int64_t>(W, D - j * W));
          V acc = bp ? load(bp + j * W, nl) : VF::splat(0.0f);
          for (int64_t k = 0; k < K; ++k) acc += load(wp + k * D + j * W, nl) * taps[k][j];
          acc = acc / (1.0f + VF::exp(-acc));  // SiLU
          store(dst + j * W, acc, nl);
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// mixed_quant

// |x| statistics over one time step's channels: mean, population std (two passes), max. The
// reductions are vectorized by the compiler (omp simd: lane partial sums at the CPU's width).
struct RowStats {
  float mean, std, amax;
};
inline RowStats row_stats(const float* __restrict__ x, int64_t C) {
  float sum = 0.0f, amax = 0.0f;
#pragma omp simd reduction(+ : sum) reduction(max : amax)
  for (int64_t c = 0; c < C; ++c) {
    const float a = std::fabs(x[c]);
    sum += a;
    amax = a > amax ? a : amax;
  }
  const float mean = sum / static_cast<float>(C);
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < C; ++c) {
    const float d = std::fabs(x[c]) - mean;
    ss += d * d;
  }
  return {mean, std::sqrt(ss / static_cast<float>(C)), amax};
}

// mask[c] |= -1 where |x[c]| > theta (the outlier rule's flags of this step).
inline void flag_row(const float* __restrict__ x, int32_t* __restrict__ mask, int64_t C, float theta) {
  for (int64_t c = 0; c < C; ++c) mask[c] |= -static_cast<int32_t>(std::fabs(x[c]) > theta);
}

// max |x| over the flagged channels (0 if none; a NaN |x| is skipped), and whether any is flagged.
inline float flagged_max(const float* __restrict__ x, const int32_t* __restrict__ mask, int64_t C, bool& any) {
  float m = 0.0f;
  int32_t flags = 0;
#pragma omp simd reduction(max : m) reduction(| : flags)
  for (int64_t c = 0; c < C; ++c) {
    const float a = keep1(std::fabs(x[c]), mask[c]);
    m = a > m ? a : m;
    flags |= mask[c];
  }
  any = flags != 0;
  return m;
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

// fake quantization: outliers at qmax qo with scale so, the rest at qi with scale s (qo is an
// argument, not the constant 127: with constant bounds GCC 12 kept the clamps as branches).
__attribute__((noinline)) void fake_row(const float* __restrict__ x, const int32_t* __restrict__ mask,
                                        float* __restrict__ y, int64_t C, float s, float qi, float so, float qo) {
  for (int64_t c = 0; c < C; ++c) {
    const float vi = round_even1(clamp1(keep1(x[c], ~mask[c]) / s, -qi, qi)) * s;
    const float vo = round_even1(clamp1(keep1(x[c], mask[c]) / so, -qo, qo)) * so;
    int32_t a, b;
    std::memcpy(&a, &vo, sizeof(a));
    std::memcpy(&b, &vi, sizeof(b));
    a = (a & mask[c]) | (b & ~mask[c]);
    std::memcpy(&y[c], &a, sizeof(a));
  }
}


// x: (R, L, C) float32, any strides (channel-contiguous is the fast path); s_in: (L,) float32 (the
// static inlier scale of each time step); qi: inlier qmax (7 for 4 bits); k, n_refresh: the outlier
// rule. Integer mode returns [q_in (R, L, C) int8, q_out (R, L, C) int8, s_out (R, L) float32]
// (with u8_inliers, q_in is uint8 holding the codes + 128); fake mode returns [y (R, L, C)
// float32], the dequantized values (outliers at 8 bits with their per-token scale, inliers at qi).
std::vector<torch::Tensor> mixed_quant(torch::Tensor x, torch::Tensor s_in, int64_t qi, double k,
                                       int64_t n_refresh, bool fake, bool u8_inliers) {
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
  const int32_t in_offset = u8_inliers ? 128 : 0;
  float* yp = fake ? y.data_ptr<float>() : nullptr;
  int8_t* qip = fake ? nullptr : q_in.data_ptr<int8_t>();
  int8_t* qop = fake ? nullptr : q_out.data_ptr<int8_t>();
  float* sop = fake ? nullptr : s_out.data_ptr<float>();
  // Work items: (row, chunk of time steps); a chunk holds whole windows of n_refresh steps (the
  // mask is reset at each window's first step), so items are independent.
  const int64_t window = std::max<int64_t>(n_refresh, 1);
  const int64_t chunk = window * ((16 + window - 1) / window);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  at::parallel_for(0, R * nchunks, 1, [&](int64_t begin, int64_t end) {
    // Every pass over a step's channels is a plain loop (row_stats .. codes_row above), which
    // the compiler vectorizes at the CPU's own width. The outlier mask: -1 / 0 per channel, the
    // window's running OR (or this step's flags when n_refresh <= 1).
    // Channel-strided x is first copied into (chunk, C) rows: time-contiguous x (a transposed
    // (batch, C, L) tensor, e.g. the scan's output before out_proj) as runs of a chunk's steps
    // per channel, one or two cache lines each; any other layout element by element.
    std::vector<int32_t> mask_buf(static_cast<size_t>(C));
    std::vector<float> gather(sc != 1 ? static_cast<size_t>(chunk * C) : 0);
    int32_t* __restrict__ mask = mask_buf.data();
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
        const RowStats stats = row_stats(src, C);
        const float theta = stats.mean + kf * stats.std;
        const float s = sp[t];
        const bool trigger = stats.amax / qif > s;
        if (n_refresh <= 1 || t % n_refresh == 0) std::fill(mask, mask + C, 0);
        if (trigger) flag_row(src, mask, C, theta);
        bool any_out = false;
        const float omax = flagged_max(src, mask, C, any_out);
        const float so = std::max(omax / 127.0f, 1e-8f);
        const int64_t o = (r * L + t) * C;
        if (fake) {
          fake_row(src, mask, yp + o, C, s, qif, so, 127.0f);
        } else {
          codes_row(src, mask, qip + o, C, s, qif, false, in_offset);
          if (any_out) {
            codes_row(src, mask, qop + o, C, so, 127.0f, true, 0);
          } else {
            std::memset(qop + o, 0, static_cast<size_t>(C));
          }
          sop[r * L + t] = so;
        }
      }
    }
  });
  if (fake) return {y};
  return {u8_inliers ? q_in.view(torch::kUInt8) : q_in, q_out, s_out};
}

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

// o[n] += a * w[n] over n < N, the int8 weights widened to float (vectorized by the compiler).
inline void axpy_i8(float* __restrict__ o, float a, const int8_t* __restrict__ w, int64_t N) {
  for (int64_t n = 0; n < N; ++n) o[n] += a * static_cast<float>(w[n]);
}

// ---------------------------------------------------------------------------------------------
// w4a4o8_epilogue

// The W4A4O8 linear's epilogue in one pass over the (M, N) output, in place of the inlier
// accumulator acc (M, N): int32 (reinterpreted as float32 and returned), or float32 holding the
// same integers (from oneDNN's u8 x s8 GEMM on CPUs without VNNI):
//   y = ((acc * s_in[m % L] + (q_out[m, :] @ w_t) * s_out[m]) * w_scale) + bias
// (rows m are (batch, step) pairs, s_in holds the L per-step inlier scales)
// q_out (M, K) int8 holds the outlier codes (zero off the outlier channels); per row only its
// non-zero codes are visited, each a vector axpy over N of w_t (K, N) int8. Those sums are of
// integers below 2^24 (K * 127 * 8 at most), exact in float32 in any order: the same numbers as an
// int32 GEMM of the outliers. Rows with no outlier skip that term (it is exactly 0).
torch::Tensor w4a4o8_epilogue(torch::Tensor acc, torch::Tensor s_in, torch::Tensor q_out, torch::Tensor s_out,
                              torch::Tensor w_t, torch::Tensor w_scale, torch::Tensor bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() &&
                  (acc.scalar_type() == torch::kInt || acc.scalar_type() == torch::kFloat),
              "w4a4o8_epilogue: acc must be a contiguous int32 or float32 (M, N) matrix");
  const bool acc_float = acc.scalar_type() == torch::kFloat;
  const int64_t M = acc.size(0), N = acc.size(1), K = q_out.size(1);
  TORCH_CHECK(q_out.dim() == 2 && q_out.is_contiguous() && q_out.scalar_type() == torch::kInt8 && q_out.size(0) == M,
              "w4a4o8_epilogue: q_out");
  TORCH_CHECK(w_t.dim() == 2 && w_t.is_contiguous() && w_t.scalar_type() == torch::kInt8 && w_t.size(0) == K &&
                  w_t.size(1) == N, "w4a4o8_epilogue: w_t");
  TORCH_CHECK(s_out.is_contiguous() && s_out.numel() == M && s_out.scalar_type() == torch::kFloat,
              "w4a4o8_epilogue: s_out must be float32 with one value per row");
  const int64_t steps = s_in.numel();
  TORCH_CHECK(s_in.is_contiguous() && s_in.scalar_type() == torch::kFloat && steps > 0 && M % steps == 0,
              "w4a4o8_epilogue: s_in must be float32 with one value per time step (rows are (batch, step))");
  TORCH_CHECK(w_scale.is_contiguous() && w_scale.numel() == N && w_scale.scalar_type() == torch::kFloat,
              "w4a4o8_epilogue: w_scale");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.is_contiguous() && bias.numel() == N && bias.scalar_type() == torch::kFloat),
              "w4a4o8_epilogue: bias");
  int32_t* ap = reinterpret_cast<int32_t*>(acc.data_ptr());
  float* yp = reinterpret_cast<float*>(ap);
  const int8_t* qp = q_out.data_ptr<int8_t>();
  const int8_t* wp = w_t.data_ptr<int8_t>();
  const float* sip = s_in.data_ptr<float>();
  const float* sop = s_out.data_ptr<float>();
  const float* wsp = w_scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  // Plain loops over N with restrict pointers: the compiler vectorizes them at the CPU's own
  // width (GCC lowers the 64-byte vector types poorly without AVX-512: int8 widening and scalar
  // broadcasts went lane by lane through the stack).
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> oacc_buf(static_cast<size_t>(N));
    float* __restrict__ oacc = oacc_buf.data();
    for (int64_t m = begin; m < end; ++m) {
      const int8_t* q = qp + m * K;
      bool any = false;
      // the row's non-zero codes, found 32 bytes at a time (a row holds only a few)
      for (int64_t c0 = 0; c0 < K; c0 += 32) {
        uint32_t bits = nonzero_bits(q + c0, static_cast<int>(std::min<int64_t>(32, K - c0)));
        while (bits) {
          const int64_t c = c0 + __builtin_ctz(bits);
          bits &= bits - 1;
          if (!any) {
            std::fill(oacc, oacc + N, 0.0f);
            any = true;
          }
          axpy_i8(oacc, static_cast<float>(q[c]), wp + c * N, N);
        }
      }
      float* __restrict__ yr = yp + m * N;
      const float si = sip[m % steps], so = sop[m];
      if (acc_float) {
        if (any) {
          for (int64_t n = 0; n < N; ++n) yr[n] = (yr[n] * si + oacc[n] * so) * wsp[n];
        } else {
          for (int64_t n = 0; n < N; ++n) yr[n] = (yr[n] * si) * wsp[n];
        }
      } else {
        const int32_t* __restrict__ ar = ap + m * N;
        if (any) {
          for (int64_t n = 0; n < N; ++n) yr[n] = (static_cast<float>(ar[n]) * si + oacc[n] * so) * wsp[n];
        } else {
          for (int64_t n = 0; n < N; ++n) yr[n] = (static_cast<float>(ar[n]) * si) * wsp[n];
        }
      }
      if (bp) {
        for (int64_t n = 0; n < N; ++n) yr[n] += bp[n];
      }
    }
  });
  return acc_float ? acc : acc.view(torch::kFloat);
}

}  // namespace ouromamba_mixer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_silu", &ouromamba_mixer::conv_silu,
        "depthwise causal conv1d + SiLU (+ input fake quantization), channel-contiguous output");
  m.def("mixed_quant", &ouromamba_mixer::mixed_quant,
        "OuroMamba-Quant mixed-precision quantization: outlier rule, int8 codes or dequantized values");
  m.def("w4a4o8_epilogue", &ouromamba_mixer::w4a4o8_epilogue,
        "W4A4O8 epilogue in place of the int32 inlier accumulator: scales, sparse outlier term, bias");
}
