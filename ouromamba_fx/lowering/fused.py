"""Small building blocks the lowering rewrites reference graphs into (besides the integer linear
ops of :mod:`ouromamba_fx.lowering.qlinear`).

* ``ouromamba::outlier_mask`` -- the OuroMamba outlier mask of a ``quantize_mixed`` site and its
  per-step inlier scales, computed by the very code of the reference
  (:mod:`ouromamba_fx.lowering.outlier`), so the fused W4A4O8 linear sees the same outlier
  channels. A custom op on purpose: Inductor could otherwise recompile the mean/std threshold
  with another summation order and flip channels that sit on the threshold.
* :func:`mixed_fake_quant_decomposed` -- the rest of ``quantize_mixed`` (the fake quantization given the
  mask) as plain torch, for sites that feed float ops (the scan's delta/B/C at W4A4O8).
* :func:`int8_linear_decomposed` -- the W8A8 linear as quantize + ``torch._int_mm`` + epilogue in
  plain torch, so Inductor fuses the quantization and the epilogue with the neighbouring ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.lowering import cpu_gemm
from ouromamba_fx.lowering.outlier import as_rows, from_rows, outlier_mask, resample_steps
from ouromamba_fx.numerics import EPS, is_float


def _step_scale_shape(x: Tensor, token_axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[token_axis] = x.shape[token_axis]
    return shape


@torch.library.custom_op("ouromamba::outlier_mask", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, int token_axis, int channel_axis, "
                         "int inlier_bits, float k, int n_refresh) -> (Tensor mask, Tensor step_scale)")
def outlier_mask_op(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                    inlier_bits: int, k: float, n_refresh: int) -> tuple[Tensor, Tensor]:
    """The outlier mask (bool, ``x``'s shape) of ``quantize_mixed`` with the same arguments, and its
    inlier scale per time-step shaped to broadcast against ``x`` (length of the token axis there,
    1 elsewhere), resampled as the reference does when ``x`` has another sequence length."""
    rows = as_rows(x.float(), token_axis, channel_axis)
    s_in = resample_steps(inlier_scale.reshape(-1).float(), rows.shape[1])
    mask = outlier_mask(rows, s_in, numerics.qmax(inlier_bits), k, n_refresh)
    mask = from_rows(mask, x, token_axis, channel_axis).contiguous()
    return mask, s_in.reshape(_step_scale_shape(x, token_axis)).clone()


@outlier_mask_op.register_fake
def _(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh):
    return (torch.empty(x.shape, dtype=torch.bool, device=x.device),
            torch.empty(_step_scale_shape(x, token_axis), dtype=torch.float32, device=x.device))


OUTLIER_MASK = torch.ops.ouromamba.outlier_mask.default


def mixed_fake_quant_decomposed(x: Tensor, mask: Tensor, step_scale: Tensor, channel_axis: int, inlier_bits: int,
                                outlier_bits: int) -> Tensor:
    """``quantize_mixed`` given its mask and per-step inlier scale (``ouromamba::outlier_mask``),
    in ``x``'s own layout: inliers at ``inlier_bits`` with the static step scale, outliers at
    ``outlier_bits`` with a dynamic scale per token (max over the channel axis), float when
    ``outlier_bits >= 16``. Elementwise ops and one exact max: the reference's numbers, and
    plain torch, so Inductor fuses it with what produces ``x``."""
    x = x.float()
    qi = numerics.qmax(inlier_bits)
    x_in = torch.round(x.masked_fill(mask, 0.0) / step_scale).clamp(-qi, qi) * step_scale
    if is_float(outlier_bits):
        return torch.where(mask, x, x_in)
    qo = numerics.qmax(outlier_bits)
    out = x.masked_fill(~mask, 0.0)
    s_o = (out.abs().amax(channel_axis, keepdim=True) / qo).clamp_min(EPS)
    return torch.where(mask, torch.round(out / s_o).clamp(-qo, qo) * s_o, x_in)


def int8_linear_decomposed(x: Tensor, x_scale: Tensor, qmin: int, qmax: int, w_q: Tensor, w_scale: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    """``F.linear(fake_quant(x), dequantize(w_q))`` with integer arithmetic: ``x`` (..., K) is
    quantized with the static symmetric scale ``x_scale`` (broadcastable to (..., 1), zero point 0)
    to ``[qmin, qmax]``, multiplied by the int8 weight ``w_q`` (N, K) exactly in int32
    (``torch._int_mm``, oneDNN/AMX on CPU; an exact fp32 GEMM of the codes on x86 CPUs without
    VNNI/AMX, :mod:`~ouromamba_fx.lowering.cpu_gemm`), then ``((acc * x_scale) * w_scale) + bias`` in float32
    -- the numbers of ``ouromamba::int8_linear``. Plain torch: under Inductor the quantization
    fuses into the kernel that produces ``x`` and the epilogue into the one that consumes ``y``,
    which the opaque custom op cannot do (measured ~2x faster end to end around a Vim-S in_proj).
    Needs K >= 2 (``torch._int_mm`` on CPU is wrong for K == 1; the rule keeps the op there)."""
    lead, k = x.shape[:-1], x.shape[-1]
    xs = x_scale.float().expand(*lead, 1).reshape(-1, 1)
    q = torch.round(x.float().reshape(-1, k) / xs).clamp(qmin, qmax)
    if cpu_gemm.emulated(x.device):
        # x86 CPU without VNNI/AMX: the same integer sums as an fp32 GEMM (cpu_gemm)
        acc = cpu_gemm.float_mm(q, w_q, max(-qmin, qmax), 127)
    else:
        acc = torch._int_mm(q.to(torch.int8), w_q.t()).float()
    y = acc * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w_q.shape[0])


def w4a4o8_linear_masked_decomposed(x: Tensor, mask: Tensor, step_scale: Tensor, w_packed: Tensor, w_scale: Tensor,
                                    bias: Optional[Tensor], k: int) -> Tensor:
    """``ouromamba::w4a4o8_linear`` in plain torch for Inductor: inliers (``~mask``) at 4 bits
    with the static step scale, outliers at 8 bits with a dynamic per-row scale, both multiplied
    by the unpacked int4 weight exactly (two dense ``torch._int_mm``), epilogue
    ``((acc_in * s_in + acc_out * s_out) * w_scale) + bias``: the op's numbers. Dense where the
    op gathers the outlier columns (data-dependent shapes would split Inductor's graph)."""
    from ouromamba_fx.lowering.qlinear import unpack_int4

    lead = x.shape[:-1]
    x2 = x.float().reshape(-1, k)
    m2 = mask.reshape(-1, k)
    s_in = step_scale.float().expand(*lead, 1).reshape(-1, 1)
    q_in = torch.round(x2.masked_fill(m2, 0.0) / s_in).clamp(-7, 7).to(torch.int8)
    x_out = x2.masked_fill(~m2, 0.0)
    s_out = (x_out.abs().amax(-1, keepdim=True) / 127).clamp_min(EPS)
    q_out = torch.round(x_out / s_out).clamp(-127, 127).to(torch.int8)
    w = unpack_int4(w_packed, k)
    if cpu_gemm.emulated(x.device):
        acc_in, acc_out = cpu_gemm.float_mm(q_in, w, 7, 8), cpu_gemm.float_mm(q_out, w, 127, 8)
    else:
        acc_in, acc_out = torch._int_mm(q_in, w.t()).float(), torch._int_mm(q_out, w.t()).float()
    y = acc_in * s_in + acc_out * s_out
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w_packed.shape[0])
