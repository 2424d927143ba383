"""Fused CPU ops for the quantized Mamba mixer around its GEMMs and scan (C++: ``kernels/cpu/mixer_ops.cpp``).

* ``ouromamba::causal_conv1d_silu(x, weight, bias, scale, zero_point, qmin, qmax, reverse)`` --
  ``silu(conv1d(fake_quant(x'), weight, bias, padding=K-1, groups=D)[..., :L])`` for ``x`` (B, D, L)
  and a depthwise ``weight`` (D, 1, K), where ``x' = x.flip(-1)`` when ``reverse`` (the backward
  branch of a bidirectional Vim block) and ``fake_quant`` is skipped when ``scale`` is None; the
  scale and zero point are per tensor or per time step (of ``x'``). The result is (B, D, L) with
  channel-contiguous memory (strides ``(L*D, 1, D)``): x_proj (which reads it transposed, as
  (B, L, D)) and the scan read it without a copy. One pass over memory, replacing Inductor's
  quantize-and-transpose kernel, the mkldnn convolution and the SiLU/slice kernel; ``flip`` is
  never materialised.
* ``ouromamba::mixed_fake_quant`` -- ``ouromamba::quantize_mixed`` (OuroMamba-Quant: the outlier
  rule per time-step and sample, inliers at the static step scale, outliers at 8 bits with a
  per-token scale) in one pass per sample, bit for bit the reference's numbers on the tested
  inputs (the rule's mean/std are summed in another order, so a channel sitting exactly on the
  threshold could flip). For the scan's delta/B/C at W4A4O8.
* ``ouromamba::w4a4o8_linear_rt`` -- a whole W4A4O8 linear: the same split into int8 codes, the
  inlier GEMM on the int4 weights unpacked to int8 once and cached beside them (``torch._int_mm``
  where the CPU has VNNI/AMX; without them, :mod:`~ouromamba_fx.lowering.cpu_gemm`, this module's
  ``u4_mm`` kernel on AVX2 -- 4-bit codes x int4 weights summed in int16, exact, about 2.3x an
  fp32 GEMM on a Zen 3 -- else oneDNN u8 x s8 on a weight prepacked once), and an epilogue that adds
  each token's few outlier channels (their rows of the weights, two channels per ``vpmaddubsw``,
  32 columns at a time on AVX2 and 64 on AVX-512, where the channels are also found 64 at a time
  with ``vpcompressb``; exact integer sums) before the scales and the bias, in one pass over the
  output.
  (Below ``SMALL_K`` input channels: the fake-quantized activations times the dequantized
  weights, a float GEMM.)
* ``ouromamba::w4a4o8_linear_mixed`` -- such a short-reduction W4A4O8 linear followed by the
  mixed fake quantization of its output (Vim's dt_proj and the scan's delta) in one pass per row,
  the product kept in the cache between the two.

The reference implementations (plain torch, the same formulas; for ``w4a4o8_linear_rt`` the ops
``outlier_mask`` + ``w4a4o8_linear``, which have Triton kernels) run on devices other than the
CPU and on CPUs where the C++ build failed (with a warning naming the reason, like the scan's).
Numbers of the conv: the reference quantize -> conv1d -> slice -> SiLU up to float summation
order (K products per output) and the exp of SiLU (about 1 ulp).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.cpu.build import MIXER_OPS


def _steps(t: Optional[Tensor], length: int) -> Optional[Tensor]:
    """A per-tensor or per-time-step quantization parameter as a flat float32 vector."""
    if t is None:
        return None
    flat = t.detach().reshape(-1).float().contiguous()
    if flat.numel() not in (1, length):
        raise ValueError(f"causal_conv1d_silu: a quantization parameter has {flat.numel()} values; expected 1 or "
                         f"one per time step ({length})")
    return flat


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                           zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool) -> Tensor:
    """Plain-torch twin of the op (the reference graph's ops in order), same output strides."""
    from ouromamba_fx.lowering.quant import dequantize_ref, quantize_ref

    x = x.float()
    if reverse:
        x = x.flip(-1)
    length = x.shape[-1]
    if scale is not None:
        s = _steps(scale, length).reshape(1, 1, -1)
        z = _steps(zero_point, length).reshape(1, 1, -1)
        x = dequantize_ref(quantize_ref(x, s, z, qmin, qmax), s, z)
    k = weight.shape[-1]
    y = F.conv1d(x, weight.float(), None if bias is None else bias.float(), padding=k - 1, groups=x.shape[1])
    y = F.silu(y[..., :length])
    return y.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("ouromamba::causal_conv1d_silu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point, "
                                "int qmin, int qmax, bool reverse) -> Tensor")
def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool) -> Tensor:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_silu: expected x (B, D, L) and a depthwise weight (D, 1, K); got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if (scale is None) != (zero_point is None):
        raise ValueError("causal_conv1d_silu: give both scale and zero_point, or neither")
    ext = MIXER_OPS.get() if x.device.type == "cpu" and weight.shape[-1] <= 16 else None
    if ext is None:
        return causal_conv1d_silu_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse)
    xf = x.float()
    if xf.stride(1) != 1:  # the kernel reads a time step's channels as one vector
        xf = xf.transpose(1, 2).contiguous().transpose(1, 2)
    length = x.shape[-1]
    empty = torch.empty(0)
    s, z = _steps(scale, length), _steps(zero_point, length)
    out = ext.conv_silu(xf, weight.detach().float().reshape(weight.shape[0], -1).t().contiguous(),
                        empty if bias is None else bias.detach().float().contiguous(),
                        empty if s is None else s, empty if z is None else z, int(qmin), int(qmax),
                        bool(reverse))
    return out.transpose(1, 2)


@causal_conv1d_silu.register_fake
def _(x, weight, bias, scale, zero_point, qmin, qmax, reverse):
    b, d, length = x.shape
    return torch.empty_strided((b, d, length), (length * d, 1, d), dtype=torch.float32, device=x.device)


CONV1D_SILU_OP = torch.ops.ouromamba.causal_conv1d_silu.default


# ---------------------------------------------------------------------------------------------
# Mixed-precision activations (OuroMamba-Quant) in one pass: mask, split, quantize.

def _step_scales(scale: Tensor, length: int) -> Tensor:
    """A site's calibrated per-step scales for ``length`` steps, float32 contiguous (L,)."""
    from ouromamba_fx.lowering.outlier import resample_steps

    return resample_steps(scale.detach().reshape(-1).float(), length).contiguous()


def _dequantized_int4(w_packed: Tensor, w_scale: Tensor, k: int) -> Tensor:
    """The float (N, k) weight of packed int4 codes and their per-channel scales."""
    from ouromamba_fx.lowering.qlinear import unpack_int4

    return unpack_int4(w_packed, k).float() * w_scale.detach().float().reshape(-1, 1)


def _mixed_rows(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int) -> tuple[Tensor, Tensor]:
    """``x`` as (batch, L, C) float32 (a view when possible) and the per-step inlier scales (L,)."""
    y = x.float().movedim((token_axis, channel_axis), (-2, -1))
    rows = y.reshape(-1, y.shape[-2], y.shape[-1])
    return rows, _step_scales(inlier_scale, rows.shape[1])


def _cpp_mixed(x: Tensor, bits: int, outlier_bits: int) -> bool:
    return x.device.type == "cpu" and 2 <= bits <= 8 and outlier_bits == 8 and MIXER_OPS.get() is not None


@torch.library.custom_op("ouromamba::mixed_fake_quant", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, int token_axis, int channel_axis, int inlier_bits, "
                                "int outlier_bits, float k, int n_refresh) -> Tensor")
def mixed_fake_quant_op(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int,
                        outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """``ouromamba::quantize_mixed`` (same arguments, same numbers: mask by the outlier rule, inliers
    at ``inlier_bits`` with the static step scale, outliers at 8 bits per token) in one C++ pass per
    sample on the CPU; the result is in ``x``'s shape (the time-step-major layout of the kernel,
    seen through a permutation when ``x`` is not channels-last). Elsewhere: the reference."""
    from ouromamba_fx.lowering.outlier import as_rows, from_rows, quantize_mixed_ref

    if not _cpp_mixed(x, inlier_bits, outlier_bits):
        ref = quantize_mixed_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh)
        # the layout the fake implementation promises
        return from_rows(as_rows(ref, token_axis, channel_axis).contiguous(), x, token_axis, channel_axis)
    rows, s_in = _mixed_rows(x, inlier_scale, token_axis, channel_axis)
    (y,) = MIXER_OPS.get().mixed_quant(rows, s_in, numerics.qmax(inlier_bits), float(k), int(n_refresh), True, 0)
    return from_rows(y, x, token_axis, channel_axis)


@mixed_fake_quant_op.register_fake
def _(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh):
    from ouromamba_fx.lowering.outlier import from_rows

    moved = x.movedim((token_axis, channel_axis), (-2, -1))
    rows = torch.empty(moved.shape, dtype=torch.float32, device=x.device).reshape(-1, *moved.shape[-2:])
    return from_rows(rows, x, token_axis, channel_axis)


# W4A4O8 linears with fewer input channels than this run on the CPU as a float GEMM of the
# dequantized values instead of the integer GEMM + epilogue (Vim's dt_proj: K = dt_rank).
SMALL_K = 32


@torch.library.custom_op("ouromamba::w4a4o8_linear_rt", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
                                "int k, float outlier_k, int n_refresh) -> Tensor")
def w4a4o8_linear_rt(x: Tensor, inlier_scale: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                     k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """The whole W4A4O8 linear of a ``quantize_mixed -> F.linear`` site, outlier detection included:
    ``x`` (batch, L, K) is split by the outlier rule (threshold ``outlier_k``, windows of
    ``n_refresh`` steps) into 4-bit inliers with the static step scale and 8-bit outliers with a
    per-token scale, in one C++ pass (:func:`mixed_quant`), then multiplied by the packed int4
    weights: one int8 GEMM for the inliers, one over the outlier channels only. Same numbers as
    ``ouromamba::outlier_mask`` followed by ``ouromamba::w4a4o8_linear``, which is what runs on
    other devices. On the CPU, linears with ``k < SMALL_K`` input channels (Vim's dt_proj) multiply
    the dequantized activations by a dequantized copy of the weights in float instead (the same
    values, up to float rounding of the products): so short a reduction gains nothing from an
    integer GEMM, and the epilogue would cost more than the product."""
    from ouromamba_fx.lowering.fused import outlier_mask_op
    from ouromamba_fx.lowering.qlinear import w4a4o8_linear

    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(f"w4a4o8_linear_rt: x must be (..., L, {k}); got {tuple(x.shape)}")
    if not _cpp_mixed(x, 4, 8):
        mask, step = outlier_mask_op(x, inlier_scale, x.dim() - 2, x.dim() - 1, 4, outlier_k, n_refresh)
        return w4a4o8_linear(x, mask, step, w_packed, w_scale, bias, k)
    from ouromamba_fx.lowering import cpu_gemm
    from ouromamba_fx.lowering.qlinear import _int_mm, unpack_int4

    rows, s_in = _mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1)
    ext = MIXER_OPS.get()
    n = w_packed.shape[0]
    if k < SMALL_K:
        # A reduction this short gains nothing from an integer GEMM (a (3152, 24) x (24, 768)
        # product is output-bound): the dequantized activations times the dequantized weights,
        # a float GEMM of the same values (the reference graph's own form of this linear).
        (y,) = ext.mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), True, 0)
        w_f = cpu_gemm.cached_pair(w_packed, w_scale, "int4:float", lambda: _dequantized_int4(w_packed, w_scale, k))
        b_f = None if bias is None else bias.detach().float()
        return F.linear(y.view(*x.shape[:-1], k), w_f, b_f)
    emulated = cpu_gemm.emulated(x.device)
    u4 = emulated and ext.u4_available()
    u8 = emulated and not u4 and cpu_gemm.u8_exact(7, 8)
    offset = 8 if u4 else 128 if u8 else 0
    q_in, q_out, s_out = ext.mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), False, offset)
    m = q_in.shape[0] * q_in.shape[1]
    # outliers: a few channels per token, each adding a row of the weights to the output inside
    # the epilogue (the reference's dense or column-gathered GEMM spends its work on zeros: the
    # union of a batch's outlier channels is most channels, while each token has only a few);
    # those rows laid out once per weight, (K, N rounded up to 64) as w + 8 (kept beside the
    # model's packed weight while it lives)
    w_o = cpu_gemm.cached(w_packed, "int4:outlier", lambda: ext.outlier_weights(unpack_int4(w_packed, k)))
    w_s = cpu_gemm.cached(w_scale, "float", lambda: w_scale.detach().float().reshape(-1).contiguous())
    b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    if u4:
        # no VNNI/AMX, AVX2: the kernel of 4-bit codes (written as q + 8) x int4 weights with int16
        # accumulation, on the weight laid out in column panels once; each block of rows gets its
        # epilogue while its products are in cache
        panels, colsum = cpu_gemm.cached(w_packed, "u4", lambda: ext.u4_pack(unpack_int4(w_packed, k)))
        y = ext.u4_linear(q_in.view(m, k), panels, colsum, s_in, q_out.view(m, k), s_out.view(m), w_o, w_s, b)
    else:
        # int4 -> int8 once per weight (this CPU has no int4 GEMM), laid out (K, N)
        w_t = cpu_gemm.cached(w_packed, "int4:kn", lambda: unpack_int4(w_packed, k).t().contiguous())
        if u8:
            # no VNNI/AMX nor AVX2: oneDNN u8 x s8 on the inliers' u8 codes (q + 128), exact for
            # 4-bit codes x int4 weights (float accumulator)
            acc = cpu_gemm.u8_mm(q_in.view(m, k), w_t.t(), w_packed)
        else:
            acc = _int_mm(q_in.view(m, k), w_t.t()).contiguous()
        y = ext.w4a4o8_epilogue(acc, s_in, q_out.view(m, k), s_out.view(m), w_o, w_s, b)
    return y.reshape(*x.shape[:-1], n)


@w4a4o8_linear_rt.register_fake
def _(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh):
    return torch.empty((*x.shape[:-1], w_packed.shape[0]), dtype=torch.float32, device=x.device)


@torch.library.custom_op("ouromamba::w4a4o8_linear_mixed", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
                                "int k, float outlier_k, int n_refresh, Tensor out_scale, int out_token_axis, "
                                "int out_channel_axis, int out_bits, float out_k, int out_refresh) -> Tensor")
def w4a4o8_linear_mixed(x: Tensor, inlier_scale: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        k: int, outlier_k: float, n_refresh: int, out_scale: Tensor, out_token_axis: int,
                        out_channel_axis: int, out_bits: int, out_k: float, out_refresh: int) -> Tensor:
    """``mixed_fake_quant(w4a4o8_linear_rt(x, ...), out_scale, out_token_axis, out_channel_axis,
    out_bits, 8, out_k, out_refresh)``, contiguous: a W4A4O8 linear whose output is itself
    quantized by the outlier rule (the first eight arguments are ``w4a4o8_linear_rt``'s, the rest
    the output's: step scales, axes, inlier bits, threshold, window), as Vim's dt_proj feeds the
    scan's delta. On the CPU, for a reduction shorter than ``SMALL_K`` (dt_proj's K = dt_rank)
    and the output's tokens and channels on its last two axes, in one C++ pass per row: the
    product of the fake-quantized activations and the dequantized weights (as
    ``w4a4o8_linear_rt`` computes it there), then its mixed fake quantization while the row is in
    the cache; the (batch, L, N) float product never goes through memory. Otherwise the two ops
    in turn. ``x`` is (..., L, K); the result (..., L, N)."""
    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(f"w4a4o8_linear_mixed: x must be (..., L, {k}); got {tuple(x.shape)}")
    last_two = (out_token_axis % x.dim(), out_channel_axis % x.dim()) == (x.dim() - 2, x.dim() - 1)
    if not (_cpp_mixed(x, 4, 8) and _cpp_mixed(x, out_bits, 8) and k < SMALL_K and last_two):
        y = w4a4o8_linear_rt(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh)
        return mixed_fake_quant_op(y, out_scale, out_token_axis, out_channel_axis, out_bits, 8, out_k,
                                   out_refresh).contiguous()
    from ouromamba_fx.lowering import cpu_gemm

    ext = MIXER_OPS.get()
    rows, s_in = _mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1)
    (xq,) = ext.mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), True, 0)
    w_kn = cpu_gemm.cached_pair(w_packed, w_scale, "int4:float:kn",
                                lambda: _dequantized_int4(w_packed, w_scale, k).t().contiguous())
    b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    s_out = _step_scales(out_scale, rows.shape[1])
    y = ext.linear_mixed_fake(xq, w_kn, b, s_out, numerics.qmax(out_bits), float(out_k), int(out_refresh))
    return y.view(*x.shape[:-1], w_packed.shape[0])


@w4a4o8_linear_mixed.register_fake
def _(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh, out_scale, out_token_axis, out_channel_axis,
      out_bits, out_k, out_refresh):
    return torch.empty((*x.shape[:-1], w_packed.shape[0]), dtype=torch.float32, device=x.device)


MIXED_FAKE_QUANT_OP = torch.ops.ouromamba.mixed_fake_quant.default
W4A4O8_LINEAR_RT_OP = torch.ops.ouromamba.w4a4o8_linear_rt.default
W4A4O8_LINEAR_MIXED_OP = torch.ops.ouromamba.w4a4o8_linear_mixed.default
