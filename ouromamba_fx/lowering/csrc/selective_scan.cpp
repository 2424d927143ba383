// Fused selective scan for CPU: forward and backward.
//
// Semantics (mamba-ssm's selective_scan_fn):
//   dt_t  = softplus(delta_t + delta_bias)      (or without softplus)
//   h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t     per channel d, per state n
//   y_t   = sum_n C_t[n] h_t[n] + D * u_t
//   out_t = y_t * silu(z_t)                     (when z is given)
//
// Work is split over (batch, d_inner) rows with at::parallel_for; each row runs sequentially over
// time, and the innermost loop over d_state is written to auto-vectorise (no calls, no branches:
// float32 uses its own exp below). No (batch, d_inner, L, d_state) tensor is ever built: the
// backward recomputes a row's states into a per-task (L+1) x d_state buffer and then runs the
// reverse recurrence. Reductions over channels (dB, dC) and over the batch (dA, dD, d_delta_bias,
// constant B/C) go through per-task / per-row partial buffers that are summed at the end, so the
// result is deterministic and race-free.
//
// B and C can be (batch, d_state, L), (batch, groups, d_state, L) or (d_inner, d_state); they are
// read through a view whose innermost dimension is d_state, addressed as
//   base + b * s_b + (d / d_per_group) * s_g + t * s_t + n.
//
// float64 inputs compute in float64; everything else is computed and accumulated in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Elementary functions. The float versions are branch-free so that loops calling them vectorise;
// the double versions use libm (float64 is the accuracy path, not the speed path).

template <typename T>
struct Fn;

template <>
struct Fn<float> {
  // exp(x) with Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, and a degree-7 Taylor
  // polynomial for e^r (truncation error < 1e-8 relative). Results below FLT_MIN flush to 0,
  // above FLT_MAX give +inf, NaN propagates. 2^k is applied in two halves so k = 128 is fine.
  static inline float exp(float x) {
    const float kHi = 88.72283935546875f;   // ln(FLT_MAX)
    const float kLo = -87.33654022216797f;  // ln(FLT_MIN)
    float xc = x < kLo ? kLo : x;
    xc = xc > kHi ? kHi : xc;
    float kf = xc * 1.4426950408889634f;
    kf = (kf + 12582912.0f) - 12582912.0f;  // round to nearest integer (|kf| < 2^22)
    float r = xc - kf * 0.693359375f;        // ln2 split in an exact high part ...
    r = r - kf * (-2.12194440e-4f);          // ... and the rest
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t k = static_cast<int32_t>(kf);
    int32_t k1 = k >> 1;
    int32_t k2 = k - k1;
    int32_t b1 = (k1 + 127) << 23;
    int32_t b2 = (k2 + 127) << 23;
    float s1, s2;
    std::memcpy(&s1, &b1, sizeof(float));
    std::memcpy(&s2, &b2, sizeof(float));
    float res = (p * s1) * s2;
    res = x < kLo ? 0.0f : res;
    res = x > kHi ? std::numeric_limits<float>::infinity() : res;
    res = x != x ? x : res;
    return res;
  }
  static inline float sigmoid(float x) { return 1.0f / (1.0f + Fn<float>::exp(-x)); }
  // softplus with F.softplus's threshold: x > 20 -> x. Otherwise
  // max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with log1p(e) = 2 atanh(s), s = e / (2 + e)
  // in (0, 1/3], summed as an odd series up to s^15 (error < 2e-8 relative).
  static inline float softplus(float x) {
    float ax = x < 0.0f ? -x : x;
    float e = Fn<float>::exp(-ax);
    float s = e / (2.0f + e);
    float s2 = s * s;
    float q = 1.0f / 15.0f;
    q = q * s2 + 1.0f / 13.0f;
    q = q * s2 + 1.0f / 11.0f;
    q = q * s2 + 1.0f / 9.0f;
    q = q * s2 + 1.0f / 7.0f;
    q = q * s2 + 1.0f / 5.0f;
    q = q * s2 + 1.0f / 3.0f;
    q = q * s2 + 1.0f;
    float l = 2.0f * s * q;
    float m = x > 0.0f ? x : 0.0f;
    float res = m + l;
    return x > 20.0f ? x : res;
  }
};

template <>
struct Fn<double> {
  static inline double exp(double x) { return std::exp(x); }
  static inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
};

// ---------------------------------------------------------------------------------------------
// Inputs, brought to the compute dtype, with u / delta / z contiguous (batch, d_inner, L).

struct BCView {
  at::Tensor t;       // keeps the (possibly converted) storage alive
  int64_t s_b = 0;    // stride of batch
  int64_t s_g = 0;    // stride of group
  int64_t dpg = 1;    // channels per group
  int64_t s_t = 0;    // stride of time
  int64_t groups = 1;
  bool variable = true;
};

BCView make_bc_view(const at::Tensor& M, int64_t batch, int64_t dim, int64_t N, int64_t L,
                    at::ScalarType cdt, const char* name) {
  BCView v;
  if (M.dim() == 2) {
    TORCH_CHECK(M.size(0) == dim && M.size(1) == N, "selective_scan: ", name, " has shape ",
                M.sizes(), ", expected (", dim, ", ", N, ")");
    at::Tensor t = M.to(cdt);
    if (t.stride(1) != 1) t = t.contiguous();
    v.t = t;
    v.s_b = 0;
    v.s_g = t.stride(0);
    v.dpg = 1;
    v.s_t = 0;
    v.groups = dim;
    v.variable = false;
  } else if (M.dim() == 3) {
    TORCH_CHECK(M.size(0) == batch && M.size(1) == N && M.size(2) == L, "selective_scan: ", name,
                " has shape ", M.sizes(), ", expected (", batch, ", ", N, ", ", L, ")");
    at::Tensor t = M.to(cdt).transpose(1, 2);  // (batch, L, N)
    if (t.stride(2) != 1) t = t.contiguous();
    v.t = t;
    v.s_b = t.stride(0);
    v.s_g = 0;
    v.dpg = dim;
    v.s_t = t.stride(1);
    v.groups = 1;
  } else if (M.dim() == 4) {
    const int64_t G = M.size(1);
    TORCH_CHECK(M.size(0) == batch && G >= 1 && dim % G == 0 && M.size(2) == N && M.size(3) == L,
                "selective_scan: ", name, " has shape ", M.sizes(), ", expected (", batch,
                ", groups, ", N, ", ", L, ") with groups dividing ", dim);
    at::Tensor t = M.to(cdt).transpose(2, 3);  // (batch, G, L, N)
    if (t.stride(3) != 1) t = t.contiguous();
    v.t = t;
    v.s_b = t.stride(0);
    v.s_g = t.stride(1);
    v.dpg = dim / G;
    v.s_t = t.stride(2);
    v.groups = G;
  } else {
    TORCH_CHECK(false, "selective_scan: ", name, " must have 2, 3 or 4 dims, got ", M.dim());
  }
  return v;
}

struct Inputs {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  at::ScalarType cdt;
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
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta has shape ", delta.sizes(),
              ", expected ", u.sizes());
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan (C++ CPU kernel): all inputs must be on CPU");
  }
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.L = u.size(2);
  in.N = A.size(1);
  in.cdt = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.u = u.to(in.cdt).contiguous();
  in.delta = delta.to(in.cdt).contiguous();
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
    in.z = z->to(in.cdt).contiguous();
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
struct Ptrs {
  const T* u;
  const T* delta;
  const T* A;
  const T* B;
  const T* C;
  const T* D;
  const T* z;
  const T* bias;
  explicit Ptrs(const Inputs& in)
      : u(in.u.data_ptr<T>()),
        delta(in.delta.data_ptr<T>()),
        A(in.A.data_ptr<T>()),
        B(in.B.t.data_ptr<T>()),
        C(in.C.t.data_ptr<T>()),
        D(in.D.defined() ? in.D.data_ptr<T>() : nullptr),
        z(in.z.defined() ? in.z.data_ptr<T>() : nullptr),
        bias(in.bias.defined() ? in.bias.data_ptr<T>() : nullptr) {}
};

// dt[t] = softplus(delta[t] + bias) (or without softplus); dsp[t] = d softplus / dx (if dsp).
template <typename T>
inline void row_dt(const T* __restrict__ delta, T bias, bool softplus, int64_t L, T* __restrict__ dt,
                   T* __restrict__ dsp) {
  if (softplus) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dt[t] = Fn<T>::softplus(delta[t] + bias);
    if (dsp) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) {
        T x = delta[t] + bias;
        T s = Fn<T>::sigmoid(x);
        dsp[t] = x > T(20) ? T(1) : s;
      }
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dt[t] = delta[t] + bias;
    if (dsp) {
      for (int64_t t = 0; t < L; ++t) dsp[t] = T(1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_kernel(const Inputs& in, T* __restrict__ out) {
  const Ptrs<T> p(in);
  const int64_t dim = in.dim, L = in.L, N = in.N;
  const BCView& Bv = in.B;
  const BCView& Cv = in.C;
  const int64_t rows = in.batch * dim;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, L * N));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> work(static_cast<size_t>(L + N));
    T* __restrict__ dt = work.data();
    T* __restrict__ h = dt + L;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / dim, d = row % dim;
      const T* __restrict__ u = p.u + row * L;
      const T* __restrict__ A = p.A + d * N;
      const T* __restrict__ Brow = p.B + b * Bv.s_b + (d / Bv.dpg) * Bv.s_g;
      const T* __restrict__ Crow = p.C + b * Cv.s_b + (d / Cv.dpg) * Cv.s_g;
      const int64_t Bst = Bv.s_t, Cst = Cv.s_t;
      T* __restrict__ o = out + row * L;
      row_dt<T>(p.delta + row * L, p.bias ? p.bias[d] : T(0), in.softplus, L, dt, nullptr);
      for (int64_t n = 0; n < N; ++n) h[n] = T(0);
      for (int64_t t = 0; t < L; ++t) {
        const T dtt = dt[t];
        const T dtu = dtt * u[t];
        const T* __restrict__ Bt = Brow + t * Bst;
        const T* __restrict__ Ct = Crow + t * Cst;
        T y = T(0);
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; ++n) {
          const T hn = Fn<T>::exp(dtt * A[n]) * h[n] + dtu * Bt[n];
          h[n] = hn;
          y += Ct[n] * hn;
        }
        o[t] = y;
      }
      const T Dd = p.D ? p.D[d] : T(0);
      if (p.z) {
        const T* __restrict__ z = p.z + row * L;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
          const T zt = z[t];
          o[t] = (o[t] + Dd * u[t]) * (zt * Fn<T>::sigmoid(zt));
        }
      } else {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) o[t] += Dd * u[t];
      }
    }
  });
}

at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                              const c10::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  at::Tensor out = at::empty({in.batch, in.dim, in.L}, in.u.options());
  if (out.numel() > 0) {
    if (in.cdt == at::kDouble) {
      forward_kernel<double>(in, out.data_ptr<double>());
    } else {
      forward_kernel<float>(in, out.data_ptr<float>());
    }
  }
  return out.to(u.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// Tasks are (b, k): batch element b and the k-th of K consecutive blocks of channels. A task owns
// a partial dB / dC buffer for its batch element (variable B / C), so channel blocks never write
// the same memory; K > 1 only when the batch alone does not give enough tasks. Per-row partials
// (dA, dD, d_delta_bias, constant dB / dC) are stored per (b, d) and summed over the batch.

struct Grads {
  at::Tensor du, ddelta, dz;                  // (batch, dim, L)
  at::Tensor dA_part;                         // (batch, dim, N)
  at::Tensor dD_part, dbias_part;             // (batch, dim)
  at::Tensor dB_part, dC_part;                // variable: (batch, K, G, L, N); constant: (batch, dim, N)
};

template <typename T>
void backward_kernel(const Inputs& in, const T* __restrict__ dout_all, Grads& g, int64_t K) {
  const Ptrs<T> p(in);
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const BCView& Bv = in.B;
  const BCView& Cv = in.C;
  T* __restrict__ du_all = g.du.data_ptr<T>();
  T* __restrict__ ddelta_all = g.ddelta.data_ptr<T>();
  T* __restrict__ dz_all = p.z ? g.dz.data_ptr<T>() : nullptr;
  T* __restrict__ dA_part = g.dA_part.data_ptr<T>();
  T* __restrict__ dD_part = g.dD_part.data_ptr<T>();
  T* __restrict__ dbias_part = g.dbias_part.data_ptr<T>();
  T* __restrict__ dB_part = g.dB_part.data_ptr<T>();
  T* __restrict__ dC_part = g.dC_part.data_ptr<T>();
  // Size of one task's variable dB / dC buffer.
  const int64_t dB_task = Bv.groups * L * N;
  const int64_t dC_task = Cv.groups * L * N;

  at::parallel_for(0, batch * K, 1, [&](int64_t task_begin, int64_t task_end) {
    // hs holds h_{-1} = 0 followed by h_0 .. h_{L-1}; decay holds exp(dt_t A).
    std::vector<T> work(static_cast<size_t>((2 * L + 1) * N + 4 * L + 5 * N));
    T* __restrict__ hs = work.data();
    T* __restrict__ decay = hs + (L + 1) * N;
    T* __restrict__ dt = decay + L * N;
    T* __restrict__ dsp = dt + L;
    T* __restrict__ y = dsp + L;
    T* __restrict__ dy = y + L;
    T* __restrict__ gh = dy + L;      // dLoss/dh carried backwards in time
    T* __restrict__ dAacc = gh + N;
    T* __restrict__ dBc = dAacc + N;  // constant-B accumulator for one row
    T* __restrict__ dCc = dBc + N;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / K, k = task % K;
      const int64_t d0 = k * dim / K, d1 = (k + 1) * dim / K;
      T* dB_task_ptr = Bv.variable ? dB_part + task * dB_task : nullptr;
      T* dC_task_ptr = Cv.variable ? dC_part + task * dC_task : nullptr;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t row = b * dim + d;
        const T* __restrict__ u = p.u + row * L;
        const T* __restrict__ dout = dout_all + row * L;
        const T* __restrict__ A = p.A + d * N;
        const T* __restrict__ Brow = p.B + b * Bv.s_b + (d / Bv.dpg) * Bv.s_g;
        const T* __restrict__ Crow = p.C + b * Cv.s_b + (d / Cv.dpg) * Cv.s_g;
        const int64_t Bst = Bv.s_t, Cst = Cv.s_t;
        T* __restrict__ dBrow = Bv.variable ? dB_task_ptr + (d / Bv.dpg) * L * N : dBc;
        T* __restrict__ dCrow = Cv.variable ? dC_task_ptr + (d / Cv.dpg) * L * N : dCc;
        const int64_t dBst = Bv.variable ? N : 0, dCst = Cv.variable ? N : 0;
        T* __restrict__ du = du_all + row * L;
        T* __restrict__ ddelta = ddelta_all + row * L;

        row_dt<T>(p.delta + row * L, p.bias ? p.bias[d] : T(0), in.softplus, L, dt, dsp);

        // Forward recomputation, keeping every state and decay.
        for (int64_t n = 0; n < N; ++n) hs[n] = T(0);
        for (int64_t t = 0; t < L; ++t) {
          const T dtt = dt[t];
          const T dtu = dtt * u[t];
          const T* __restrict__ Bt = Brow + t * Bst;
          const T* __restrict__ Ct = Crow + t * Cst;
          const T* __restrict__ hp = hs + t * N;
          T* __restrict__ hn = hs + (t + 1) * N;
          T* __restrict__ at = decay + t * N;
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < N; ++n) {
            const T a = Fn<T>::exp(dtt * A[n]);
            const T h = a * hp[n] + dtu * Bt[n];
            at[n] = a;
            hn[n] = h;
            acc += Ct[n] * h;
          }
          y[t] = acc;
        }

        // Output gate and skip connection.
        const T Dd = p.D ? p.D[d] : T(0);
        T dDsum = T(0);
        if (p.z) {
          const T* __restrict__ z = p.z + row * L;
          T* __restrict__ dz = dz_all + row * L;
#pragma omp simd reduction(+ : dDsum)
          for (int64_t t = 0; t < L; ++t) {
            const T zt = z[t];
            const T sz = Fn<T>::sigmoid(zt);
            const T yt = y[t] + Dd * u[t];
            dz[t] = dout[t] * yt * sz * (T(1) + zt * (T(1) - sz));
            const T dyt = dout[t] * zt * sz;
            dy[t] = dyt;
            dDsum += dyt * u[t];
            du[t] = dyt * Dd;
          }
        } else {
#pragma omp simd reduction(+ : dDsum)
          for (int64_t t = 0; t < L; ++t) {
            const T dyt = dout[t];
            dy[t] = dyt;
            dDsum += dyt * u[t];
            du[t] = dyt * Dd;
          }
        }

        // Reverse recurrence.
        for (int64_t n = 0; n < N; ++n) {
          gh[n] = T(0);
          dAacc[n] = T(0);
          dBc[n] = T(0);
          dCc[n] = T(0);
        }
        for (int64_t t = L - 1; t >= 0; --t) {
          const T dtt = dt[t];
          const T ut = u[t];
          const T dtu = dtt * ut;
          const T dyt = dy[t];
          const T* __restrict__ Bt = Brow + t * Bst;
          const T* __restrict__ Ct = Crow + t * Cst;
          const T* __restrict__ hp = hs + t * N;
          const T* __restrict__ hc = hs + (t + 1) * N;
          const T* __restrict__ at = decay + t * N;
          T* __restrict__ dBt = dBrow + t * dBst;
          T* __restrict__ dCt = dCrow + t * dCst;
          T sum_gB = T(0), sum_qA = T(0);
#pragma omp simd reduction(+ : sum_gB, sum_qA)
          for (int64_t n = 0; n < N; ++n) {
            const T gn = gh[n] + dyt * Ct[n];
            dCt[n] += dyt * hc[n];
            sum_gB += gn * Bt[n];
            dBt[n] += gn * dtu;
            const T q = gn * hp[n] * at[n];
            sum_qA += q * A[n];
            dAacc[n] += q * dtt;
            gh[n] = gn * at[n];
          }
          ddelta[t] = sum_qA + ut * sum_gB;  // still w.r.t. dt; chain rule below
          du[t] += dtt * sum_gB;
        }
        T dbias = T(0);
#pragma omp simd reduction(+ : dbias)
        for (int64_t t = 0; t < L; ++t) {
          const T v = ddelta[t] * dsp[t];
          ddelta[t] = v;
          dbias += v;
        }
        T* __restrict__ dA_row = dA_part + row * N;
        for (int64_t n = 0; n < N; ++n) dA_row[n] = dAacc[n];
        dD_part[row] = dDsum;
        dbias_part[row] = dbias;
        if (!Bv.variable) {
          T* __restrict__ dst = dB_part + row * N;
          for (int64_t n = 0; n < N; ++n) dst[n] = dBc[n];
        }
        if (!Cv.variable) {
          T* __restrict__ dst = dC_part + row * N;
          for (int64_t n = 0; n < N; ++n) dst[n] = dCc[n];
        }
      }
    }
  });
}

// Sum a (batch, K, G, L, N) / (batch, dim, N) partial into the user layout of B / C.
at::Tensor finish_bc_grad(const at::Tensor& part, const BCView& v, const at::Tensor& M) {
  at::Tensor g;
  if (!v.variable) {
    g = part.sum(0);  // (dim, N)
  } else {
    g = part.size(1) == 1 ? part.select(1, 0) : part.sum(1);  // (batch, G, L, N)
    if (M.dim() == 3) {
      g = g.select(1, 0).transpose(1, 2);  // (batch, N, L)
    } else {
      g = g.transpose(2, 3);  // (batch, G, N, L)
    }
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
  const at::Tensor dout_c = dout.to(in.cdt).contiguous();
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const auto opts = in.u.options();

  // Enough tasks to keep every thread busy; more than one channel block per batch element only
  // when the batch is small (each block costs its own partial dB / dC buffer).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t K = 1;
  if (batch < 4 * threads) {
    K = std::min<int64_t>(std::max<int64_t>(dim, 1), (4 * threads + batch - 1) / std::max<int64_t>(batch, 1));
  }

  Grads g;
  g.du = at::empty({batch, dim, L}, opts);
  g.ddelta = at::empty({batch, dim, L}, opts);
  if (in.z.defined()) g.dz = at::empty({batch, dim, L}, opts);
  g.dA_part = at::empty({batch, dim, N}, opts);
  g.dD_part = at::empty({batch, dim}, opts);
  g.dbias_part = at::empty({batch, dim}, opts);
  g.dB_part = in.B.variable ? at::zeros({batch, K, in.B.groups, L, N}, opts)
                            : at::empty({batch, dim, N}, opts);
  g.dC_part = in.C.variable ? at::zeros({batch, K, in.C.groups, L, N}, opts)
                            : at::empty({batch, dim, N}, opts);

  if (batch * dim > 0 && L > 0) {
    if (in.cdt == at::kDouble) {
      backward_kernel<double>(in, dout_c.data_ptr<double>(), g, K);
    } else {
      backward_kernel<float>(in, dout_c.data_ptr<float>(), g, K);
    }
  } else {
    // Empty problem: every gradient is zero.
    for (at::Tensor* t : {&g.du, &g.ddelta, &g.dA_part, &g.dD_part, &g.dbias_part, &g.dB_part, &g.dC_part}) {
      t->zero_();
    }
    if (g.dz.defined()) g.dz.zero_();
  }

  std::vector<c10::optional<at::Tensor>> res(8);
  res[0] = g.du.to(u.scalar_type());
  res[1] = g.ddelta.to(delta.scalar_type());
  res[2] = g.dA_part.sum(0).to(A.scalar_type());
  res[3] = finish_bc_grad(g.dB_part, in.B, B);
  res[4] = finish_bc_grad(g.dC_part, in.C, C);
  if (in.D.defined()) res[5] = g.dD_part.sum(0).to(D->scalar_type()).view(D->sizes());
  if (in.z.defined()) res[6] = g.dz.to(z->scalar_type());
  if (in.bias.defined()) res[7] = g.dbias_part.sum(0).to(delta_bias->scalar_type()).view(delta_bias->sizes());
  return res;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ouromamba_fx fused selective scan (CPU)";
  m.def("fwd", &selective_scan_fwd, "selective scan forward",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"));
  m.def("bwd", &selective_scan_bwd, "selective scan backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)",
        py::arg("dout"), py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"));
}
