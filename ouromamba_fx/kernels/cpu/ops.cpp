// C++ CPU kernels of the public ouromamba::* ops whose CPU implementation used to be Python glue
// around the kernels of this folder (argument checks, layouts, the choice of integer GEMM, the
// per-weight caches). Each function below follows the Python implementation of its op in
// ouromamba_fx/ops/ step by step, with the same ATen calls in the same order, so the results
// are bit-identical (tests/test_cpp_ops.py compares both on every path). The Python
// implementations stay: they run where this library is not loaded (no compiler,
// OUROMAMBA_SCAN_BACKEND=reference) and on devices without their own kernel.
//
// Ops whose rare cases need an op without a C++ kernel call it through the dispatcher (in a
// Python process it is the package's Python op; in a C++ process the call fails with a message
// naming the op).

#include "kernels.h"

#include <ATen/cpu/Utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace ouromamba_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

constexpr double kEps = 1e-8;  // ouromamba_fx.numerics.EPS
constexpr int64_t kInlierBits = 4;  // W4A4O8
constexpr int64_t kSmallK = 32;  // ouromamba_fx.ops.w4a4o8_linear.SMALL_K
constexpr int64_t kU8PairLimit = 16383;  // ouromamba_fx.ops.gemm._U8_PAIR_LIMIT
constexpr int64_t kFp32Exact = int64_t(1) << 24;
constexpr int64_t kDenseOutlierRatio = 16;  // ouromamba_fx.ops.w4a4o8_linear.DENSE_OUTLIER_RATIO
constexpr int64_t kOutCols = 64;  // mixer_ops.cpp: the epilogue's tiles are this many columns wide

// ---------------------------------------------------------------------------------------------
// Messages in the Python implementations' words (torch dtypes and shapes as Python prints them)

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

void check_float(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
                    py_dtype(t.scalar_type()));
}

void check_broadcast_scale(const char* name, const Tensor& scale, at::IntArrayRef lead) {
  check_float(name, scale);
  std::vector<int64_t> target(lead.begin(), lead.end());
  target.push_back(1);
  bool ok = true;
  try {
    ok = at::infer_size(scale.sizes(), target) == target;
  } catch (const c10::Error&) {
    ok = false;
  }
  TORCH_CHECK_VALUE(ok, name, " of shape ", py_shape(scale.sizes()), " does not broadcast to ", py_shape(target),
                    " (one scale per row)");
}

void check_weight(const Tensor& w_scale, const OptTensor& bias, int64_t n) {
  check_float("w_scale", w_scale);
  TORCH_CHECK_VALUE(!(w_scale.numel() != n || w_scale.dim() > 2 || (w_scale.dim() == 2 && w_scale.size(1) != 1)),
                    "w_scale must have one entry per output channel, shape (", n, ",) or (", n, ", 1), got ",
                    py_shape(w_scale.sizes()));
  if (bias) {
    check_float("bias", *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape (", n, ",), got ",
                      py_shape(bias->sizes()));
  }
}

int64_t qmax_of(int64_t bits) { return (int64_t(1) << (bits - 1)) - 1; }

int64_t int8_qmax(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "bits must be an int in [2, 8] (int8 storage), got ", bits);
  return qmax_of(bits);
}

int64_t py_mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// ---------------------------------------------------------------------------------------------
// Integer GEMMs (ouromamba_fx.ops.gemm)

thread_local int64_t t_choice = 0;  // 0 auto, 1 int_mm, 2 emulated

bool cpu_has_int8_dot() {
  static const bool fast = [] {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
    const auto caps = at::cpu::get_cpu_capabilities();
    auto has = [&](const char* key) {
      auto it = caps.find(key);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return has("avx512_vnni") || has("amx_tile");
#else
    return true;  // torch._int_mm is the path off x86
#endif
  }();
  return fast;
}

bool emulated() { return gemm_mode() == 2; }

// gemm.amx: the CPU has AMX tiles (oneDNN's matmul runs its int8 AMX kernel there)
bool cpu_has_amx() {
  static const bool amx = [] {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
    const auto caps = at::cpu::get_cpu_capabilities();
    auto it = caps.find("amx_tile");
    return it != caps.end() && it->second.isBool() && it->second.toBool();
#else
    return false;
#endif
  }();
  return amx;
}

// float32 when one chunk covers K (every partial sum an integer below 2^24), else int32
Tensor chunked_mm(const Tensor& a, const Tensor& b, int64_t qmax_a, int64_t qmax_w) {
  const int64_t k = a.size(-1);
  const int64_t per = std::max<int64_t>(1, (kFp32Exact - 1) / std::max<int64_t>(1, qmax_a * qmax_w));
  const Tensor af = a.to(at::kFloat), bf = b.to(at::kFloat);
  if (k <= per) return at::matmul(af, bf.t());
  Tensor acc;
  for (int64_t k0 = 0; k0 < k; k0 += per) {
    Tensor part = at::matmul(af.slice(1, k0, k0 + per), bf.slice(1, k0, k0 + per).t()).to(at::kInt);
    acc = acc.defined() ? acc + part : part;
  }
  return acc;
}

Tensor int_mm(const Tensor& a, const Tensor& b) {
  if (gemm_mode() == 1) return at::_int_mm(a, b.t());
  return chunked_mm(a, b, 127, 127).to(at::kInt);
}

Tensor exact_int_mm(const Tensor& a, const Tensor& b) {
  if (a.size(1) == 1) {
    // torch._int_mm on CPU returns uninitialised memory for K == 1; an outer product is exact
    return a.to(at::kInt) * b.to(at::kInt).t();
  }
  try {
    return int_mm(a, b);
  } catch (const c10::Error& e) {
    TORCH_WARN_ONCE("torch._int_mm refused shapes ", py_shape(a.sizes()), " x ", py_shape(b.sizes()), " (",
                    e.what_without_backtrace(), "); using an exact but slower int64 matmul");
    return at::matmul(a.to(at::kLong), b.to(at::kLong).t()).to(at::kInt);
  }
}

Tensor float_in_place(const Tensor& acc) {
  if (!acc.is_contiguous()) return acc.to(at::kFloat);
  Tensor y = acc.view(at::kFloat);
  try {
    return y.copy_(acc);
  } catch (const c10::Error&) {
    return acc.to(at::kFloat);
  }
}

bool u8_exact(int64_t qmax_a, int64_t qmax_w) { return (128 + qmax_a) * qmax_w <= kU8PairLimit && at::hasMKLDNN(); }

// ---------------------------------------------------------------------------------------------
// Per-weight caches (ouromamba_fx.ops.gemm.cached): keyed by the weight tensor itself, a stale
// entry (tensor freed or modified in place) is recomputed; expired entries are dropped on insert.

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> ref;
  int64_t version;
  std::string tag;
  std::vector<Tensor> value;
};

std::mutex g_cache_mu;
std::unordered_multimap<const c10::TensorImpl*, CacheEntry> g_cache;

int64_t version_of(const Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

template <typename Make>
std::vector<Tensor> cached(const Tensor& key, const std::string& tag, Make make) {
  const c10::TensorImpl* impl = key.unsafeGetTensorImpl();
  const int64_t version = version_of(key);
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    auto range = g_cache.equal_range(impl);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second.tag != tag) continue;
      auto alive = it->second.ref.lock();
      if (alive.get() == impl && it->second.version == version) return it->second.value;
    }
  }
  std::vector<Tensor> value = make();
  std::lock_guard<std::mutex> lock(g_cache_mu);
  for (auto it = g_cache.begin(); it != g_cache.end();) {
    const bool same = it->first == impl && it->second.tag == tag;
    it = (same || it->second.ref.expired()) ? g_cache.erase(it) : std::next(it);
  }
  g_cache.emplace(impl, CacheEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                       key.getIntrusivePtr()),
                                   version, tag, value});
  return value;
}

// cached() of a value made from two tensors: recomputed when either changes
template <typename Make>
std::vector<Tensor> cached_pair(const Tensor& key, const Tensor& other, const std::string& tag, Make make) {
  std::ostringstream t;
  t << tag << "|" << static_cast<const void*>(other.unsafeGetTensorImpl()) << ":" << version_of(other);
  return cached(key, t.str(), make);
}

// gemm._prepack: the weight (N, K) int8 prepacked for oneDNN's matmul, unit scales, zero points 0
std::vector<Tensor> onednn_prepack(const Tensor& w) {
  static const auto prepack = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_prepack", "");
  const int64_t n = w.size(0);
  torch::jit::Stack st{w.contiguous(), c10::IValue()};
  prepack.callBoxed(&st);
  return std::vector<Tensor>{st[0].toTensor(), at::ones({n}), at::zeros({n}, at::kLong)};
}

// q (uint8 shifted by zp, or int8 with zp 0) times a prepacked weight, float32 out
Tensor onednn_pointwise(const Tensor& q, int64_t zp, const std::vector<Tensor>& packed) {
  static const auto pointwise = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  torch::jit::Stack st{q, 1.0, zp, packed[0], packed[1], packed[2], c10::IValue(), 1.0, int64_t(0),
                       at::kFloat, std::string("none"), c10::List<std::optional<at::Scalar>>(), std::string("")};
  pointwise.callBoxed(&st);
  return st[0].toTensor();
}

Tensor u8_mm(const Tensor& q_in, const Tensor& w, const Tensor& key) {
  const auto packed = cached(key, "onednn", [&] { return onednn_prepack(w); });
  const Tensor q = q_in.contiguous();
  const Tensor u = q.scalar_type() == at::kByte ? q : q.view(at::kByte).bitwise_xor(0x80);  // q + 128
  return onednn_pointwise(u, 128, packed);
}

// gemm.onednn_s8
bool onednn_s8() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
  static const bool ok = at::hasMKLDNN() &&
                         c10::Dispatcher::singleton().findSchema({"onednn::qlinear_pointwise", ""}).has_value();
  return ok;
#else
  return false;
#endif
}

// gemm.s8_mm: weight() makes the int8 (N, K) weight, prepacked once per key
template <typename Make>
Tensor s8_mm(const Tensor& q, Make weight, const Tensor& key) {
  const auto packed = cached(key, "onednn", [&] { return onednn_prepack(weight()); });
  return onednn_pointwise(q.contiguous(), 0, packed);
}

// ---------------------------------------------------------------------------------------------
// Quantization (ouromamba_fx.ops.quant)

Tensor amax_rows(const Tensor& x) {
  if (x.size(-1) == 0) {
    auto shape = x.sizes().vec();
    shape.back() = 1;
    return at::zeros(shape, x.options());
  }
  return x.abs().amax(-1, true);
}

Tensor quantize_rows(const Tensor& x, const Tensor& scale, int64_t qmax) {
  Tensor q = at::div(x, scale);
  q.round_().clamp_(-qmax, qmax);
  return q.to(at::kChar);
}

Tensor dynamic_scale(const Tensor& x, int64_t qmax) { return amax_rows(x).div_(qmax).clamp_min_(kEps); }

// quant.quantize_ref / dequantize_ref (no range check, the input's layout)
Tensor quantize_ref(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t qmin, int64_t qmax) {
  Tensor q = at::round(at::div(x.to(at::kFloat), scale)) + zero_point;
  return q.clamp_(qmin, qmax).to(at::kChar);
}

Tensor dequantize_ref(const Tensor& q, const Tensor& scale, const Tensor& zero_point) {
  return (q.to(at::kFloat) - zero_point) * scale;
}

// ---------------------------------------------------------------------------------------------
// int4 weights (ouromamba_fx.ops.int4)

void check_packed(const Tensor& w_packed, int64_t k) {
  TORCH_CHECK_VALUE(w_packed.dim() == 2 && w_packed.scalar_type() == at::kByte,
                    "packed int4 weight must be uint8 (N, ceil(K/2)), got ", py_dtype(w_packed.scalar_type()), " ",
                    py_shape(w_packed.sizes()));
  const int64_t bytes = w_packed.size(1);
  TORCH_CHECK_VALUE(k >= 0 && (k + 1) / 2 == bytes, "k=", k, " does not match a packed weight with ", bytes,
                    " bytes per row (expected k in {", 2 * bytes - 1, ", ", 2 * bytes, "})");
}

Tensor unpack_int4(const Tensor& w_packed, int64_t k) {
  check_packed(w_packed, k);
  const Tensor lo = w_packed.__lshift__(4).view(at::kChar).__rshift__(4);
  const Tensor hi = w_packed.view(at::kChar).__rshift__(4);
  Tensor w = at::stack({lo, hi}, -1).reshape({w_packed.size(0), 2 * w_packed.size(1)});
  return w.size(1) == k ? w : w.slice(1, 0, k).contiguous();
}

Tensor dequantized_int4(const Tensor& w_packed, const Tensor& w_scale, int64_t k) {
  return unpack_int4(w_packed, k).to(at::kFloat) * w_scale.detach().to(at::kFloat).reshape({-1, 1});
}

// ---------------------------------------------------------------------------------------------
// Mixed precision (ouromamba_fx.ops.mixed)

Tensor as_rows(const Tensor& x, int64_t token_axis, int64_t channel_axis) {
  const Tensor y = x.movedim({token_axis, channel_axis}, {-2, -1});
  int64_t batch = 1;
  for (int64_t i = 0; i + 2 < y.dim(); ++i) batch *= y.size(i);
  return y.reshape({batch, y.size(-2), y.size(-1)});
}

Tensor from_rows(const Tensor& rows, const Tensor& like, int64_t token_axis, int64_t channel_axis) {
  const auto moved = like.movedim({token_axis, channel_axis}, {-2, -1}).sizes().vec();
  return rows.reshape(moved).movedim({-2, -1}, {token_axis, channel_axis});
}

Tensor resample_steps(const Tensor& s, int64_t length) {
  if (s.numel() == length || s.numel() == 1) return s.numel() == 1 ? s.expand({length}) : s;
  if (length == 1) return s.mean().reshape({1});
  // F.interpolate(mode="linear", align_corners=True, size=length) calls this overload
  const std::vector<int64_t> size{length};
  return at::upsample_linear1d(s.reshape({1, 1, -1}).to(at::kFloat), at::OptionalIntArrayRef(size), true,
                               std::optional<at::ArrayRef<double>>())
      .reshape({length});
}

Tensor step_scales(const Tensor& scale, int64_t length) {
  return resample_steps(scale.detach().reshape({-1}).to(at::kFloat), length).contiguous();
}

std::pair<Tensor, Tensor> mixed_rows(const Tensor& x, const Tensor& inlier_scale, int64_t token_axis,
                                     int64_t channel_axis) {
  Tensor rows = as_rows(x.to(at::kFloat), token_axis, channel_axis);
  return {rows, step_scales(inlier_scale, rows.size(1))};
}

bool cpp_mixed(int64_t bits, int64_t outlier_bits) { return bits >= 2 && bits <= 8 && outlier_bits == 8; }

// An op without a C++ kernel, through the dispatcher: the package's Python op in a Python process.
c10::OperatorHandle python_op(const char* name, const char* why) {
  auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(op.has_value(), why, " needs ", name, ", which has no C++ kernel: run this model from Python "
              "(import ouromamba_fx), or lower it with the settings the C++ kernels cover");
  return *op;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Control

int64_t set_gemm_choice(int64_t choice) {
  TORCH_CHECK_VALUE(choice >= 0 && choice <= 2, "cpu gemm choice must be 0 (auto), 1 (int_mm) or 2 (emulated)");
  const int64_t prev = t_choice;
  t_choice = choice;
  return prev;
}

int64_t gemm_mode() { return t_choice != 0 ? t_choice : (cpu_has_int8_dot() ? 1 : 2); }

std::vector<std::string> cached_tags(const Tensor& key) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  std::vector<std::string> tags;
  auto range = g_cache.equal_range(key.unsafeGetTensorImpl());
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second.ref.lock().get() == key.unsafeGetTensorImpl()) tags.push_back(it->second.tag);
  }
  return tags;
}

// ---------------------------------------------------------------------------------------------
// The ops (ouromamba_fx/ops/<module>.py, function named in each comment)

// quant.quantize
Tensor quantize(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t qmin, int64_t qmax) {
  TORCH_CHECK_VALUE(-128 <= qmin && qmin < qmax && qmax <= 127, "ouromamba::quantize: range [", qmin, ", ", qmax,
                    "] does not fit int8");
  return quantize_ref(x, scale, zero_point, qmin, qmax).contiguous();
}

// quant.dequantize
Tensor dequantize(const Tensor& q, const Tensor& scale, const Tensor& zero_point) {
  return dequantize_ref(q, scale, zero_point).contiguous();
}

// quant.quantize_per_token
std::tuple<Tensor, Tensor> quantize_per_token(const Tensor& x_in, int64_t bits) {
  check_float("x", x_in);
  const int64_t qmax = int8_qmax(bits);
  const Tensor x = x_in.to(at::kFloat);
  Tensor scale = dynamic_scale(x, qmax);
  return {quantize_rows(x, scale, qmax), scale};
}

namespace {

Tensor row_scale(const Tensor& scale, int64_t m) {
  return scale.numel() == m ? scale.to(at::kFloat).reshape({-1, 1}) : scale.to(at::kFloat).reshape({1, 1});
}

Tensor epilogue(const Tensor& acc, const Tensor& rows, const Tensor& w_scale, const OptTensor& bias) {
  Tensor y = float_in_place(acc).mul_(rows);
  y.mul_(w_scale.to(at::kFloat).reshape({1, -1}));
  if (bias) y.add_(bias->to(at::kFloat));
  return y;
}

Tensor int8_linear_cpu(const Tensor& x_q, const Tensor& x_scale, const Tensor& w_q, const Tensor& w_scale,
                       const OptTensor& bias) {
  return epilogue(exact_int_mm(x_q, w_q), row_scale(x_scale, x_q.size(0)), w_scale, bias);
}

}  // namespace

// int8_linear.int8_linear
Tensor int8_linear(const Tensor& x_q, const Tensor& x_scale, const Tensor& w_q, const Tensor& w_scale,
                   const OptTensor& bias) {
  TORCH_CHECK_VALUE(!(x_q.dim() != 2 || x_q.scalar_type() != at::kChar || w_q.dim() != 2 ||
                      w_q.scalar_type() != at::kChar),
                    "int8_linear expects int8 x_q (M, K) and w_q (N, K), got x_q ", py_dtype(x_q.scalar_type()), " ",
                    py_shape(x_q.sizes()), " and w_q ", py_dtype(w_q.scalar_type()), " ", py_shape(w_q.sizes()));
  TORCH_CHECK_VALUE(x_q.size(1) == w_q.size(1), "int8_linear: K mismatch, x_q ", py_shape(x_q.sizes()), " vs w_q ",
                    py_shape(w_q.sizes()));
  check_float("x_scale", x_scale);
  const int64_t m = x_q.size(0);
  const bool per_row = (x_scale.dim() == 2 && x_scale.size(0) == m && x_scale.size(1) == 1) ||
                       (x_scale.dim() == 1 && x_scale.size(0) == m);
  TORCH_CHECK_VALUE(x_scale.numel() == 1 || per_row, "x_scale must be per tensor (one element) or per row (", m,
                    ", 1), got ", py_shape(x_scale.sizes()));
  check_weight(w_scale, bias, w_q.size(0));
  return int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias);
}

// int8_linear.w8a8_linear
Tensor w8a8_linear(const Tensor& x, const Tensor& w_q, const Tensor& w_scale, const OptTensor& bias,
                   const OptTensor& x_scale) {
  check_float("x", x);
  TORCH_CHECK_VALUE(!(x.dim() < 1 || w_q.dim() != 2 || w_q.scalar_type() != at::kChar || x.size(-1) != w_q.size(1)),
                    "w8a8_linear expects x (..., K) and int8 w_q (N, K), got x ", py_shape(x.sizes()), ", w_q ",
                    py_dtype(w_q.scalar_type()), " ", py_shape(w_q.sizes()));
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  if (x_scale) check_broadcast_scale("x_scale", *x_scale, lead);
  check_weight(w_scale, bias, w_q.size(0));
  const int64_t k = x.size(-1);
  const Tensor x2 = x.reshape({-1, k}).to(at::kFloat);
  Tensor xs;
  if (!x_scale) {
    xs = dynamic_scale(x2, 127);
  } else {
    auto shape = lead.vec();
    shape.push_back(1);
    xs = x_scale->to(at::kFloat).expand(shape).reshape({-1, 1});
  }
  const Tensor x_q = quantize_rows(x2, xs, 127);
  auto out = lead.vec();
  out.push_back(w_q.size(0));
  return int8_linear_cpu(x_q, xs, w_q, w_scale, bias).reshape(out);
}

namespace {

OptTensor conv_steps(const OptTensor& t, int64_t length) {
  if (!t) return std::nullopt;
  Tensor flat = t->detach().reshape({-1}).to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(flat.numel() == 1 || flat.numel() == length, "causal_conv1d_silu: a quantization parameter has ",
                    flat.numel(), " values; expected 1 or one per time step (", length, ")");
  return flat;
}

// The in_scale / in_wscale / in_bias arguments of the conv ops: checked, as the C++ kernel takes
// them (flat float32; empty tensors when absent).
struct ConvEpilogue {
  Tensor xs, ws, b;
  bool on() const { return xs.numel() > 0; }
};

ConvEpilogue conv_epilogue(const Tensor& x, const OptTensor& in_scale, const OptTensor& in_wscale,
                           const OptTensor& in_bias) {
  const Tensor empty = at::empty({0}, at::kFloat);
  TORCH_CHECK_VALUE(in_scale.has_value() == in_wscale.has_value() && (in_scale.has_value() || !in_bias.has_value()),
                    "causal_conv1d_silu: give in_scale and in_wscale (and optionally in_bias) together, or none");
  if (!in_scale) return {empty, empty, empty};
  const int64_t d = x.size(1), length = x.size(-1);
  const Tensor xs = in_scale->detach().reshape({-1}).to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(xs.numel() == 1 || xs.numel() == length, "causal_conv1d_silu: in_scale has ", xs.numel(),
                    " values; expected 1 or one per time step of x (", length, ")");
  const Tensor ws = in_wscale->detach().reshape({-1}).to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(ws.numel() == d, "causal_conv1d_silu: in_wscale has ", ws.numel(), " values; expected one per "
                    "channel (", d, ")");
  Tensor b = empty;
  if (in_bias) {
    b = in_bias->detach().reshape({-1}).to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(b.numel() == d, "causal_conv1d_silu: in_bias has ", b.numel(), " values; expected one per "
                      "channel (", d, ")");
  }
  return {xs, ws, b};
}

// x made the linear's output: ((x * in_scale[t]) * in_wscale[c]) + in_bias[c] (each op rounded).
Tensor apply_conv_epilogue(const Tensor& x, const ConvEpilogue& e) {
  Tensor y = x.to(at::kFloat) * e.xs.reshape({1, 1, -1});
  y = y * e.ws.reshape({1, -1, 1});
  return e.b.numel() ? y + e.b.reshape({1, -1, 1}) : y;
}

Tensor causal_conv1d_silu_ref(const Tensor& x_in, const Tensor& weight, const OptTensor& bias, const OptTensor& scale,
                              const OptTensor& zero_point, int64_t qmin, int64_t qmax, bool reverse) {
  Tensor x = x_in.to(at::kFloat);
  if (reverse) x = x.flip(-1);
  const int64_t length = x.size(-1);
  if (scale) {
    const Tensor s = conv_steps(scale, length)->reshape({1, 1, -1});
    const Tensor z = conv_steps(zero_point, length)->reshape({1, 1, -1});
    x = dequantize_ref(quantize_ref(x, s, z, qmin, qmax), s, z);
  }
  const int64_t k = weight.size(-1);
  OptTensor b;
  if (bias) b = bias->to(at::kFloat);
  Tensor y = at::conv1d(x, weight.to(at::kFloat), b, {1}, {k - 1}, {1}, x.size(1));
  y = at::silu(y.slice(-1, 0, length));
  return y.transpose(1, 2).contiguous().transpose(1, 2);
}

}  // namespace

// conv1d_silu.causal_conv1d_silu
Tensor causal_conv1d_silu(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& scale,
                          const OptTensor& zero_point, int64_t qmin, int64_t qmax, bool reverse,
                          const OptTensor& in_scale, const OptTensor& in_wscale, const OptTensor& in_bias) {
  TORCH_CHECK_VALUE(!(x.dim() != 3 || weight.dim() != 3 || weight.size(1) != 1 || weight.size(0) != x.size(1)),
                    "causal_conv1d_silu: expected x (B, D, L) and a depthwise weight (D, 1, K); got ",
                    py_shape(x.sizes()), " and ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(scale.has_value() == zero_point.has_value(),
                    "causal_conv1d_silu: give both scale and zero_point, or neither");
  const ConvEpilogue e = conv_epilogue(x, in_scale, in_wscale, in_bias);
  if (weight.size(-1) > 16)
    return causal_conv1d_silu_ref(e.on() ? apply_conv_epilogue(x, e) : x, weight, bias, scale, zero_point, qmin, qmax,
                                  reverse);
  Tensor xf = x.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.transpose(1, 2).contiguous().transpose(1, 2);
  const int64_t length = x.size(-1);
  const Tensor empty = at::empty({0}, at::kFloat);
  const OptTensor s = conv_steps(scale, length), z = conv_steps(zero_point, length);
  const Tensor out = ouromamba_mixer::conv_silu(
      xf, weight.detach().to(at::kFloat).reshape({weight.size(0), -1}).t().contiguous(),
      bias ? bias->detach().to(at::kFloat).contiguous() : empty, s ? *s : empty, z ? *z : empty, qmin, qmax,
      reverse, e.xs, e.ws, e.b);
  return out.transpose(1, 2);
}

// conv1d_silu.causal_conv1d_silu_codes
std::tuple<Tensor, Tensor> causal_conv1d_silu_codes(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                    const OptTensor& scale, const OptTensor& zero_point, int64_t qmin,
                                                    int64_t qmax, bool reverse, const Tensor& code_scale,
                                                    int64_t code_qmin, int64_t code_qmax, const OptTensor& in_scale,
                                                    const OptTensor& in_wscale, const OptTensor& in_bias) {
  TORCH_CHECK_VALUE(!(x.dim() != 3 || weight.dim() != 3 || weight.size(1) != 1 || weight.size(0) != x.size(1)),
                    "causal_conv1d_silu: expected x (B, D, L) and a depthwise weight (D, 1, K); got ",
                    py_shape(x.sizes()), " and ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(scale.has_value() == zero_point.has_value(),
                    "causal_conv1d_silu: give both scale and zero_point, or neither");
  TORCH_CHECK_VALUE(-128 <= code_qmin && code_qmin <= code_qmax && code_qmax <= 127,
                    "causal_conv1d_silu_codes: the codes' range [", code_qmin, ", ", code_qmax,
                    "] must lie in [-128, 127] (int8)");
  const int64_t length = x.size(-1);
  const OptTensor cs = conv_steps(code_scale, length);
  const ConvEpilogue e = conv_epilogue(x, in_scale, in_wscale, in_bias);
  if (weight.size(-1) > 16) {  // the reference conv, then the codes of its output
    const Tensor y = causal_conv1d_silu(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale, in_wscale,
                                        in_bias);
    const Tensor q = at::round(y.transpose(1, 2) / cs->reshape({1, -1, 1})).clamp(code_qmin, code_qmax);
    return {y, q.to(at::kChar).contiguous()};
  }
  Tensor xf = x.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.transpose(1, 2).contiguous().transpose(1, 2);
  const Tensor empty = at::empty({0}, at::kFloat);
  const OptTensor s = conv_steps(scale, length), z = conv_steps(zero_point, length);
  const auto out = ouromamba_mixer::conv_silu_codes(
      xf, weight.detach().to(at::kFloat).reshape({weight.size(0), -1}).t().contiguous(),
      bias ? bias->detach().to(at::kFloat).contiguous() : empty, s ? *s : empty, z ? *z : empty, qmin, qmax,
      reverse, *cs, code_qmin, code_qmax, e.xs, e.ws, e.b);
  return {out[0].transpose(1, 2), out[1]};
}

// scan.selective_scan / selective_scan_cl / selective_scan_bwd
Tensor selective_scan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                      const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus) {
  return ouromamba_scan::selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, false, false, false,
                                            std::nullopt, std::nullopt, std::nullopt);
}

Tensor selective_scan_cl(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                         const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus,
                         bool fast_decay, bool z_reverse, const OptTensor& z_scale, const OptTensor& z_wscale,
                         const OptTensor& z_bias) {
  return ouromamba_scan::selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, true, fast_decay,
                                            z_reverse, z_scale, z_wscale, z_bias);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& dout, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus) {
  auto g = ouromamba_scan::selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  auto get = [&](size_t i) { return g[i] ? *g[i] : at::empty({0}, u.options()); };
  return {get(0), get(1), get(2), get(3), get(4), get(5), get(6), get(7)};
}

// mixed.mixed_fake_quant
Tensor mixed_fake_quant(const Tensor& x, const Tensor& inlier_scale, int64_t token_axis, int64_t channel_axis,
                        int64_t inlier_bits, int64_t outlier_bits, double k, int64_t n_refresh) {
  if (!cpp_mixed(inlier_bits, outlier_bits)) {
    // the reference (ouromamba::quantize_mixed), in the layout the fake implementation promises
    const auto op = python_op("ouromamba::quantize_mixed", "ouromamba::mixed_fake_quant with these bit widths");
    torch::jit::Stack st{x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh};
    op.callBoxed(&st);
    const Tensor ref = st[0].toTensor();
    return from_rows(as_rows(ref, token_axis, channel_axis).contiguous(), x, token_axis, channel_axis);
  }
  auto [rows, s_in] = mixed_rows(x, inlier_scale, token_axis, channel_axis);
  auto y = ouromamba_mixer::mixed_quant(rows, s_in, qmax_of(inlier_bits), k, n_refresh, true, 0);
  return from_rows(y[0], x, token_axis, channel_axis);
}

namespace {

std::vector<int64_t> out_shape(const Tensor& x, int64_t n) {
  auto s = x.sizes().slice(0, x.dim() - 1).vec();
  s.push_back(n);
  return s;
}

Tensor detect_float_product(const Tensor& x, const Tensor& rows, const Tensor& s_in, const Tensor& w_packed,
                            const Tensor& w_scale, const OptTensor& bias, int64_t k, double outlier_k,
                            int64_t n_refresh) {
  auto y = ouromamba_mixer::mixed_quant(rows, s_in, 7, outlier_k, n_refresh, true, 0);
  const Tensor w_f = cached_pair(w_packed, w_scale, "int4:float", [&] {
    return std::vector<Tensor>{dequantized_int4(w_packed, w_scale, k)};
  })[0];
  OptTensor b_f;
  if (bias) b_f = bias->detach().to(at::kFloat);
  return at::linear(y[0].view(out_shape(x, k)), w_f, b_f);
}

// w4a4o8_linear._dense_outliers
bool dense_outliers(const Tensor& q_out, int64_t n) {
  if (!cpu_has_amx()) return false;
  const int64_t np = (n + kOutCols - 1) / kOutCols * kOutCols;
  return ouromamba_mixer::outlier_density(q_out) * static_cast<double>(np * kDenseOutlierRatio) >=
         static_cast<double>(n);
}

Tensor detect_int_gemm(const Tensor& x, const Tensor& rows, const Tensor& s_in, const Tensor& w_packed,
                       const Tensor& w_scale, const OptTensor& bias, int64_t k, double outlier_k, int64_t n_refresh) {
  const bool emu = emulated();
  const bool u4 = emu && ouromamba_mixer::u4_available();
  const bool u8 = emu && !u4 && u8_exact(7, 8);
  const int64_t offset = u4 ? 8 : u8 ? 128 : 0;
  auto split = ouromamba_mixer::mixed_quant(rows, s_in, 7, outlier_k, n_refresh, false, offset);
  const Tensor &q_in = split[0], &q_out = split[1], &s_out = split[2];
  const int64_t m = q_in.size(0) * q_in.size(1);
  // made (and cached) only where the epilogue's tiles run: the dense outlier GEMM does not read it
  const auto w_o = [&] {
    return cached(w_packed, "int4:outlier", [&] {
      return std::vector<Tensor>{ouromamba_mixer::outlier_weights(unpack_int4(w_packed, k))};
    })[0];
  };
  const Tensor w_s = cached(w_scale, "float", [&] {
    return std::vector<Tensor>{w_scale.detach().to(at::kFloat).reshape({-1}).contiguous()};
  })[0];
  const Tensor b = bias ? bias->detach().to(at::kFloat).contiguous() : at::empty({0}, at::kFloat);
  Tensor y;
  if (u4) {
    const auto pc = cached(w_packed, "u4", [&] { return ouromamba_mixer::u4_pack(unpack_int4(w_packed, k)); });
    y = ouromamba_mixer::u4_linear(q_in.view({m, k}), pc[0], pc[1], s_in, q_out.view({m, k}), s_out.view({m}), w_o(),
                                   w_s, b);
  } else if (!emu && onednn_s8()) {
    const auto weight = [&] { return unpack_int4(w_packed, k); };
    const Tensor acc = s8_mm(q_in.view({m, k}), weight, w_packed);
    if (dense_outliers(q_out.view({m, k}), w_packed.size(0))) {
      const Tensor o = s8_mm(q_out.view({m, k}), weight, w_packed);
      y = ouromamba_mixer::w4a4o8_finish(acc, o, s_in, q_out.view({m, k}), s_out.view({m}), w_s, b);
    } else {
      y = ouromamba_mixer::w4a4o8_epilogue(acc, s_in, q_out.view({m, k}), s_out.view({m}), w_o(), w_s, b);
    }
  } else {
    const Tensor w_t = cached(w_packed, "int4:kn", [&] {
      return std::vector<Tensor>{unpack_int4(w_packed, k).t().contiguous()};
    })[0];
    const Tensor acc = u8 ? u8_mm(q_in.view({m, k}), w_t.t(), w_packed)
                          : exact_int_mm(q_in.view({m, k}), w_t.t()).contiguous();
    y = ouromamba_mixer::w4a4o8_epilogue(acc, s_in, q_out.view({m, k}), s_out.view({m}), w_o(), w_s, b);
  }
  return y.reshape(out_shape(x, w_packed.size(0)));
}

}  // namespace

// w4a4o8_linear.w4a4o8_linear_detect
Tensor w4a4o8_linear_rt(const Tensor& x, const Tensor& inlier_scale, const Tensor& w_packed, const Tensor& w_scale,
                        const OptTensor& bias, int64_t k, double outlier_k, int64_t n_refresh) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-1) == k, "w4a4o8_linear_rt: x must be (..., L, ", k, "); got ",
                    py_shape(x.sizes()));
  auto [rows, s_in] = mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1);
  if (k < kSmallK) return detect_float_product(x, rows, s_in, w_packed, w_scale, bias, k, outlier_k, n_refresh);
  return detect_int_gemm(x, rows, s_in, w_packed, w_scale, bias, k, outlier_k, n_refresh);
}

// w4a4o8_linear.w4a4o8_linear_detect_requant
Tensor w4a4o8_linear_mixed(const Tensor& x, const Tensor& inlier_scale, const Tensor& w_packed, const Tensor& w_scale,
                           const OptTensor& bias, int64_t k, double outlier_k, int64_t n_refresh,
                           const Tensor& out_scale, int64_t out_token_axis, int64_t out_channel_axis, int64_t out_bits,
                           double out_k, int64_t out_refresh) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-1) == k, "w4a4o8_linear_mixed: x must be (..., L, ", k, "); got ",
                    py_shape(x.sizes()));
  const bool last_two = py_mod(out_token_axis, x.dim()) == x.dim() - 2 && py_mod(out_channel_axis, x.dim()) == x.dim() - 1;
  if (!(cpp_mixed(kInlierBits, 8) && cpp_mixed(out_bits, 8) && k < kSmallK && last_two)) {
    const Tensor y = w4a4o8_linear_rt(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh);
    return mixed_fake_quant(y, out_scale, out_token_axis, out_channel_axis, out_bits, 8, out_k, out_refresh)
        .contiguous();
  }
  auto [rows, s_in] = mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1);
  auto xq = ouromamba_mixer::mixed_quant(rows, s_in, 7, outlier_k, n_refresh, true, 0);
  const Tensor w_kn = cached_pair(w_packed, w_scale, "int4:float:kn", [&] {
    return std::vector<Tensor>{dequantized_int4(w_packed, w_scale, k).t().contiguous()};
  })[0];
  const Tensor b = bias ? bias->detach().to(at::kFloat).contiguous() : at::empty({0}, at::kFloat);
  const Tensor s_out = step_scales(out_scale, rows.size(1));
  const Tensor y = ouromamba_mixer::linear_mixed_fake(xq[0], w_kn, b, s_out, qmax_of(out_bits), out_k, out_refresh);
  return y.view(out_shape(x, w_packed.size(0)));
}

}  // namespace ouromamba_ops
