"""W4A4O8 linears: 4-bit inliers and 8-bit outlier channels times int4 weights packed two per byte.

Ops (namespace ``ouromamba``), from the most given to the most computed:

* ``w4a4o8_linear(Tensor x, Tensor mask, Tensor? inlier_scale, Tensor w_packed, Tensor w_scale,
  Tensor? bias, int k) -> Tensor`` (:func:`w4a4o8_linear_masked`): the outlier mask is given.
  ``y = w_scale * (s_in * (q_in @ Wq^T) + s_out * (q_out @ Wq^T)) + bias`` with
  ``(q_in, s_in, q_out, s_out) = outlier_split(x, mask, inlier_scale, 4)`` and
  ``Wq = unpack_int4(w_packed, k)``; ``x`` and ``mask`` (..., K), output (..., N) float32.
* ``w4a4o8_linear_rt(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias,
  int k, float outlier_k, int n_refresh) -> Tensor`` (:func:`w4a4o8_linear_detect`): the linear
  finds its outliers itself by the OuroMamba rule, the numbers of ``outlier_mask`` followed by
  ``w4a4o8_linear``.
* ``w4a4o8_linear_mixed(..., Tensor out_scale, int out_token_axis, int out_channel_axis,
  int out_bits, float out_k, int out_refresh) -> Tensor`` (:func:`w4a4o8_linear_detect_requant`):
  ... and quantizes its output by the rule again (Vim's dt_proj feeding the scan's delta).

:func:`w4a4o8_linear_masked_decomposed` is ``w4a4o8_linear`` in plain torch, a graph target of the
lowering that Inductor fuses with its neighbours.

Numbers: the activations as :mod:`ouromamba_fx.ops.mixed` splits them, exact int32 products, the
epilogue ``((acc_in * s_in + acc_out * s_out) * w_scale) + bias`` in float32.

Kernels, by device:

* CPU, ``w4a4o8_linear``: the int4 weight unpacked on every call (no cache to keep coherent), the
  inlier GEMM on all K columns, the outlier GEMM only on the columns where some row has an
  outlier (gathered; an fp32 GEMM where that is exact, which skips an int32 -> float pass), or a
  full-K GEMM when more than half of the columns hold outliers; all give the same integers.
* CPU, the detecting ops: the rule, the split and the quantization in one C++ pass
  (``kernels/cpu/mixer_ops.cpp``), the inlier GEMM on the int4 weights unpacked once and cached
  beside them (x86 CPUs with VNNI/AMX: oneDNN's matmul on the weight prepacked once,
  :func:`~ouromamba_fx.ops.gemm.s8_mm`, AMX where the CPU has it; other CPUs with int8 dot
  products: ``torch._int_mm``; without VNNI the package's AVX2 int4 kernel or oneDNN u8 x s8), and
  an epilogue that adds each token's few outlier channels (their rows of the weights; exact integer sums) before the scales and the
  bias, in one pass over the output. On CPUs with AMX, where the tiles would do at least
  1/:data:`DENSE_OUTLIER_RATIO` of a dense product's work, the outlier term is instead a second
  prepacked GEMM, of the outlier codes (same integers, same epilogue arithmetic). Below :data:`SMALL_K` input channels, a float GEMM of the
  dequantized values instead. Without the C++ build: ``outlier_mask`` + ``w4a4o8_linear``.
* CUDA: Triton (:mod:`ouromamba_fx.kernels.triton.w4a4o8_gemm`): the activation split into 4-bit
  inlier codes and each token's list of 8-bit outlier channels (by the given mask, or by the rule
  in one pass per token for the detecting ops), then one kernel for the int4 inlier GEMM plus the
  product over each token's listed outlier channels (a gather, not a second dense GEMM). The
  packed weight is read through a K-major copy made once per weight (kept beside it while it
  lives), so that each token's gather reads contiguous bytes. ``w4a4o8_linear_mixed`` quantizes
  the linear's output by the rule with the Triton kernel of
  :mod:`ouromamba_fx.kernels.triton.mixed_quant`. Same integers as the CPU paths; the kernels'
  epilogue is evaluated as written (no FMA contraction).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.cpu.build import MIXER_OPS
from ouromamba_fx.numerics import EPS, int8_qmax
from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.checks import check_broadcast_scale, check_float, check_mask, check_weight
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.int4 import check_packed, dequantized_int4, unpack_int4
from ouromamba_fx.ops.mixed import (cpp_mixed, mixed_fake_quant, mixed_rows, outlier_split_ref, quantize_mixed_ref,
                                    site_outlier_mask, site_outlier_mask_ref, step_scales, triton_mixed)
from ouromamba_fx.ops.quant import dynamic_scale, quantize_rows

__all__ = ["w4a4o8_linear_masked", "w4a4o8_linear_masked_ref", "w4a4o8_linear_masked_decomposed",
           "w4a4o8_linear_detect", "w4a4o8_linear_detect_requant", "SMALL_K", "W4A4O8_MASKED_OP",
           "W4A4O8_DETECT_OP", "W4A4O8_DETECT_REQUANT_OP"]

INLIER_BITS = 4
# Gather the outlier columns for the outlier GEMM when at most this fraction of K holds outliers.
SPARSE_OUTLIER_MAX_FRACTION = 0.5
# Largest K for which an fp32 product of 8-bit activations and int4 weights is exact: 127*8*K < 2**24.
FP32_EXACT_MAX_K = (2 ** 24 - 1) // (127 * 8)
# Detecting linears with fewer input channels than this (Vim's dt_proj: K = dt_rank) run on the CPU
# as a float GEMM of the dequantized values: so short a reduction gains nothing from an integer
# GEMM, and the outlier epilogue would cost more than the product.
SMALL_K = 32
# On CPUs with AMX, the detecting linears' outlier term is a second oneDNN GEMM (of the outlier
# codes, dense) instead of the epilogue's tiles when the tiles would do at least 1/DENSE_OUTLIER_RATIO
# of its multiply-adds (their columns rounded up to the tiles' 64): the AMX kernel does a dense
# multiply-add that much faster than the tiles do a useful one (Vim-S on a Xeon with AMX: x_proj and
# out_proj, ~9 % of their channels outliers per token, go dense; in_proj, ~5 %, keeps the tiles).
DENSE_OUTLIER_RATIO = 16


def _check_masked(x, mask, inlier_scale, w_packed, w_scale, bias, k) -> None:
    check_float("x", x)
    check_packed(w_packed, k)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"w4a4o8_linear: x {tuple(x.shape)} does not end in K={k}")
    check_mask(mask, x)
    if inlier_scale is not None:
        check_broadcast_scale("inlier_scale", inlier_scale, tuple(x.shape[:-1]))
    check_weight(w_scale, bias, w_packed.shape[0])


def _output(x: Tensor, w_packed: Tensor) -> Tensor:
    """The float32 (..., N) result a fake implementation promises."""
    return torch.empty((*x.shape[:-1], w_packed.shape[0]), dtype=torch.float32, device=x.device)


def _row_scales(inlier_scale: Optional[Tensor], lead: tuple) -> Optional[Tensor]:
    return None if inlier_scale is None else inlier_scale.float().expand(*lead, 1).reshape(-1, 1)


# ---------------------------------------------------------------------------------------------
# ouromamba::w4a4o8_linear: the mask is given

def w4a4o8_linear_masked_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor,
                             w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """Definition of ``ouromamba::w4a4o8_linear``."""
    lead = x.shape[:-1]
    q_in, s_in, q_out, s_out = outlier_split_ref(x.reshape(-1, k), mask.reshape(-1, k),
                                                 _row_scales(inlier_scale, lead), INLIER_BITS)
    w = unpack_int4(w_packed, k)
    y = gemm.int_matmul_ref(q_in, w).float() * s_in + gemm.int_matmul_ref(q_out, w).float() * s_out
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w.shape[0])


def _outlier_product(x2: Tensor, m2: Tensor, w: Tensor, k: int) -> Optional[Tensor]:
    """``acc_out * s_out`` of the rows' 8-bit outliers, over the columns where some row has one;
    None when no row has any (the term is 0 then, exactly)."""
    # columns holding an outlier in some row (an amax over uint8: the cheapest reduction here)
    cols = m2.view(torch.uint8).amax(dim=0).nonzero().flatten() if x2.shape[0] else m2.new_zeros(0)
    if not cols.numel():
        return None
    gathered = cols.numel() <= SPARSE_OUTLIER_MAX_FRACTION * k
    if gathered:
        # only these columns can be non-zero in q_out: a GEMM over them gives the same integers
        x_out, w_out = x2[:, cols].masked_fill_(~m2[:, cols], 0.0), w[:, cols]
    else:
        x_out, w_out = x2.masked_fill(~m2, 0.0), w
    s_out = dynamic_scale(x_out, 127)
    q_out = quantize_rows(x_out, s_out, 127)
    if gathered and cols.numel() <= FP32_EXACT_MAX_K:
        # an fp32 GEMM is exact here (every product and partial sum is an integer of magnitude
        # <= 127 * 8 * K' < 2**24, whatever the summation order) and writes floats directly
        acc_out = q_out.float() @ w_out.float().t()
    else:
        acc_out = gemm.float_in_place(gemm.exact_int_mm(q_out, w_out))
    return acc_out.mul_(s_out)


def _w4a4o8_linear_masked_cpu(x, mask, inlier_scale, w_packed, w_scale, bias, k) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float()
    m2 = mask.reshape(-1, k)
    s_static = _row_scales(inlier_scale, lead)
    w = unpack_int4(w_packed, k)
    qmax_in = int8_qmax(INLIER_BITS)
    x_in = x2.masked_fill(m2, 0.0)
    s_in = s_static.clone() if s_static is not None else dynamic_scale(x_in, qmax_in)
    y = gemm.float_in_place(gemm.exact_int_mm(quantize_rows(x_in, s_in, qmax_in), w)).mul_(s_in)
    out = _outlier_product(x2, m2, w, k)
    if out is not None:  # else q_out == 0, acc_out * s_out == 0 exactly, and y + 0 == y
        y.add_(out)
    y.mul_(w_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.reshape(*lead, w.shape[0])


def _k_major(w_packed: Tensor) -> Tensor:
    """The packed weight with the same shape and values, its bytes stored K-major (a token's
    outlier channel is then a contiguous run over N); made once per weight."""
    if w_packed.stride(0) == 1:
        return w_packed
    return gemm.cached(w_packed, "int4:kmajor", lambda: w_packed.detach().t().contiguous().t())


def _w4a4o8_linear_masked_cuda(x, mask, inlier_scale, w_packed, w_scale, bias, k):
    _check_masked(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    from ouromamba_fx.kernels.triton import w4a4o8_gemm
    from ouromamba_fx.kernels.triton.mixed_quant import MAX_CHANNELS

    if k > MAX_CHANNELS:  # more channels than the split kernel holds per token
        return w4a4o8_linear_masked_ref(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    return w4a4o8_gemm.w4a4o8_linear(x, mask, inlier_scale, _k_major(w_packed), w_scale.detach(),
                                     None if bias is None else bias.detach(), k)


@torch.library.custom_op("ouromamba::w4a4o8_linear", mutates_args=(),
                         schema="(Tensor x, Tensor mask, Tensor? inlier_scale, Tensor w_packed, "
                                "Tensor w_scale, Tensor? bias, int k) -> Tensor")
def w4a4o8_linear_masked(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor,
                         w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """4-bit inliers + 8-bit outliers (``mask``) of ``x`` (..., K) times packed int4 weights, float32 (..., N)."""
    _check_masked(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    return _w4a4o8_linear_masked_cpu(x, mask, inlier_scale, w_packed, w_scale, bias, k)


@w4a4o8_linear_masked.register_fake
def _(x, mask, inlier_scale, w_packed, w_scale, bias, k):
    _check_masked(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    return _output(x, w_packed)


register_cuda(w4a4o8_linear_masked)(_w4a4o8_linear_masked_cuda)


def w4a4o8_linear_masked_decomposed(x: Tensor, mask: Tensor, step_scale: Tensor, w_packed: Tensor,
                                    w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """``ouromamba::w4a4o8_linear`` in plain torch for Inductor: inliers (``~mask``) at 4 bits
    with the static step scale, outliers at 8 bits with a dynamic per-row scale, both multiplied
    by the unpacked int4 weight exactly (two dense :func:`~ouromamba_fx.ops.gemm.decomposed_mm`), epilogue
    ``((acc_in * s_in + acc_out * s_out) * w_scale) + bias``: the op's numbers. Dense where the
    op gathers the outlier columns (data-dependent shapes would split Inductor's graph)."""
    lead = x.shape[:-1]
    x2 = x.float().reshape(-1, k)
    m2 = mask.reshape(-1, k)
    s_in = step_scale.float().expand(*lead, 1).reshape(-1, 1)
    q_in = torch.round(x2.masked_fill(m2, 0.0) / s_in).clamp(-7, 7).to(torch.int8)
    x_out = x2.masked_fill(~m2, 0.0)
    s_out = (x_out.abs().amax(-1, keepdim=True) / 127).clamp_min(EPS)
    q_out = torch.round(x_out / s_out).clamp(-127, 127).to(torch.int8)
    w = unpack_int4(w_packed, k)
    acc_in, acc_out = gemm.decomposed_mm(q_in, w, 7, 8), gemm.decomposed_mm(q_out, w, 127, 8)
    y = acc_in * s_in + acc_out * s_out
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w_packed.shape[0])


# ---------------------------------------------------------------------------------------------
# ouromamba::w4a4o8_linear_rt: the linear finds its outliers

def _detect_float_product(x: Tensor, rows: Tensor, s_in: Tensor, w_packed: Tensor, w_scale: Tensor,
                          bias: Optional[Tensor], k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """A short reduction (``k < SMALL_K``): the dequantized activations times the dequantized weights,
    a float GEMM of the same values (the reference graph's own form of this linear)."""
    (y,) = MIXER_OPS.get().mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), True, 0)
    w_f = gemm.cached_pair(w_packed, w_scale, "int4:float", lambda: dequantized_int4(w_packed, w_scale, k))
    b_f = None if bias is None else bias.detach().float()
    return F.linear(y.view(*x.shape[:-1], k), w_f, b_f)


def _dense_outliers(ext, q_out: Tensor, n: int) -> bool:
    """Whether the outlier term of a product with ``n`` outputs is a dense GEMM of the outlier codes
    ``q_out`` (M, K) rather than the epilogue's tiles (:data:`DENSE_OUTLIER_RATIO`; CPUs with AMX)."""
    if not gemm.amx():
        return False
    cols = -(-n // 64) * 64
    return ext.outlier_density(q_out) * cols * DENSE_OUTLIER_RATIO >= n


def _detect_int_gemm(x: Tensor, rows: Tensor, s_in: Tensor, w_packed: Tensor, w_scale: Tensor,
                     bias: Optional[Tensor], k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """The integer path: codes from the C++ split, the inlier GEMM by :mod:`ouromamba_fx.ops.gemm`'s
    path, each token's outlier channels added in the C++ epilogue."""
    ext = MIXER_OPS.get()
    emulated = gemm.emulated(x.device)
    u4 = emulated and ext.u4_available()
    u8 = emulated and not u4 and gemm.u8_exact(7, 8)
    offset = 8 if u4 else 128 if u8 else 0
    q_in, q_out, s_out = ext.mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), False, offset)
    m = q_in.shape[0] * q_in.shape[1]
    # The outliers are a few channels per token, each adding a row of the weights to the output
    # inside the epilogue (a dense or column-gathered GEMM would spend its work on zeros: the union
    # of a batch's outlier channels is most channels, while each token has only a few). Those rows
    # are laid out once per weight, (K, N rounded up to 64) as w + 8, and kept beside the model's
    # packed weight while it lives.
    # (made only where the epilogue's tiles run: the dense outlier GEMM does not read it)
    def w_o():
        return gemm.cached(w_packed, "int4:outlier", lambda: ext.outlier_weights(unpack_int4(w_packed, k)))

    w_s = gemm.cached(w_scale, "float", lambda: w_scale.detach().float().reshape(-1).contiguous())
    b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    if u4:
        # no VNNI/AMX, AVX2: the kernel of 4-bit codes (written as q + 8) x int4 weights with int16
        # accumulation, on the weight laid out in column panels once; each block of rows gets its
        # epilogue while its products are in cache
        panels, colsum = gemm.cached(w_packed, "u4", lambda: ext.u4_pack(unpack_int4(w_packed, k)))
        y = ext.u4_linear(q_in.view(m, k), panels, colsum, s_in, q_out.view(m, k), s_out.view(m), w_o(), w_s, b)
    elif not emulated and gemm.onednn_s8():
        # VNNI/AMX x86: oneDNN's matmul on the int4 weights unpacked to int8 and prepacked once
        # (AMX where the CPU has it; torch._int_mm would run oneDNN's VNNI gemm API on a weight
        # reordered per call), float32 products straight into the epilogue
        acc = gemm.s8_mm(q_in.view(m, k), lambda: unpack_int4(w_packed, k), w_packed)
        if _dense_outliers(ext, q_out.view(m, k), w_packed.shape[0]):
            o = gemm.s8_mm(q_out.view(m, k), lambda: unpack_int4(w_packed, k), w_packed)
            y = ext.w4a4o8_finish(acc, o, s_in, q_out.view(m, k), s_out.view(m), w_s, b)
        else:
            y = ext.w4a4o8_epilogue(acc, s_in, q_out.view(m, k), s_out.view(m), w_o(), w_s, b)
    else:
        # int4 -> int8 once per weight (there is no int4 GEMM on the CPU), laid out (K, N)
        w_t = gemm.cached(w_packed, "int4:kn", lambda: unpack_int4(w_packed, k).t().contiguous())
        if u8:
            # no VNNI/AMX nor AVX2: oneDNN u8 x s8 on the inliers' u8 codes (q + 128), exact for
            # 4-bit codes x int4 weights (float accumulator)
            acc = gemm.u8_mm(q_in.view(m, k), w_t.t(), w_packed)
        else:
            acc = gemm.exact_int_mm(q_in.view(m, k), w_t.t()).contiguous()
        y = ext.w4a4o8_epilogue(acc, s_in, q_out.view(m, k), s_out.view(m), w_o(), w_s, b)
    return y.reshape(*x.shape[:-1], w_packed.shape[0])


@torch.library.custom_op("ouromamba::w4a4o8_linear_rt", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
                                "int k, float outlier_k, int n_refresh) -> Tensor")
def w4a4o8_linear_detect(x: Tensor, inlier_scale: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                         k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """The whole W4A4O8 linear of a ``quantize_mixed -> F.linear`` site, outlier detection included:
    ``x`` (batch, L, K) is split by the outlier rule (threshold ``outlier_k``, windows of
    ``n_refresh`` steps) into 4-bit inliers with the static step scale and 8-bit outliers with a
    per-token scale, then multiplied by the packed int4 weights. Same numbers as
    ``ouromamba::outlier_mask`` followed by ``ouromamba::w4a4o8_linear`` (up to float rounding of
    the products below ``SMALL_K`` input channels), which is what runs where the C++ kernels do not."""
    _check_detect(x, k, "w4a4o8_linear_rt")
    if not cpp_mixed(x, INLIER_BITS, 8):
        mask, step = site_outlier_mask(x, inlier_scale, x.dim() - 2, x.dim() - 1, INLIER_BITS, outlier_k, n_refresh)
        return w4a4o8_linear_masked(x, mask, step, w_packed, w_scale, bias, k)
    rows, s_in = mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1)
    path = _detect_float_product if k < SMALL_K else _detect_int_gemm
    return path(x, rows, s_in, w_packed, w_scale, bias, k, outlier_k, n_refresh)


@w4a4o8_linear_detect.register_fake
def _(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh):
    return _output(x, w_packed)


def _check_detect(x: Tensor, k: int, op: str) -> None:
    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be (..., L, {k}); got {tuple(x.shape)}")


@register_cuda(w4a4o8_linear_detect)
def _w4a4o8_linear_detect_cuda(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh):
    _check_detect(x, k, "w4a4o8_linear_rt")
    if not triton_mixed(x, -2, -1, INLIER_BITS, 8):  # more channels than a token's tile
        mask, step = site_outlier_mask_ref(x, inlier_scale, x.dim() - 2, x.dim() - 1, INLIER_BITS, outlier_k,
                                           n_refresh)
        return w4a4o8_linear_masked_ref(x, mask, step, w_packed, w_scale, bias, k)
    from ouromamba_fx.kernels.triton import w4a4o8_gemm

    return w4a4o8_gemm.w4a4o8_linear_detect(x, step_scales(inlier_scale, x.shape[-2]), _k_major(w_packed),
                                            w_scale.detach(), None if bias is None else bias.detach(), k,
                                            float(outlier_k), int(n_refresh))


# ---------------------------------------------------------------------------------------------
# ouromamba::w4a4o8_linear_mixed: ... and re-quantizes its output by the rule

@torch.library.custom_op("ouromamba::w4a4o8_linear_mixed", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, Tensor w_packed, Tensor w_scale, Tensor? bias, "
                                "int k, float outlier_k, int n_refresh, Tensor out_scale, int out_token_axis, "
                                "int out_channel_axis, int out_bits, float out_k, int out_refresh) -> Tensor")
def w4a4o8_linear_detect_requant(x: Tensor, inlier_scale: Tensor, w_packed: Tensor, w_scale: Tensor,
                                 bias: Optional[Tensor], k: int, outlier_k: float, n_refresh: int, out_scale: Tensor,
                                 out_token_axis: int, out_channel_axis: int, out_bits: int, out_k: float,
                                 out_refresh: int) -> Tensor:
    """``mixed_fake_quant(w4a4o8_linear_detect(x, ...), out_scale, out_token_axis, out_channel_axis,
    out_bits, 8, out_k, out_refresh)``, contiguous: a W4A4O8 linear whose output is itself
    quantized by the outlier rule (the first eight arguments are ``w4a4o8_linear_detect``'s, the
    rest the output's: step scales, axes, inlier bits, threshold, window). On the CPU, for a
    reduction shorter than ``SMALL_K`` and the output's tokens and channels on its last two axes,
    in one C++ pass per row: the product of the fake-quantized activations and the dequantized
    weights, then its mixed fake quantization while the row is in the cache; the (batch, L, N)
    float product never goes through memory. Otherwise the two ops in turn. ``x`` is (..., L, K);
    the result (..., L, N)."""
    _check_detect(x, k, "w4a4o8_linear_mixed")
    last_two = (out_token_axis % x.dim(), out_channel_axis % x.dim()) == (x.dim() - 2, x.dim() - 1)
    if not (cpp_mixed(x, INLIER_BITS, 8) and cpp_mixed(x, out_bits, 8) and k < SMALL_K and last_two):
        y = w4a4o8_linear_detect(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh)
        return mixed_fake_quant(y, out_scale, out_token_axis, out_channel_axis, out_bits, 8, out_k,
                                out_refresh).contiguous()
    ext = MIXER_OPS.get()
    rows, s_in = mixed_rows(x, inlier_scale, x.dim() - 2, x.dim() - 1)
    (xq,) = ext.mixed_quant(rows, s_in, 7, float(outlier_k), int(n_refresh), True, 0)
    w_kn = gemm.cached_pair(w_packed, w_scale, "int4:float:kn",
                            lambda: dequantized_int4(w_packed, w_scale, k).t().contiguous())
    b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    s_out = step_scales(out_scale, rows.shape[1])
    y = ext.linear_mixed_fake(xq, w_kn, b, s_out, numerics.qmax(out_bits), float(out_k), int(out_refresh))
    return y.view(*x.shape[:-1], w_packed.shape[0])


@w4a4o8_linear_detect_requant.register_fake
def _(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh, out_scale, out_token_axis, out_channel_axis,
      out_bits, out_k, out_refresh):
    return _output(x, w_packed)


@register_cuda(w4a4o8_linear_detect_requant)
def _w4a4o8_linear_detect_requant_cuda(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh, out_scale,
                                       out_token_axis, out_channel_axis, out_bits, out_k, out_refresh):
    _check_detect(x, k, "w4a4o8_linear_mixed")
    y = _w4a4o8_linear_detect_cuda(x, inlier_scale, w_packed, w_scale, bias, k, outlier_k, n_refresh)
    if not triton_mixed(y, out_token_axis, out_channel_axis, out_bits, 8):
        return quantize_mixed_ref(y, out_scale, out_token_axis, out_channel_axis, out_bits, 8, out_k,
                                  out_refresh).contiguous()
    from ouromamba_fx.kernels.triton import mixed_quant

    return mixed_quant.mixed_fake_quant(y, step_scales(out_scale, y.shape[out_token_axis]), out_token_axis,
                                        out_channel_axis, out_bits, 8, float(out_k), int(out_refresh)).contiguous()


W4A4O8_MASKED_OP = torch.ops.ouromamba.w4a4o8_linear.default
W4A4O8_DETECT_OP = torch.ops.ouromamba.w4a4o8_linear_rt.default
W4A4O8_DETECT_REQUANT_OP = torch.ops.ouromamba.w4a4o8_linear_mixed.default
