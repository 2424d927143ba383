// Quantized, reparameterized selective scan for CPU (forward only), and the calibration
// statistics of the scan state. Semantics: ouromamba_fx/lowering/qscan.py (module docstring).
//
//   dt_t  = softplus(delta_t + delta_bias)           (or delta_t + delta_bias)
//   h'_t  = exp(dt_t A) (r_L[t-1] / r_L[t]) h'_{t-1} + dt_t u_t B_t / (r_C r_L[t] r_N)
//   h'_t  = clamp(round_half_even(h'_t / s[t]), -qmax, qmax) * s[t]     (qmax >= 0 only)
//           (s[t] is one scale per step, or per step and channel, or per step and state index)
//   y_t   = r_C r_L[t] sum_n C_t[n] r_N[n] h'_t[n] + D u_t,   out = y * silu(z)
//
// delta, B and C come either as floats or as int8 codes with one (scale, zero_point) per time
// step (per-tensor quantization passes an expanded scale): value = (q - zp[t]) * scale[t], computed
// in float32 exactly as ouromamba::dequantize does, so the kernel equals dequantize -> scan.
//
// Layout of the computation
//   Work items are blocks of W consecutive channels (W = 64 bytes / sizeof(T)) of one batch
//   element, taken by the threads as they come free (om_parallel.h). The W channels are the
//   lanes of a GCC/Clang vector: each of the d_state states of a block is one vector, so the
//   recurrence, the state quantization and the C-contraction are plain vector operations with no
//   cross-lane sums, the d_state recurrences of a step are independent (they overlap in the
//   pipeline instead of waiting on each other), and d_state = 1 runs as fast per state as
//   d_state = 16. A block's inputs are gathered into small (L, W) tiles first (any strides, no
//   copies of whole tensors); B and C into (batch, L, d_state) tables with r_N folded in, once for
//   all blocks.
//
// Rounding: h / s is a true division (as torch's fake-quant computes it), round half to even
// through the 1.5 * 2^mantissa trick after clamping to +-qmax (exact there), so integer codes
// equal the reference's except at ties created by float rounding elsewhere. The other factors
// are applied in a different (cheaper) order than the reference, which changes results by a few
// ulp only. float64 inputs are computed in float64, the rest in float32.

#include "kernels.h"
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "om_parallel.h"
#include "om_vec.h"

namespace ouromamba_qscan {

// Vector types and elementary functions: om_vec.h.
using ouromamba_vec::Vec;

// A (batch, rows, L) input: float (T) or int8 codes with per-step float32 scale / zero point.
template <typename T>
struct Input {
  const T* f = nullptr;
  const int8_t* q = nullptr;
  const float* scale = nullptr;  // (L,) when q
  const float* zp = nullptr;     // (L,) when q
  int64_t sb = 0, sr = 0, st = 0;
  bool present() const { return f != nullptr || q != nullptr; }
  // value(b, r, t); dequantization as ouromamba::dequantize: (float(q) - zp) * scale in float32.
  inline T at(int64_t off, int64_t t) const {
    if (f) return f[off];
    return T((float(q[off]) - zp[t]) * scale[t]);
  }
};

// tile[t * W + l] = x(b, r0 + l, t) for l < nl, 0 for the other lanes.
template <typename T>
void gather(T* tile, const Input<T>& x, int64_t b, int64_t r0, int nl, int64_t L, int W) {
  if (nl < W) std::fill(tile, tile + L * W, T(0));
  const int64_t base = b * x.sb + r0 * x.sr;
  if (x.st <= x.sr) {  // time-contiguous-ish: walk each row along time
    for (int l = 0; l < nl; ++l)
      for (int64_t t = 0; t < L; ++t) tile[t * W + l] = x.at(base + l * x.sr + t * x.st, t);
  } else {
    for (int64_t t = 0; t < L; ++t)
      for (int l = 0; l < nl; ++l) tile[t * W + l] = x.at(base + l * x.sr + t * x.st, t);
  }
}

template <typename T>
struct Problem {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  Input<T> u, delta, B, C, z;      // B, C: rows = d_state
  const T* A = nullptr;            // (dim, N) contiguous
  const T* D = nullptr;            // (dim,) or null
  const T* bias = nullptr;         // (dim,) or null
  bool softplus = false;
  const T* rc = nullptr;           // (dim,)
  const T* rl = nullptr;           // (L,)
  const T* rn = nullptr;           // (N,)
  const T* sscale = nullptr;       // (L,), (dim, L) or (L, N): see sscale_mode
  int sscale_mode = 0;             // 0: per step; 1: per (channel, step); 2: per (step, state)
  int64_t qmax = -1;               // < 0: no state quantization
};

// Loads delta for a block (bias, softplus applied) into dt, u into ut.
template <typename T>
void load_dt_u(const Problem<T>& P, int64_t b, int64_t d0, int nl, T* dt, T* ut) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  gather(dt, P.delta, b, d0, nl, P.L, W);
  gather(ut, P.u, b, d0, nl, P.L, W);
  V bias = VT::splat(T(0));
  if (P.bias)
    for (int l = 0; l < nl; ++l) bias[l] = P.bias[d0 + l];
  V* dv = reinterpret_cast<V*>(dt);
  for (int64_t t = 0; t < P.L; ++t) {
    V x = dv[t] + bias;
    dv[t] = P.softplus ? VT::softplus(x) : x;
  }
}

template <typename T>
void fwd_block(const Problem<T>& P, int64_t b, int64_t d0, const T* BsAll, const T* CsAll, T* out,
               int64_t so_b, int64_t so_d, int64_t so_t, std::vector<T>& buf) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const int64_t L = P.L, N = P.N;
  const int nl = int(std::min<int64_t>(W, P.dim - d0));
  // buffer: dt, u, z, y tiles (L x W each), h (N x W), A (N x W)
  buf.resize(size_t(4 * L * W + 2 * N * W + 2 * W));
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  T* dt = base;
  T* ut = dt + L * W;
  T* zt = ut + L * W;
  T* yt = zt + L * W;
  V* h = reinterpret_cast<V*>(yt + L * W);
  V* Av = h + N;
  const T* Bs = BsAll + b * L * N;  // (L, N) of this batch element, r_N folded in
  const T* Cs = CsAll + b * L * N;
  load_dt_u(P, b, d0, nl, dt, ut);
  if (P.z.present()) gather(zt, P.z, b, d0, nl, L, W);
  V rc = VT::splat(T(1)), Dv = VT::splat(T(0));
  for (int l = 0; l < nl; ++l) {
    rc[l] = P.rc[d0 + l];
    if (P.D) Dv[l] = P.D[d0 + l];
  }
  const V inv_rc = T(1) / rc;
  for (int64_t n = 0; n < N; ++n) {
    V a = VT::splat(T(0));
    for (int l = 0; l < nl; ++l) a[l] = P.A[(d0 + l) * N + n] * VT::kLog2e;  // exp(d A) = exp2(d A log2 e)
    Av[n] = a;
    h[n] = VT::splat(T(0));
  }
  const V* dv = reinterpret_cast<const V*>(dt);
  const V* uv = reinterpret_cast<const V*>(ut);
  const V* zv = reinterpret_cast<const V*>(zt);
  V* yv = reinterpret_cast<V*>(yt);
  const bool quant = P.qmax >= 0;
  const V hi = VT::splat(T(P.qmax)), lo = -hi, magic = VT::splat(VT::kMagic);
  for (int64_t t = 0; t < L; ++t) {
    const T rl = P.rl[t];
    const T ratio = t > 0 ? P.rl[t - 1] / rl : T(1);
    const V d = dv[t];
    const V du = d * uv[t] * inv_rc * (T(1) / rl);
    const T* bt = Bs + t * N;
    const T* ct = Cs + t * N;
    V acc = VT::splat(T(0));
    if (quant) {
      V sc = VT::splat(P.sscale_mode == 0 ? P.sscale[t] : T(1));  // lanes past nl keep 1
      if (P.sscale_mode == 1)
        for (int l = 0; l < nl; ++l) sc[l] = P.sscale[(d0 + l) * L + t];
      for (int64_t n = 0; n < N; ++n) {
        const V s = P.sscale_mode == 2 ? VT::splat(P.sscale[t * N + n]) : sc;
        const V carry = VT::exp2(d * Av[n]) * ratio;
        V x = (carry * h[n] + du * bt[n]) / s;
        x = VT::vmax(lo, VT::vmin(hi, x));
        x = (x + magic) - magic;  // round half to even (|x| <= qmax < 2^22)
        const V hq = x * s;
        h[n] = hq;
        acc += hq * ct[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        const V carry = VT::exp2(d * Av[n]) * ratio;
        const V hn = carry * h[n] + du * bt[n];
        h[n] = hn;
        acc += hn * ct[n];
      }
    }
    V y = acc * rc * rl + Dv * uv[t];
    if (P.z.present()) {
      const V zz = zv[t];
      y = y * (zz / (T(1) + VT::exp(-zz)));
    }
    yv[t] = y;
  }
  T* o = out + b * so_b + d0 * so_d;
  for (int l = 0; l < nl; ++l)
    for (int64_t t = 0; t < L; ++t) o[l * so_d + t * so_t] = yt[t * W + l];
}

// h_sum, h_max (dim, L, N): sum / max over the batch of |h| of the plain scan.
template <typename T>
void stats_block(const Problem<T>& P, int64_t d0, T* hsum, T* hmax, std::vector<T>& buf) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  const int64_t L = P.L, N = P.N;
  const int nl = int(std::min<int64_t>(W, P.dim - d0));
  buf.resize(size_t(2 * L * W + 2 * L * N * W + L * N + 2 * N * W + 2 * W));
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  T* dt = base;
  T* ut = dt + L * W;
  V* S = reinterpret_cast<V*>(ut + L * W);
  V* M = S + L * N;
  V* h = M + L * N;
  V* Av = h + N;
  T* Bt = reinterpret_cast<T*>(Av + N);
  for (int64_t i = 0; i < L * N; ++i) S[i] = M[i] = VT::splat(T(0));
  for (int64_t n = 0; n < N; ++n) {
    V a = VT::splat(T(0));
    for (int l = 0; l < nl; ++l) a[l] = P.A[(d0 + l) * N + n] * VT::kLog2e;  // exp(d A) = exp2(d A log2 e)
    Av[n] = a;
  }
  const V* dv = reinterpret_cast<const V*>(dt);
  const V* uv = reinterpret_cast<const V*>(ut);
  for (int64_t b = 0; b < P.batch; ++b) {
    load_dt_u(P, b, d0, nl, dt, ut);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < L; ++t) Bt[t * N + n] = P.B.at(b * P.B.sb + n * P.B.sr + t * P.B.st, t);
    for (int64_t n = 0; n < N; ++n) h[n] = VT::splat(T(0));
    for (int64_t t = 0; t < L; ++t) {
      const V d = dv[t];
      const V du = d * uv[t];
      V* st = S + t * N;
      V* mt = M + t * N;
      for (int64_t n = 0; n < N; ++n) {
        const V hn = VT::exp2(d * Av[n]) * h[n] + du * Bt[t * N + n];
        h[n] = hn;
        const V a = VT::abs(hn);
        st[n] += a;
        mt[n] = VT::vmax(a, mt[n]);
      }
    }
  }
  for (int l = 0; l < nl; ++l) {
    T* ps = hsum + (d0 + l) * L * N;
    T* pm = hmax + (d0 + l) * L * N;
    for (int64_t i = 0; i < L * N; ++i) {
      ps[i] = S[i][l];
      pm[i] = M[i][l];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T>
Input<T> float_input(const at::Tensor& x) {
  Input<T> in;
  in.f = x.data_ptr<T>();
  in.sb = x.stride(0);
  in.sr = x.stride(1);
  in.st = x.stride(2);
  return in;
}

template <typename T>
Input<T> make_input(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& zp) {
  if (x.scalar_type() != at::kChar) return float_input<T>(x);
  Input<T> in;
  in.q = x.data_ptr<int8_t>();
  in.scale = scale->data_ptr<float>();
  in.zp = zp->data_ptr<float>();
  in.sb = x.stride(0);
  in.sr = x.stride(1);
  in.st = x.stride(2);
  return in;
}

static void check_seq(const at::Tensor& x, const char* name, int64_t b, int64_t r, int64_t L) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == b && x.size(1) == r && x.size(2) == L, "selective_scan_q: ",
              name, " must be (", b, ", ", r, ", ", L, "), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "selective_scan_q: ", name, " must be on the CPU");
}

static void check_steps(const c10::optional<at::Tensor>& s, const char* name, int64_t L) {
  TORCH_CHECK(s.has_value() && s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == L,
              "selective_scan_q: ", name, " must be a contiguous float32 (L,) tensor for int8 codes");
}

// Every float tensor must already have the compute dtype (the Python wrapper casts); int8 inputs
// come with per-step float32 (scale, zero_point) of length L.
at::Tensor qscan_fwd(const at::Tensor& u, const at::Tensor& delta, const c10::optional<at::Tensor>& delta_scale,
                     const c10::optional<at::Tensor>& delta_zp, const at::Tensor& A, const at::Tensor& B,
                     const c10::optional<at::Tensor>& B_scale, const c10::optional<at::Tensor>& B_zp,
                     const at::Tensor& C, const c10::optional<at::Tensor>& C_scale,
                     const c10::optional<at::Tensor>& C_zp, const c10::optional<at::Tensor>& D,
                     const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                     bool delta_softplus, const at::Tensor& r_c, const at::Tensor& r_l, const at::Tensor& r_n,
                     const at::Tensor& state_scale, int64_t qmax) {
  TORCH_CHECK(u.dim() == 3, "selective_scan_q: u must be (batch, d_inner, L)");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.is_contiguous(), "selective_scan_q: A must be contiguous (d_inner, d_state)");
  const int64_t N = A.size(1);
  check_seq(u, "u", batch, dim, L);
  check_seq(delta, "delta", batch, dim, L);
  check_seq(B, "B", batch, N, L);
  check_seq(C, "C", batch, N, L);
  if (z) check_seq(*z, "z", batch, dim, L);
  if (delta.scalar_type() == at::kChar) { check_steps(delta_scale, "delta_scale", L); check_steps(delta_zp, "delta_zp", L); }
  if (B.scalar_type() == at::kChar) { check_steps(B_scale, "B_scale", L); check_steps(B_zp, "B_zp", L); }
  if (C.scalar_type() == at::kChar) { check_steps(C_scale, "C_scale", L); check_steps(C_zp, "C_zp", L); }
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "selective_scan_q: compute dtype must be float32 or float64");
  for (const at::Tensor* t : {&A, &r_c, &r_l, &r_n, &state_scale})
    TORCH_CHECK(t->scalar_type() == st && t->is_contiguous(), "selective_scan_q: A and the factors must be contiguous ", st);
  TORCH_CHECK(r_c.numel() == dim && r_l.numel() == L && r_n.numel() == N,
              "selective_scan_q: factor shapes must be r_c (d_inner,), r_l (L,), r_n (d_state,)");
  int sscale_mode = -1;
  if (state_scale.numel() == L) sscale_mode = 0;
  else if (state_scale.dim() == 3 && state_scale.size(0) == dim && state_scale.size(1) == L && state_scale.size(2) == 1) sscale_mode = 1;
  else if (state_scale.dim() == 3 && state_scale.size(0) == 1 && state_scale.size(1) == L && state_scale.size(2) == N) sscale_mode = 2;
  TORCH_CHECK(sscale_mode >= 0, "selective_scan_q: state_scale must be (L,), (d_inner, L, 1) or (1, L, d_state)");
  at::Tensor out = at::empty({batch, dim, L}, u.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(st, "selective_scan_q", [&] {
    using T = scalar_t;
    Problem<T> P;
    P.batch = batch; P.dim = dim; P.L = L; P.N = N;
    P.u = float_input<T>(u);
    P.delta = make_input<T>(delta, delta_scale, delta_zp);
    P.B = make_input<T>(B, B_scale, B_zp);
    P.C = make_input<T>(C, C_scale, C_zp);
    if (z) {
      TORCH_CHECK(z->scalar_type() == st, "selective_scan_q: z dtype");
      P.z = float_input<T>(*z);
    }
    P.A = A.data_ptr<T>();
    if (D) { TORCH_CHECK(D->scalar_type() == st && D->is_contiguous() && D->numel() == dim, "selective_scan_q: D"); P.D = D->data_ptr<T>(); }
    if (delta_bias) {
      TORCH_CHECK(delta_bias->scalar_type() == st && delta_bias->is_contiguous() && delta_bias->numel() == dim, "selective_scan_q: delta_bias");
      P.bias = delta_bias->data_ptr<T>();
    }
    P.softplus = delta_softplus;
    P.rc = r_c.data_ptr<T>(); P.rl = r_l.data_ptr<T>(); P.rn = r_n.data_ptr<T>();
    P.sscale = state_scale.data_ptr<T>();
    P.sscale_mode = sscale_mode;
    P.qmax = qmax;
    constexpr int W = Vec<T>::W;
    const int64_t nb = (dim + W - 1) / W;
    T* o = out.data_ptr<T>();
    // B_t[n] / r_N[n] and C_t[n] r_N[n] as (batch, L, N) tables, shared by the channel blocks.
    std::vector<T> bs(size_t(batch * L * N)), cs(size_t(batch * L * N));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t n = 0; n < N; ++n) {
        const T rn = P.rn[n];
        const int64_t ob = b * P.B.sb + n * P.B.sr, oc = b * P.C.sb + n * P.C.sr;
        T* pb = bs.data() + b * L * N + n;
        T* pc = cs.data() + b * L * N + n;
        for (int64_t t = 0; t < L; ++t) {
          pb[t * N] = P.B.at(ob + t * P.B.st, t) / rn;
          pc[t * N] = P.C.at(oc + t * P.C.st, t) * rn;
        }
      }
    // Small problems stay on one thread: waking a second one costs more than it saves (much more
    // on a busy machine, where it waits for a scheduler slice).
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * N));
    ouromamba_parallel::parallel_items(batch * nb, grain, [&](ouromamba_parallel::Items& items) {
      std::vector<T> buf;
      int64_t begin, end;
      while (items.next(begin, end)) {
        for (int64_t i = begin; i < end; ++i)
          fwd_block(P, i / nb, (i % nb) * W, bs.data(), cs.data(), o, dim * L, L, 1, buf);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> state_stats(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& B, const c10::optional<at::Tensor>& delta_bias,
                                    bool delta_softplus) {
  TORCH_CHECK(u.dim() == 3, "scan_state_stats: u must be (batch, d_inner, L)");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.is_contiguous(), "scan_state_stats: A must be contiguous (d_inner, d_state)");
  const int64_t N = A.size(1);
  check_seq(u, "u", batch, dim, L);
  check_seq(delta, "delta", batch, dim, L);
  check_seq(B, "B", batch, N, L);
  const auto st = u.scalar_type();
  TORCH_CHECK((st == at::kFloat || st == at::kDouble) && delta.scalar_type() == st && A.scalar_type() == st &&
              B.scalar_type() == st, "scan_state_stats: u, delta, A, B must share a float32 / float64 dtype");
  at::Tensor hsum = at::zeros({dim, L, N}, u.options());
  at::Tensor hmax = at::zeros({dim, L, N}, u.options());
  if (hsum.numel() == 0 || batch == 0) return {hsum, hmax};
  AT_DISPATCH_FLOATING_TYPES(st, "scan_state_stats", [&] {
    using T = scalar_t;
    Problem<T> P;
    P.batch = batch; P.dim = dim; P.L = L; P.N = N;
    P.u = float_input<T>(u);
    P.delta = float_input<T>(delta);
    P.B = float_input<T>(B);
    P.A = A.data_ptr<T>();
    if (delta_bias) {
      TORCH_CHECK(delta_bias->scalar_type() == st && delta_bias->is_contiguous() && delta_bias->numel() == dim, "scan_state_stats: delta_bias");
      P.bias = delta_bias->data_ptr<T>();
    }
    P.softplus = delta_softplus;
    constexpr int W = Vec<T>::W;
    const int64_t nb = (dim + W - 1) / W;
    T* ps = hsum.data_ptr<T>();
    T* pm = hmax.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, batch * L * N));
    ouromamba_parallel::parallel_items(nb, grain, [&](ouromamba_parallel::Items& items) {
      std::vector<T> buf;
      int64_t begin, end;
      while (items.next(begin, end)) {
        for (int64_t i = begin; i < end; ++i) stats_block(P, i * W, ps, pm, buf);
      }
    });
  });
  return {hsum, hmax};
}

}  // namespace ouromamba_qscan
