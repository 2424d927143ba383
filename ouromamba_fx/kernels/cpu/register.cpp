// Registration of the CPU kernels with the PyTorch dispatcher: the only file of this folder that
// names ops.
//
// * ouromamba_cpu::* -- the kernels themselves (what the Python ops of ouromamba_fx/ops/ call
//   where they still compose them in Python) and the library's controls. Always registered.
// * ouromamba::* -- the public ops' CPU kernels (ops.cpp). Their schemas belong to the Python
//   package, which defines every op (with its fake implementation, autograd and CUDA kernels) at
//   import and then asks this library for the CPU kernels (ouromamba_cpu::set_dispatch). In a
//   process without Python (a C++ program running an AOTInductor package) nobody has defined them
//   when the library is loaded: it then defines them itself, from public_schemas(), and registers
//   its kernels at once. Each op is defined once per process either way.

#include "kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <mutex>

namespace ouromamba_ops {

const std::vector<const char*>& public_schemas() {
  // Exactly the schemas the Python package gives these ops (tests/test_cpp_ops.py compares them).
  static const std::vector<const char*> schemas = {
      "ouromamba::quantize(Tensor x, Tensor scale, Tensor zero_point, SymInt qmin, SymInt qmax) -> Tensor",
      "ouromamba::dequantize(Tensor q, Tensor scale, Tensor zero_point) -> Tensor",
      "ouromamba::quantize_per_token(Tensor x, int bits) -> (Tensor q, Tensor scale)",
      "ouromamba::int8_linear(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor",
      "ouromamba::w8a8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? x_scale) -> Tensor",
      "ouromamba::causal_conv1d_silu(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point, "
      "int qmin, int qmax, bool reverse, Tensor? in_scale=None, Tensor? in_wscale=None, Tensor? in_bias=None) "
      "-> Tensor",
      "ouromamba::causal_conv1d_silu_codes(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, "
      "Tensor? zero_point, int qmin, int qmax, bool reverse, Tensor code_scale, int code_qmin, int code_qmax, "
      "Tensor? in_scale=None, Tensor? in_wscale=None, Tensor? in_bias=None) -> (Tensor, Tensor)",
      "ouromamba::selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus) -> Tensor",
      "ouromamba::selective_scan_cl(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, bool fast_decay=False, bool z_reverse=False, Tensor? z_scale=None, "
      "Tensor? z_wscale=None, Tensor? z_bias=None) -> Tensor",
      "ouromamba::selective_scan_dt"
      "(Tensor u, Tensor dt_in, Tensor dt_scale, int dt_qmin, int dt_qmax, Tensor dt_weight, Tensor dt_wscale, "
      "Tensor? dt_bias, Tensor delta_scale, Tensor delta_zp, int delta_qmin, int delta_qmax, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, bool channels_last=False, "
      "bool fast_decay=False, bool z_reverse=False, Tensor? combine=None, Tensor? code_scale=None, "
      "int code_qmin=-127, int code_qmax=127, Tensor? z_scale=None, Tensor? z_wscale=None, Tensor? z_bias=None) "
      "-> Tensor",
      "ouromamba::selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)",
      "ouromamba::mixed_fake_quant(Tensor x, Tensor inlier_scale, int token_axis, int channel_axis, int inlier_bits, "
      "int outlier_bits, float k, int n_refresh) -> Tensor",
      "ouromamba::w4a4o8_linear_rt(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
      "int k, float outlier_k, int n_refresh) -> Tensor",
      "ouromamba::w4a4o8_linear_mixed(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
      "int k, float outlier_k, int n_refresh, Tensor out_scale, int out_token_axis, int out_channel_axis, "
      "int out_bits, float out_k, int out_refresh) -> Tensor",
  };
  return schemas;
}

namespace {

std::mutex g_mu;
std::unique_ptr<torch::Library> g_defs;   // the schemas, when this library defined them
std::unique_ptr<torch::Library> g_impls;  // the public ops' CPU kernels while registered

void register_impls() {
  g_impls = std::make_unique<torch::Library>(torch::Library::IMPL, "ouromamba", c10::DispatchKey::CPU, __FILE__,
                                             __LINE__);
  auto& m = *g_impls;
  m.impl("quantize", TORCH_FN(quantize));
  m.impl("dequantize", TORCH_FN(dequantize));
  m.impl("quantize_per_token", TORCH_FN(quantize_per_token));
  m.impl("int8_linear", TORCH_FN(int8_linear));
  m.impl("w8a8_linear", TORCH_FN(w8a8_linear));
  m.impl("causal_conv1d_silu", TORCH_FN(causal_conv1d_silu));
  m.impl("causal_conv1d_silu_codes", TORCH_FN(causal_conv1d_silu_codes));
  m.impl("selective_scan", TORCH_FN(selective_scan));
  m.impl("selective_scan_cl", TORCH_FN(selective_scan_cl));
  m.impl("selective_scan_dt", TORCH_FN(ouromamba_scan::selective_scan_dt_fwd));  // (selective_scan.cpp)
  m.impl("selective_scan_bwd", TORCH_FN(selective_scan_bwd));
  m.impl("mixed_fake_quant", TORCH_FN(mixed_fake_quant));
  m.impl("w4a4o8_linear_rt", TORCH_FN(w4a4o8_linear_rt));
  m.impl("w4a4o8_linear_mixed", TORCH_FN(w4a4o8_linear_mixed));
}

bool defined(const char* schema) {
  const std::string s(schema);
  const std::string name = s.substr(0, s.find('('));
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
}

// On load: in a process where the package has not defined the ops (no Python), define and register.
struct DefineWithoutPython {
  DefineWithoutPython() {
    for (const char* s : public_schemas()) {
      if (defined(s)) return;  // the Python package owns the definitions; it calls set_dispatch
    }
    std::lock_guard<std::mutex> lock(g_mu);
    g_defs = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "ouromamba", std::nullopt, __FILE__, __LINE__);
    for (const char* s : public_schemas()) g_defs->def(s, {at::Tag::pt2_compliant_tag});
    register_impls();
  }
};
const DefineWithoutPython g_define_without_python;

}  // namespace

bool set_dispatch(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  const bool was = static_cast<bool>(g_impls);
  if (on && !was) {
    for (const char* s : public_schemas()) {
      TORCH_CHECK(defined(s), "ouromamba_cpu::set_dispatch: ", s, " is not defined (import ouromamba_fx first)");
    }
    register_impls();
  } else if (!on && was) {
    g_impls.reset();
  }
  return was;
}

}  // namespace ouromamba_ops

namespace {

std::vector<std::string> public_schema_strings() {
  const auto& s = ouromamba_ops::public_schemas();
  return std::vector<std::string>(s.begin(), s.end());
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  auto g = ouromamba_scan::selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  std::vector<at::Tensor> out;
  for (auto& t : g) out.push_back(t ? *t : at::empty({0}, u.options()));
  return out;
}

}  // namespace

TORCH_LIBRARY(ouromamba_cpu, m) {
  // the kernels (kernels.h); shapes and dtypes as documented there
  m.def("conv_silu(Tensor x, Tensor w, Tensor bias, Tensor scale, Tensor zp, int qmin, int qmax, bool reverse, "
        "Tensor in_scale, Tensor in_wscale, Tensor in_bias) "
        "-> Tensor");
  m.def("conv_silu_codes(Tensor x, Tensor w, Tensor bias, Tensor scale, Tensor zp, int qmin, int qmax, bool reverse, "
        "Tensor code_scale, int code_qmin, int code_qmax, Tensor in_scale, Tensor in_wscale, Tensor in_bias) "
        "-> Tensor[]");
  m.def("mixed_quant(Tensor x, Tensor s_in, int qi, float k, int n_refresh, bool fake, int in_offset) -> Tensor[]");
  m.def("linear_mixed_fake(Tensor x, Tensor wt, Tensor bias, Tensor s_out, int qi, float k, int n_refresh) -> Tensor");
  m.def("outlier_weights(Tensor w) -> Tensor");
  m.def("w4a4o8_epilogue(Tensor(a!) acc, Tensor s_in, Tensor q_out, Tensor s_out, Tensor w_o, Tensor w_scale, "
        "Tensor bias) -> Tensor(a)");
  m.def("outlier_density(Tensor q_out) -> float");
  m.def("w4a4o8_finish(Tensor(a!) acc, Tensor o, Tensor s_in, Tensor q_out, Tensor s_out, Tensor w_scale, "
        "Tensor bias) -> Tensor(a)");
  m.def("u4_pack(Tensor w) -> Tensor[]");
  m.def("u4_mm(Tensor a, Tensor packed, Tensor colsum) -> Tensor");
  m.def("s16_pack(Tensor w) -> Tensor");
  m.def("s16_mm(Tensor q, Tensor packed, int n) -> Tensor");
  m.def("u4_linear(Tensor a, Tensor packed, Tensor colsum, Tensor s_in, Tensor q_out, Tensor s_out, Tensor w_o, "
        "Tensor w_scale, Tensor bias) -> Tensor");
  m.def("scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "bool delta_softplus, bool channels_last=False, bool fast_decay=False, bool z_reverse=False, "
        "Tensor? z_scale=None, Tensor? z_wscale=None, Tensor? z_bias=None) -> Tensor");
  m.def("scan_dt_fwd"
        "(Tensor u, Tensor dt_in, Tensor dt_scale, int dt_qmin, int dt_qmax, Tensor dt_weight, Tensor dt_wscale, "
        "Tensor? dt_bias, Tensor delta_scale, Tensor delta_zp, int delta_qmin, int delta_qmax, Tensor A, Tensor B, "
        "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, bool channels_last=False, "
        "bool fast_decay=False, bool z_reverse=False, Tensor? combine=None, Tensor? code_scale=None, "
        "int code_qmin=-127, int code_qmax=127, Tensor? z_scale=None, Tensor? z_wscale=None, Tensor? z_bias=None) "
        "-> Tensor");
  m.def("scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus) -> Tensor[]");
  m.def("qscan_fwd(Tensor u, Tensor delta, Tensor? delta_scale, Tensor? delta_zp, Tensor A, Tensor B, "
        "Tensor? B_scale, Tensor? B_zp, Tensor C, Tensor? C_scale, Tensor? C_zp, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, Tensor r_c, Tensor r_l, Tensor r_n, Tensor state_scale, "
        "int qmax) -> Tensor");
  m.def("qscan_state_stats(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? delta_bias, bool delta_softplus) "
        "-> Tensor[]");
  // controls (no tensors: registered for every dispatch key)
  m.def("u4_available() -> bool", &ouromamba_mixer::u4_available);
  m.def("set_gemm_choice(int choice) -> int", &ouromamba_ops::set_gemm_choice);
  m.def("gemm_mode() -> int", &ouromamba_ops::gemm_mode);
  m.def("set_dispatch(bool on) -> bool", &ouromamba_ops::set_dispatch);
  m.def("public_schemas() -> str[]", &public_schema_strings);
  m.def("cached_tags(Tensor key) -> str[]");
}

TORCH_LIBRARY_IMPL(ouromamba_cpu, CPU, m) {
  m.impl("conv_silu", TORCH_FN(ouromamba_mixer::conv_silu));
  m.impl("conv_silu_codes", TORCH_FN(ouromamba_mixer::conv_silu_codes));
  m.impl("mixed_quant", TORCH_FN(ouromamba_mixer::mixed_quant));
  m.impl("linear_mixed_fake", TORCH_FN(ouromamba_mixer::linear_mixed_fake));
  m.impl("outlier_weights", TORCH_FN(ouromamba_mixer::outlier_weights));
  m.impl("w4a4o8_epilogue", TORCH_FN(ouromamba_mixer::w4a4o8_epilogue));
  m.impl("outlier_density", TORCH_FN(ouromamba_mixer::outlier_density));
  m.impl("w4a4o8_finish", TORCH_FN(ouromamba_mixer::w4a4o8_finish));
  m.impl("u4_pack", TORCH_FN(ouromamba_mixer::u4_pack));
  m.impl("u4_mm", TORCH_FN(ouromamba_mixer::u4_mm));
  m.impl("s16_pack", TORCH_FN(ouromamba_mixer::s16_pack));
  m.impl("s16_mm", TORCH_FN(ouromamba_mixer::s16_mm));
  m.impl("u4_linear", TORCH_FN(ouromamba_mixer::u4_linear));
  m.impl("scan_fwd", TORCH_FN(ouromamba_scan::selective_scan_fwd));
  m.impl("scan_dt_fwd", TORCH_FN(ouromamba_scan::selective_scan_dt_fwd));
  m.impl("scan_bwd", TORCH_FN(scan_bwd));
  m.impl("qscan_fwd", TORCH_FN(ouromamba_qscan::qscan_fwd));
  m.impl("qscan_state_stats", TORCH_FN(ouromamba_qscan::state_stats));
  m.impl("cached_tags", TORCH_FN(ouromamba_ops::cached_tags));
}
