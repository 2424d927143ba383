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

using ouromamba_vec::Vec;
using VF = Vec<float>;
using V = VF::V;
constexpr int W = VF::W;

// Loads / stores of nl <= W lanes; full vectors (the common case) are single instructions (a
// memcpy of constant size), partial ones a library call.
inline V load(const float* p, int nl) {
  V v;
  if (nl == W) {
#if defined(__AVX512F__)
    return (V)_mm512_loadu_ps(p);
#else
    std::memcpy(&v, p, sizeof(V));
#endif
  } else {
    v = VF::splat(0.0f);
    std::memcpy(&v, p, sizeof(float) * nl);
  }
  return v;
}

inline void store(float* p, V v, int nl) {
  if (nl == W) {
#if defined(__AVX512F__)
    _mm512_storeu_ps(p, (__m512)v);
#else
    std::memcpy(p, &v, sizeof(V));
#endif
  } else {
    std::memcpy(p, &v, sizeof(float) * nl);
  }
}

// Round half to even, exact for |x| < 2^22 (callers clamp to the integer range first).
inline V round_even(V x) { return (x + VF::kMagic) - VF::kMagic; }

inline V clamp(V x, float lo, float hi) { return VF::vmin(VF::splat(hi), VF::vmax(VF::splat(lo), x)); }  // NaN stays NaN

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

// Narrow 16 float lanes holding integers in [-127, 127] to int8 and store nl of them.
inline void store_i8(int8_t* p, V v, int nl) {
#if defined(__AVX512F__)
  const __m128i b = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32((__m512)v));
  if (nl == W) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
  } else {
    alignas(16) int8_t tmp[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b);
    std::memcpy(p, tmp, nl);
  }
#else
  // (GCC/Clang vector conversions: a few packing instructions on AVX2, no per-lane loop)
  typedef int8_t I8 __attribute__((vector_size(16)));
  const I8 b = __builtin_convertvector(__builtin_convertvector(v, VF::I), I8);
  std::memcpy(p, &b, static_cast<size_t>(nl));
#endif
}

// Whether any lane of a 0/1 vector is set.
inline bool any_lane(V v) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(0.5f), _CMP_GT_OQ) != 0;
#else
  bool any = false;
  for (int l = 0; l < W; ++l) any |= v[l] > 0.5f;
  return any;
#endif
}

inline float hmax(V v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = std::max(m, v[l]);
  return m;
}

// x: (R, L, C) float32, any strides (channel-contiguous is the fast path); s_in: (L,) float32 (the
// static inlier scale of each time step); qi: inlier qmax (7 for 4 bits); k, n_refresh: the outlier
// rule. Integer mode returns [q_in (R, L, C) int8, q_out (R, L, C) int8, s_out (R, L) float32];
// fake mode returns [y (R, L, C) float32], the dequantized values (outliers at 8 bits with their
// per-token scale, inliers at qi).
std::vector<torch::Tensor> mixed_quant(torch::Tensor x, torch::Tensor s_in, int64_t qi, double k,
                                       int64_t n_refresh, bool fake) {
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
  const int64_t nb = (C + W - 1) / W;
  const float kf = static_cast<float>(k);
  const float qif = static_cast<float>(qi);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    // One row of channels as nb vectors; the outlier mask as 0/1 lanes (the window's running OR,
    // or this step's flags when n_refresh <= 1); padding lanes are 0 and never flagged.
    std::vector<V> row(static_cast<size_t>(nb)), mask(static_cast<size_t>(nb));
    std::vector<float> gather(static_cast<size_t>(nb * W), 0.0f);
    const V zero = VF::splat(0.0f), one = VF::splat(1.0f);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t t = 0; t < L; ++t) {
        const float* src = xp + r * sr + t * st;
        if (sc != 1) {
          for (int64_t c = 0; c < C; ++c) gather[c] = src[c * sc];
          src = gather.data();
        }
        // |x| statistics over channels: mean, population std (two passes), max. Lane partial
        // sums in float (at most C / 16 terms each), lanes added in double.
        V sumv = zero, amax = zero;
        for (int64_t j = 0; j < nb; ++j) {
          const int nl = static_cast<int>(std::min<int64_t>(W, C - j * W));
          row[j] = load(src + j * W, nl);
          const V a = VF::abs(row[j]);
          amax = VF::vmax(a, amax);
          sumv += a;
        }
        double sum = 0.0;
        for (int l = 0; l < W; ++l) sum += sumv[l];
        const float mean = static_cast<float>(sum / static_cast<double>(C));
        V ssv = zero;
        for (int64_t j = 0; j < nb; ++j) {
          const int nl = static_cast<int>(std::min<int64_t>(W, C - j * W));
          V d = VF::abs(row[j]) - mean;
          if (nl < W) {
            for (int l = nl; l < W; ++l) d[l] = 0.0f;
          }
          ssv += d * d;
        }
        double ss = 0.0;
        for (int l = 0; l < W; ++l) ss += ssv[l];
        const float std_ = std::sqrt(static_cast<float>(ss / static_cast<double>(C)));
        const float theta = mean + kf * std_;
        const float s = sp[t];
        const bool trigger = hmax(amax) / qif > s;
        if (n_refresh <= 1 || t % n_refresh == 0) std::fill(mask.begin(), mask.end(), zero);
        // Outlier scale: max |x| over the flagged channels / 127 (at least EPS).
        V omaxv = zero;
        for (int64_t j = 0; j < nb; ++j) {
          const V a = VF::abs(row[j]);
          if (trigger) mask[j] = a > theta ? one : mask[j];
          omaxv = mask[j] > 0.5f && a > omaxv ? a : omaxv;
        }
        const float so = std::max(hmax(omaxv) / 127.0f, 1e-8f);
        const int64_t o = (r * L + t) * C;
        for (int64_t j = 0; j < nb; ++j) {
          const int nl = static_cast<int>(std::min<int64_t>(W, C - j * W));
          const V v = row[j];
          const auto out = mask[j] > 0.5f;
          const V vi = round_even(clamp((out ? zero : v) / s, -qif, qif));
          const bool any_out = any_lane(mask[j]);
          // most vectors hold no outlier: their 8-bit codes are all 0 without dividing
          const V vo = any_out ? round_even(clamp((out ? v : zero) / so, -127.0f, 127.0f)) : zero;
          if (fake) {
            store(y.data_ptr<float>() + o + j * W, out ? vo * so : vi * s, nl);
          } else {
            store_i8(q_in.data_ptr<int8_t>() + o + j * W, vi, nl);
            store_i8(q_out.data_ptr<int8_t>() + o + j * W, vo, nl);
          }
        }
        if (!fake) s_out.data_ptr<float>()[r * L + t] = so;
      }
    }
  });
  if (fake) return {y};
  return {q_in, q_out, s_out};
}

// ---------------------------------------------------------------------------------------------
// w4a4o8_epilogue

// The W4A4O8 linear's epilogue in one pass over the (M, N) output, in place of the inlier
// accumulator acc (M, N): int32 (reinterpreted as float32 and returned), or float32 holding the
// same integers (from oneDNN's u8 x s8 GEMM on CPUs without VNNI):
//   y = ((acc * s_in[m] + (q_out[m, :] @ w_t) * s_out[m]) * w_scale) + bias
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
  for (const auto* t : {&s_in, &s_out}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == M && t->scalar_type() == torch::kFloat,
                "w4a4o8_epilogue: row scales");
  }
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
  const int64_t nb = (N + W - 1) / W;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<V> oacc(static_cast<size_t>(nb));
    for (int64_t m = begin; m < end; ++m) {
      const int8_t* q = qp + m * K;
      bool any = false;
      for (int64_t c = 0; c < K; ++c) {
        if (q[c] == 0) continue;
        if (!any) {
          std::fill(oacc.begin(), oacc.end(), VF::splat(0.0f));
          any = true;
        }
        const float qc = static_cast<float>(q[c]);
        const int8_t* wr = wp + c * N;
        for (int64_t j = 0; j < nb; ++j) {
          const int nl = static_cast<int>(std::min<int64_t>(W, N - j * W));
          V wv;
#if defined(__AVX512F__)
          if (nl == W) {
            wv = (V)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + j * W))));
          } else
#endif
          {
            // sign-extend 16 int8 lanes (vpmovsxbd + vcvtdq2ps without AVX-512)
            typedef int8_t I8 __attribute__((vector_size(16)));
            I8 b = {};
            std::memcpy(&b, wr + j * W, static_cast<size_t>(nl));
            wv = __builtin_convertvector(__builtin_convertvector(b, VF::I), V);
          }
          oacc[j] += qc * wv;
        }
      }
      const float si = sip[m], so = sop[m];
      int32_t* ar = ap + m * N;
      float* yr = yp + m * N;
      for (int64_t j = 0; j < nb; ++j) {
        const int nl = static_cast<int>(std::min<int64_t>(W, N - j * W));
        V v;
        if (acc_float) {
          v = load(yr + j * W, nl) * si;
        } else {
          VF::I iv = {};
          if (nl == W) {
            std::memcpy(&iv, ar + j * W, sizeof(iv));
          } else {
            std::memcpy(&iv, ar + j * W, sizeof(int32_t) * nl);
          }
          v = __builtin_convertvector(iv, V) * si;
        }
        if (any) v = v + oacc[j] * so;
        v = v * load(wsp + j * W, nl);
        if (bp) v = v + load(bp + j * W, nl);
        store(yr + j * W, v, nl);
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
