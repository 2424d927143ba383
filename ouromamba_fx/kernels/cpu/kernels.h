// The entry points of the CPU kernels, one namespace per source file, for the registration in
// register.cpp and the op implementations in ops.cpp. Plain libtorch (ATen) code: the same
// sources build the library Python loads (ouromamba_fx/kernels/cpu/build.py) and the one a C++
// program links (examples/cpp/CMakeLists.txt).

#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace ouromamba_mixer {

// x (B, D, L) float32 with channel stride 1; w (K, D); bias (D,) or empty; scale / zp (L,) or (1,)
// float32, or empty; in_scale (L,) or (1,) float32, or empty: x is then a linear's raw accumulator,
// made its output ((x * in_scale[t]) * in_wscale[c]) + in_bias[c] on load (in_wscale (D,), in_bias
// (D,) or empty; t: x's own time step). Returns (B, L, D).
at::Tensor conv_silu(at::Tensor x, at::Tensor w, at::Tensor bias, at::Tensor scale, at::Tensor zp, int64_t qmin,
                     int64_t qmax, bool reverse, at::Tensor in_scale, at::Tensor in_wscale, at::Tensor in_bias);
// conv_silu that also returns the int8 codes (B, L, D) of its output for the scale code_scale ((L,)
// or (1,) float32) and the range [code_qmin, code_qmax]: [y, codes].
std::vector<at::Tensor> conv_silu_codes(at::Tensor x, at::Tensor w, at::Tensor bias, at::Tensor scale, at::Tensor zp,
                                        int64_t qmin, int64_t qmax, bool reverse, at::Tensor code_scale,
                                        int64_t code_qmin, int64_t code_qmax, at::Tensor in_scale,
                                        at::Tensor in_wscale, at::Tensor in_bias);
// [q_in, q_out, s_out] (integer mode) or [y] (fake mode); see mixer_ops.cpp.
std::vector<at::Tensor> mixed_quant(at::Tensor x, at::Tensor s_in, int64_t qi, double k, int64_t n_refresh,
                                    bool fake, int64_t in_offset);
at::Tensor linear_mixed_fake(at::Tensor x, at::Tensor wt, at::Tensor bias, at::Tensor s_out, int64_t qi, double k,
                             int64_t n_refresh);
at::Tensor outlier_weights(at::Tensor w);
// In place on acc; returns acc seen as float32.
at::Tensor w4a4o8_epilogue(at::Tensor acc, at::Tensor s_in, at::Tensor q_out, at::Tensor s_out, at::Tensor w_o,
                           at::Tensor w_scale, at::Tensor bias);
// The fraction of non-zero codes of q_out (M, K) int8, sampled on every 8th row.
double outlier_density(at::Tensor q_out);
// w4a4o8_epilogue with the outlier term o (M, N) float32 given; in place on acc (float32).
at::Tensor w4a4o8_finish(at::Tensor acc, at::Tensor o, at::Tensor s_in, at::Tensor q_out, at::Tensor s_out,
                         at::Tensor w_scale, at::Tensor bias);
bool u4_available();
std::vector<at::Tensor> u4_pack(at::Tensor w);
at::Tensor u4_mm(at::Tensor a, at::Tensor packed, at::Tensor colsum);
at::Tensor s16_pack(at::Tensor w);
at::Tensor s16_mm(at::Tensor q, at::Tensor packed, int64_t n);
at::Tensor u4_linear(at::Tensor a, at::Tensor packed, at::Tensor colsum, at::Tensor s_in, at::Tensor q_out,
                     at::Tensor s_out, at::Tensor w_o, at::Tensor w_scale, at::Tensor bias);

}  // namespace ouromamba_mixer

namespace ouromamba_scan {

at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                              bool delta_softplus, bool channels_last, bool fast_decay, bool z_reverse,
                              const std::optional<at::Tensor>& z_scale, const std::optional<at::Tensor>& z_wscale,
                              const std::optional<at::Tensor>& z_bias);
// ouromamba::selective_scan_dt (its schema's arguments): delta computed inside the scan from the x_proj
// columns dt_in (W8A8's dt_proj, then the fake quantization of delta); see selective_scan.cpp.
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
                                 const std::optional<at::Tensor>& z_wscale, const std::optional<at::Tensor>& z_bias);
// [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias], nullopt for absent inputs.
std::vector<std::optional<at::Tensor>> selective_scan_bwd(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus);

}  // namespace ouromamba_scan

namespace ouromamba_qscan {

at::Tensor qscan_fwd(const at::Tensor& u, const at::Tensor& delta, const std::optional<at::Tensor>& delta_scale,
                     const std::optional<at::Tensor>& delta_zp, const at::Tensor& A, const at::Tensor& B,
                     const std::optional<at::Tensor>& B_scale, const std::optional<at::Tensor>& B_zp,
                     const at::Tensor& C, const std::optional<at::Tensor>& C_scale,
                     const std::optional<at::Tensor>& C_zp, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                     bool delta_softplus, const at::Tensor& r_c, const at::Tensor& r_l, const at::Tensor& r_n,
                     const at::Tensor& state_scale, int64_t qmax);
std::vector<at::Tensor> state_stats(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                    const at::Tensor& B, const std::optional<at::Tensor>& delta_bias,
                                    bool delta_softplus);

}  // namespace ouromamba_qscan

namespace ouromamba_ops {

using OptTensor = std::optional<at::Tensor>;

// The CPU kernels of the public ouromamba::* ops (ops.cpp), named as the ops.
at::Tensor quantize(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                    int64_t qmax);
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point);
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t bits);
at::Tensor int8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                       const at::Tensor& w_scale, const OptTensor& bias);
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale, const OptTensor& bias,
                       const OptTensor& x_scale);
at::Tensor causal_conv1d_silu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                              const OptTensor& scale, const OptTensor& zero_point, int64_t qmin, int64_t qmax,
                              bool reverse, const OptTensor& in_scale = std::nullopt,
                              const OptTensor& in_wscale = std::nullopt, const OptTensor& in_bias = std::nullopt);
std::tuple<at::Tensor, at::Tensor> causal_conv1d_silu_codes(const at::Tensor& x, const at::Tensor& weight,
                                                             const OptTensor& bias, const OptTensor& scale,
                                                             const OptTensor& zero_point, int64_t qmin, int64_t qmax,
                                                             bool reverse, const at::Tensor& code_scale,
                                                             int64_t code_qmin, int64_t code_qmax,
                                                             const OptTensor& in_scale = std::nullopt,
                                                             const OptTensor& in_wscale = std::nullopt,
                                                             const OptTensor& in_bias = std::nullopt);
at::Tensor selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                          bool delta_softplus);
at::Tensor selective_scan_cl(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                             const OptTensor& delta_bias, bool delta_softplus, bool fast_decay, bool z_reverse,
                             const OptTensor& z_scale, const OptTensor& z_wscale, const OptTensor& z_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                   const OptTensor& delta_bias, bool delta_softplus);
at::Tensor mixed_fake_quant(const at::Tensor& x, const at::Tensor& inlier_scale, int64_t token_axis,
                            int64_t channel_axis, int64_t inlier_bits, int64_t outlier_bits, double k,
                            int64_t n_refresh);
at::Tensor w4a4o8_linear_rt(const at::Tensor& x, const at::Tensor& inlier_scale, const at::Tensor& w_packed,
                            const at::Tensor& w_scale, const OptTensor& bias, int64_t k, double outlier_k,
                            int64_t n_refresh);
at::Tensor w4a4o8_linear_mixed(const at::Tensor& x, const at::Tensor& inlier_scale, const at::Tensor& w_packed,
                               const at::Tensor& w_scale, const OptTensor& bias, int64_t k, double outlier_k,
                               int64_t n_refresh, const at::Tensor& out_scale, int64_t out_token_axis,
                               int64_t out_channel_axis, int64_t out_bits, double out_k, int64_t out_refresh);

// The public ``ouromamba::*`` ops with a C++ CPU kernel (ops.cpp): their schemas, exactly as the
// Python package defines them (a C++ process without Python defines them from this list).
const std::vector<const char*>& public_schemas();

// The integer GEMM path of the calling thread: 0 auto (this CPU's), 1 torch._int_mm, 2 emulated;
// set_gemm_choice returns the previous choice. gemm_mode() is the effective one (1 or 2).
int64_t set_gemm_choice(int64_t choice);
int64_t gemm_mode();
// The tags of the per-weight cache entries kept for ``key`` (which layouts the kernels made of it).
std::vector<std::string> cached_tags(const at::Tensor& key);

// Registers (true) or removes (false) the C++ CPU kernels of the public ops; returns whether they
// were registered.
bool set_dispatch(bool on);

}  // namespace ouromamba_ops
