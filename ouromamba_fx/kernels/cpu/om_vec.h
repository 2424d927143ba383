// Vector types and elementary functions shared by the CPU kernels of ouromamba_fx
// (selective_scan.cpp, selective_scan_q.cpp, mixer_ops.cpp).
//
// Vec<T>::V is a GCC/Clang vector of W = 64 bytes / sizeof(T) lanes (16 floats, 8 doubles), so
// every operation below is one AVX-512 instruction (or a short sequence of narrower ones when the
// build machine has no AVX-512); VecF<Bytes> is the same for other widths of float vectors. float32 uses the branch-free vector exp below (about 1 ulp) and,
// for the scans' decays exp(dt * A) = 2^(dt * A * log2 e), the shorter exp2 (under 2 ulp);
// float64 falls back to libm lane by lane (the reference dtype for tests, not a fast path).
//
// The Python loaders put a hash of this header into each extension's name, so editing it
// rebuilds every kernel that includes it.

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

// Keeps the compiler from carrying values in registers across this point (and so from contracting
// a product before it with an addition after it into one multiply-add): where a kernel must round
// each operation as the graph it replaces does.
#define OM_NO_CONTRACT() __asm__ __volatile__("" ::: "memory")

namespace ouromamba_vec {
// ---------------------------------------------------------------------------------------------
// Vector types and elementary functions

template <typename T>
struct Vec;

// 64-byte float vectors without AVX-512 live in two 256-bit registers. GCC lowers comparisons
// and ?: on them lane by lane, with branches (seen in the assembly of GCC 12 for AVX2: a scalar
// vcomiss per lane), so min / max / selects of the 64-byte type go through the two halves
// explicitly there. (Arithmetic is split into 256-bit instructions by the compiler itself, but
// whole-vector moves still go through the stack: hot loops that need not be 16 lanes wide use
// VecF<kNativeBytes>, one register of this CPU.)
#if defined(__AVX__) && !defined(__AVX512F__)
namespace halves {
// (templates, so that VecF's calls of them are checked only where VecF<64> is instantiated)
typedef float F __attribute__((vector_size(64)));
typedef int32_t I __attribute__((vector_size(64)));
union HF {
  F v;
  __m256 h[2];
};
union HI {
  I v;
  __m256i h[2];
};
template <typename T, typename Op>
inline T per_half(T a, T b, Op op) {  // op on each 256-bit half
  HF x{a}, y{b};
  x.h[0] = op(x.h[0], y.h[0]);
  x.h[1] = op(x.h[1], y.h[1]);
  return x.v;
}
template <typename T>
inline T vmin(T a, T b) {
  return per_half(a, b, [](__m256 p, __m256 q) { return _mm256_min_ps(p, q); });
}
template <typename T>
inline T vmax(T a, T b) {
  return per_half(a, b, [](__m256 p, __m256 q) { return _mm256_max_ps(p, q); });
}
template <typename T>
inline T keep_nlt(T v, T x, T lo) {  // v where x >= lo or x is NaN, else +0
  HF r{v}, a{x}, b{lo};
  r.h[0] = _mm256_and_ps(r.h[0], _mm256_cmp_ps(a.h[0], b.h[0], _CMP_NLT_UQ));
  r.h[1] = _mm256_and_ps(r.h[1], _mm256_cmp_ps(a.h[1], b.h[1], _CMP_NLT_UQ));
  return r.v;
}
template <typename R, typename T>
inline R gt(T a, T b) {  // a > b (false where either is NaN)
  HF x{a}, y{b};
  HI r;
  r.h[0] = _mm256_castps_si256(_mm256_cmp_ps(x.h[0], y.h[0], _CMP_GT_OQ));
  r.h[1] = _mm256_castps_si256(_mm256_cmp_ps(x.h[1], y.h[1], _CMP_GT_OQ));
  return r.v;
}
}  // namespace halves
#endif

// The widest vector this CPU holds in one register (the width loops over plain arrays are best
// written at when they need no fixed lane count).
#if defined(__AVX512F__)
constexpr int kNativeBytes = 64;
#elif defined(__AVX__)
constexpr int kNativeBytes = 32;
#else
constexpr int kNativeBytes = 16;
#endif

// float vectors of Bytes bytes (W = Bytes / 4 lanes). (The types are spelled out per width:
// GCC does not treat a vector_size that depends on a template parameter as a vector.)
template <int Bytes>
struct VecTypes;
template <>
struct VecTypes<64> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct VecTypes<32> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};

template <int Bytes>
struct VecF {
  static constexpr int W = Bytes / 4;
  typedef typename VecTypes<Bytes>::V V;
  typedef typename VecTypes<Bytes>::I I;
#if defined(__AVX512F__)
  static constexpr bool k512 = Bytes == 64;  // one AVX-512 register: intrinsics below
#else
  static constexpr bool k512 = false;
#endif
#if defined(__AVX__) && !defined(__AVX512F__)
  static constexpr bool kHalves = Bytes == 64;  // two AVX registers: namespace halves
#else
  static constexpr bool kHalves = false;
#endif

  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: x + M - M rounds half to even
  static inline V splat(float s) { return s - V{}; }  // (s - 0 is exactly s, also for -0)

  // Lane-wise min / max with x86 semantics (b where either is NaN).
  static inline V vmin(V a, V b) {
#if defined(__AVX512F__)
    if constexpr (k512) return (V)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    if constexpr (kHalves) return halves::vmin(a, b);
#endif
#if defined(__AVX__)
    if constexpr (Bytes == 32) return (V)_mm256_min_ps((__m256)a, (__m256)b);  // (GCC: compare + blend)
#endif
    return a < b ? a : b;
  }
  static inline V vmax(V a, V b) {
#if defined(__AVX512F__)
    if constexpr (k512) return (V)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    if constexpr (kHalves) return halves::vmax(a, b);
#endif
#if defined(__AVX__)
    if constexpr (Bytes == 32) return (V)_mm256_max_ps((__m256)a, (__m256)b);
#endif
    return a > b ? a : b;
  }
  // v where x >= lo or x is NaN, else +0
  static inline V keep_nlt(V v, V x, V lo) {
#if defined(__AVX__) && !defined(__AVX512F__)
    if constexpr (kHalves) return halves::keep_nlt(v, x, lo);
#endif
    return x < lo ? splat(0.0f) : v;
  }
  // Lane masks (I lanes all ones where true, 0 where false) and bitwise selects on them.
  static inline I gt(V a, V b) {  // a > b (false where either is NaN)
#if defined(__AVX__) && !defined(__AVX512F__)
    if constexpr (kHalves) return halves::gt<I>(a, b);
#endif
    return a > b;
  }
  static inline V select(I m, V a, V b) { return (V)(((I)a & m) | ((I)b & ~m)); }  // a where m, else b

  // exp(x): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r fitted
  // for minimal relative error (< 1e-7 in float arithmetic), then scaling by 2^k. Results below
  // FLT_MIN are flushed to 0, large x gives +inf, NaN propagates.
  static constexpr float kLo = -87.33654022216797f;  // ln(FLT_MIN)
  static constexpr float kHi = 88.8f;                // above ln(FLT_MAX): result overflows to +inf
  static constexpr float kExpPoly[7] = {0.0013836845755577087f, 0.008374815806746483f, 0.04166822507977486f,
                                         0.16666419804096222f,  0.49999991059303284f, 1.0f, 1.0f};  // highest first
  template <int K>
  static inline void exp_poly_k(const V* r, V* p) {  // (K chains: see exp_k)
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) p[k] = splat(kExpPoly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < 7; ++i) {
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + kExpPoly[i];
    }
  }
  static inline V exp_poly(V r) {
    V p;
    exp_poly_k<1>(&r, &p);
    return p;
  }
  static inline V exp(V x) {
#if defined(__AVX512F__)
    if constexpr (k512) {
      // AVX-512: rounding and the scaling by 2^k are single instructions (vrndscaleps, vscalefps).
      const __m512 xv = (__m512)x;
      const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(kLo), _CMP_NLT_UQ);  // x >= lo or NaN
      const __m512 xc = _mm512_min_ps(_mm512_set1_ps(kHi), xv);                        // NaN stays NaN
      const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.4426950408889634f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693359375f), xc);  // ln2, exact high part ...
      r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(-2.12194440e-4f), r);     // ... and the correction
      const __m512 p = (__m512)exp_poly((V)r);
      return (V)_mm512_maskz_scalef_ps(keep, p, kf);
    }
#endif
    V out;
    exp_k<1>(&x, &out);
    return out;
  }
  // 2^x = 2^k * 2^r with k = round(x), |r| <= 1/2, and a degree-5 polynomial for 2^r fitted for
  // minimal relative error (< 1.7e-7 in float arithmetic): the scans' decays exp(dt A) computed as
  // exp2(dt * (A log2 e)) with log2 e folded into A once per block. Shorter than exp (no
  // Cody-Waite split, one polynomial term less), which matters in the scan's inner loop, where it
  // runs once per channel, state and time step. x below -127 gives 0 (NaN propagates); above 127
  // the generic path saturates at 2^127.5 (decays have x <= 0), the AVX-512 path gives +inf.
  static constexpr float kLog2e = 1.4426950408889634f;
  static constexpr float kExp2Poly[6] = {0.0013267117319628596f, 0.009671597741544247f, 0.05550726503133774f,
                                          0.24022240936756134f, 0.6931470036506653f, 1.0f};  // highest first
  // The fast decays of the lowered quantized models (kFast below): 2^r = 1 + r (c1 + r (c2 + r (c3
  // + r c4))), degree 4, fitted for minimal relative error with 2^0 = 1 exact (so a decay near 1
  // has no bias that would compound over the steps): under 2.9e-6 relative in float arithmetic,
  // against the 8-bit quantization steps (about 4e-3) of the inputs it sees there. One
  // multiply-add fewer per decay than the degree-5 polynomial. (Degree 3, 1.02e-4 relative, moved
  // too many predictions of a lowered W8A8 model away from its reference graph.)
  static constexpr float kExp2Poly4[5] = {0.009582852944731712f, 0.055906426161527634f, 0.24024099111557007f,
                                          0.6931241750717163f, 1.0f};
  template <bool kFast = false>
  static inline V exp2_poly(V r) {
    constexpr const float* c = kFast ? kExp2Poly4 : kExp2Poly;
    constexpr int n = kFast ? 5 : 6;
    V p = splat(c[0]);
#pragma GCC unroll 8
    for (int i = 1; i < n; ++i) p = p * r + c[i];
    return p;
  }
  template <bool kFast = false>
  static inline V exp2(V x) {
#if defined(__AVX512F__)
    if constexpr (k512) {
      const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.0f), _mm512_min_ps(_mm512_set1_ps(150.0f), (__m512)x));
      const __m512 kf = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 p = (__m512)exp2_poly<kFast>((V)_mm512_sub_ps(xc, kf));
      return (V)_mm512_scalef_ps(p, kf);
    }
#endif
    V out;
    exp2_k<1, false, kFast>(&x, &out);
    return out;
  }
  // The generic path of exp2 for K vectors, each step applied to all K before the next (exp2 is
  // K = 1). One decay at a time, each is a chain of about 12 dependent operations that fills the
  // out-of-order window before the next can start; K chains side by side keep the pipes busier.
  // kNonPos: every x is known to be <= 0 or NaN (the scans' decays with dt >= 0 and A <= 0),
  // where the upper clamp changes nothing and is left out. NaN stays NaN.
  // kFast: the degree-4 polynomial (kExp2Poly4).
  template <int K, bool kNonPos, bool kFast = false>
  static inline void exp2_k(const V* x, V* out) {
    constexpr const float* c = kFast ? kExp2Poly4 : kExp2Poly;
    constexpr int deg = kFast ? 4 : 5;
    V t[K], r[K], p[K];
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) {
      r[k] = vmax(splat(-127.0f), kNonPos ? x[k] : vmin(splat(127.0f), x[k]));
      // t = 1.5 * 2^23 + 127 + k: its low mantissa bits hold k + 127, which shifted into the
      // exponent field is 2^k (and +0 for k = -127)
      t[k] = r[k] + (kMagic + 127.0f);
    }
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) {
      r[k] = r[k] - (t[k] - (kMagic + 127.0f));
      p[k] = splat(c[0]);
    }
#pragma GCC unroll 8
    for (int i = 1; i <= deg; ++i) {
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + c[i];
    }
#pragma GCC unroll 16
    for (int k = 0; k < K; ++k) out[k] = p[k] * (V)(((I)t[k]) << 23);
  }
  // 2^x for x known to lie in [-125, 0] (checked per block by the caller; never NaN): exp2_k's
  // operations without its clamps, and 2^k applied by adding k to the exponent field of p
  // instead of multiplying p by 2^k. For such k that product is exact (p is within [2^-0.5,
  // 2^0.5], so p * 2^k stays a normal float): the same bits as exp2_k, without the clamp and with
  // the multiply replaced by an integer addition. The bias 127 of exp2_k's shifted k is folded
  // away: t = x + (1.5 * 2^23 - 1) holds k - 1 in its low bits (the same k as exp2_k's offset
  // 127, both odd, so a tie rounds the same way; the shift drops the magic's own bits), and the
  // polynomial runs on doubled coefficients, which gives exactly 2p (scaling by 2 commutes with
  // each rounding), so bits(2p) + ((k - 1) << 23) is bits(p) + (k << 23) with one operation less.
  template <int N>
  struct Doubled {
    float c[N];
    constexpr explicit Doubled(const float (&a)[N]) : c{} {
      for (int i = 0; i < N; ++i) c[i] = 2.0f * a[i];
    }
  };
  static constexpr Doubled<6> kExp2Poly2{kExp2Poly};
  static constexpr Doubled<5> kExp2Poly4x2{kExp2Poly4};
  template <bool kFast = false>
  static inline V exp2_in_range(V x) {
    constexpr const float* c = kFast ? kExp2Poly4x2.c : kExp2Poly2.c;
    constexpr int deg = kFast ? 4 : 5;
    const V t = x + (kMagic - 1.0f);  // low mantissa bits: k - 1
    const V r = x - (t - (kMagic - 1.0f));
    V p = splat(c[0]);
#pragma GCC unroll 8
    for (int i = 1; i <= deg; ++i) p = p * r + c[i];
    return (V)((I)p + (((I)t) << 23));  // bits(2p) + ((k - 1) << 23)
  }
  // 2^(a * b) where every product a * b is known to lie in [-kProdRange, kProdRange] or be NaN
  // (the scans' decays dt * (A log2 e), checked per block with prod_in_range). On AVX-512 the
  // rounding comes out of the product itself: t = a * b + 1.5 * 2^23 in one multiply-add puts
  // k = round(a * b) in t's low mantissa bits, k = t - 1.5 * 2^23 exactly, and r = a * b - k is
  // a second multiply-add (one rounding, from the exact product: at least as accurate as rounding
  // a * b first). Four instructions fewer per decay than exp2(a * b) (product, two clamps,
  // vrndscaleps, which is two micro-ops, and a subtraction against two multiply-adds and a
  // subtraction): the same polynomial and vscalefps, so the same accuracy (under 2 ulp). Other
  // builds: exp2(a * b).
  static constexpr float kProdRange = 4194304.0f;  // 2^22: a * b + 1.5 * 2^23 stays in [2^23, 2^24)
  template <bool kFast = false>
  static inline V exp2_prod(V a, V b) {
#if defined(__AVX512F__)
    if constexpr (k512) {
      const __m512 M = _mm512_set1_ps(kMagic);
      const __m512 kf = _mm512_sub_ps(_mm512_fmadd_ps((__m512)a, (__m512)b, M), M);
      const __m512 r = _mm512_fmsub_ps((__m512)a, (__m512)b, kf);
      return (V)_mm512_scalef_ps((__m512)exp2_poly<kFast>((V)r), kf);
    }
#endif
    return exp2<kFast>(a * b);
  }
  // Whether max |a[i]| * max |b[j]| <= kProdRange over a (na vectors) and b (nb vectors), so
  // that exp2_prod takes every a[i] * b[j] (NaN lanes are ignored: they stay NaN there). Padding
  // lanes must hold finite values.
  static inline bool prod_in_range(const V* a, int64_t na, const V* b, int64_t nb) {
    V ma = splat(0.0f), mb = splat(0.0f);
    for (int64_t i = 0; i < na; ++i) ma = vmax(ma, abs(a[i]));
    for (int64_t j = 0; j < nb; ++j) mb = vmax(mb, abs(b[j]));
    float xa = 0.0f, xb = 0.0f;
    for (int l = 0; l < W; ++l) {
      xa = ma[l] > xa ? ma[l] : xa;
      xb = mb[l] > xb ? mb[l] : xb;
    }
    return xa <= kProdRange && xb <= kProdRange && xa * xb <= kProdRange;
  }
  // 1 / x to about 1 ulp for finite x != 0: on AVX-512 vrcp14ps (relative error 2^-14) and one
  // Newton step (two multiply-adds) instead of a division, which takes about ten cycles per
  // 16-lane vector on one port. Other builds: the division.
  static inline V recip(V x) {
#if defined(__AVX512F__)
    if constexpr (k512) {
      const __m512 r0 = _mm512_rcp14_ps((__m512)x);
      const __m512 e = _mm512_fnmadd_ps((__m512)x, r0, _mm512_set1_ps(1.0f));
      return (V)_mm512_fmadd_ps(r0, e, r0);
    }
#endif
    return 1.0f / x;
  }
  static inline V abs(V x) { return (V)((I)x & 0x7fffffff); }  // clears the sign bit (NaN stays NaN)
  static inline V sigmoid(V x) { return 1.0f / (1.0f + exp(-x)); }
  // sigmoid through recip (the scans' gates): exp(-x) is capped at e^87 so that 1 + exp(-x)
  // stays finite (recip(inf) would be NaN), which gives about 1.6e-38 instead of 0 or a tiny
  // value below x = -87.
  static inline V sigmoid_rcp(V x) {
    V out;
    sigmoid_rcp_k<1>(&x, &out);
    return out;
  }
  // F.softplus with threshold 20: x > 20 -> x, else max(x, 0) + log1p(exp(-|x|)), where
  // log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3], as an odd series up to s^15.
  // kRcp: the division through recip (2 + e is in [2, 3]).
  template <bool kRcp = false>
  static inline V softplus(V x) {
    V out;
    softplus_k<1, kRcp>(&x, &out);
    return out;
  }
  static inline V dsoftplus(V x) { return select(gt(x, splat(20.0f)), splat(1.0f), sigmoid(x)); }

  // K-chain forms of exp, softplus and sigmoid_rcp (which are their K = 1 cases): each step
  // applied to K vectors before the next. One vector at a time each is a chain of 30 to 50 dependent operations, and an out-
  // of-order core's scheduler fills with one chain's waiting operations before the next chain's
  // can start; K chains side by side keep the pipes busier (as exp2_k). The same operations per
  // lane in the same order as the one-vector functions: the same numbers.
  template <int K>
  static inline void exp_k(const V* x, V* out) {
#if defined(__AVX512F__)
    if constexpr (k512) {
      for (int k = 0; k < K; ++k) out[k] = exp(x[k]);
      return;
    }
#endif
    V xc[K], kf[K], r[K], p[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) xc[k] = vmax(splat(kLo), vmin(splat(kHi), x[k]));  // NaN stays NaN
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) kf[k] = xc[k] * 1.4426950408889634f + kMagic;  // round to nearest integer
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) kf[k] = kf[k] - kMagic;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) r[k] = xc[k] - kf[k] * 0.693359375f;  // ln2 split into an exact high part ...
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) r[k] = r[k] + kf[k] * 2.12194440e-4f;  // ... and a correction
    exp_poly_k<K>(r, p);
    // 2^k in two halves, so that every k in [-126, 128] is exact.
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      I ki = __builtin_convertvector(kf[k], I);
      I k1 = ki >> 1;
      I k2 = ki - k1;
      I e1 = (k1 + 127) << 23;
      I e2 = (k2 + 127) << 23;
      out[k] = keep_nlt((p[k] * (V)e1) * (V)e2, x[k], splat(kLo));
    }
  }
  template <int K, bool kRcp = true>
  static inline void softplus_k(const V* x, V* out) {
    V ax[K], e[K], s[K], s2[K], q[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      ax[k] = abs(x[k]);
      ax[k] = -ax[k];
    }
    exp_k<K>(ax, e);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) s[k] = kRcp ? e[k] * recip(2.0f + e[k]) : e[k] / (2.0f + e[k]);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      s2[k] = s[k] * s[k];
      q[k] = splat(1.0f / 15.0f);
    }
    constexpr float c[7] = {1.0f / 13.0f, 1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f};
#pragma GCC unroll 8
    for (int i = 0; i < 7; ++i) {
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) q[k] = q[k] * s2[k] + c[i];
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const V m = vmax(x[k], splat(0.0f));
      const V res = m + 2.0f * s[k] * q[k];
      out[k] = select(gt(x[k], splat(20.0f)), x[k], res);
    }
  }
  template <int K>
  static inline void sigmoid_rcp_k(const V* x, V* out) {
    V t[K], e[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) t[k] = vmin(-x[k], splat(87.0f));
    exp_k<K>(t, e);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) out[k] = recip(1.0f + e[k]);
  }
};

// The scans' type: 16 float lanes (their tiles, transposes and lane sums are written for 16).
template <>
struct Vec<float> : VecF<64> {};

template <>
struct Vec<double> {
  static constexpr int W = 8;
  typedef double V __attribute__((vector_size(64)));

  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static inline V splat(double s) { return s - V{}; }
  static inline V exp(V x) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = std::exp(x[l]);
    return r;
  }
  static inline V vmin(V a, V b) { return a < b ? a : b; }
  static inline V vmax(V a, V b) { return a > b ? a : b; }
  static inline V abs(V x) { return x < 0.0 ? -x : x; }
  static constexpr double kLog2e = 1.4426950408889634;
  template <bool kFast = false>  // float64 is the reference dtype: always the full precision
  static inline V exp2(V x) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = std::exp2(x[l]);
    return r;
  }
  template <bool kFast = false>
  static inline V exp2_prod(V a, V b) { return exp2(a * b); }
  static inline bool prod_in_range(const V*, int64_t, const V*, int64_t) { return true; }
  static inline V sigmoid(V x) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = 1.0 / (1.0 + std::exp(-x[l]));
    return r;
  }
  static inline V sigmoid_rcp(V x) { return sigmoid(x); }  // (float64: always the division)
  template <bool kRcp = false>
  static inline V softplus(V x) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = x[l] > 20.0 ? x[l] : std::log1p(std::exp(x[l]));
    return r;
  }
  static inline V dsoftplus(V x) {
    V r;
    for (int l = 0; l < W; ++l) r[l] = x[l] > 20.0 ? 1.0 : 1.0 / (1.0 + std::exp(-x[l]));
    return r;
  }
};

}  // namespace ouromamba_vec
