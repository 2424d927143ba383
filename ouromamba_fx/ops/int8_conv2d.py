"""Integer Conv2d on int8 weights: the W8A8 stem, downsampling and conv-stage convolutions.

Plain-torch graph target of the lowering (like
:func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed`, so that Inductor fuses the
activation quantization into the kernel producing ``x`` and the epilogue into the one consuming
the output):

* :func:`int8_conv2d_decomposed` -- ``F.conv2d(fake_quantize(x), dequantize(w_q), bias, stride,
  padding, dilation)`` (``groups == 1``) with exact integer products.

The reference graph quantizes a conv input (B, C, H, W) with a static symmetric scale per image
row (``per_token``: axis 2) or per tensor. A 3x3 window spans three rows, so three scales: the
integer product is split by kernel row. For kernel row ``i`` the codes of the input rows
``oh * stride + i * dilation`` (channels last, zero-padded) are gathered into an im2col matrix of
``KW * C`` columns (for a patchify conv, kernel = stride and no padding, the gather is a reshape
of contiguous memory) and multiplied by the weight's kernel row ``i`` (N, KW * C) exactly
(:func:`ouromamba_fx.ops.gemm.decomposed_mm`: on x86 CPUs with VNNI / AMX oneDNN's matmul on the
kernel rows prepacked once per weight, ``torch._int_mm`` on other CPUs with int8 dot products; on
x86 CPUs without VNNI exact fp32 GEMMs of the codes, the same integers). Each row's int32 sums are
scaled by their input row's scale, summed over the kernel rows, then ``* w_scale + bias``: the
reference's numbers up to float summation order. With stride 1 every input row meets every kernel
row, so one im2col of all padded rows (``KW * C`` columns) is multiplied by the kernel rows stacked
as ``KH * N`` output channels in one GEMM, and output row ``oh`` adds kernel row ``i``'s column
block of input row ``oh + i * dilation``. With a per-tensor scale all kernel rows share
one im2col matrix of ``KH * KW * C`` columns and one GEMM. The output is (B, N, OH, OW) with
channels-last memory (the GEMM's layout; the next conv's quantization reads it without a
transpose).

Integer products are exact while ``KW * C * 127 * 127 < 2**31`` (``KW * C`` < 133 000).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx.ops import gemm

__all__ = ["int8_conv2d_decomposed", "int8_conv2d_ref", "conv_weight_rows", "conv_output_size"]


def conv_weight_rows(w_q: Tensor) -> Tensor:
    """The int8 weight (N, C, KH, KW) as (KH * N, KW * C): one contiguous (N, KW * C) block per
    kernel row, its columns in (kernel column, channel) order, the order of the channels-last
    im2col. Each block is the (N, K) operand of one kernel row's GEMM (``torch._int_mm`` reads its
    transpose as it is), and the whole is the stacked operand of the stride-1 GEMM."""
    n, c, kh, kw = w_q.shape
    return w_q.permute(2, 0, 3, 1).reshape(kh * n, kw * c).contiguous()


#: The lowering keeps a conv float below this reduction per kernel row (``KW * C``): there the
#: im2col copies and the per-row epilogue cost more than the int8 GEMM saves
#: (``benchmarks/conv2d_cpu.py``).
MIN_ROW_K = 512


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _row_scales(x_scale: Tensor, h: int) -> Optional[Tensor]:
    """The per-row scale as a flat (H,) float32 vector, or None for a per-tensor scale."""
    if x_scale.numel() == 1:
        return None
    return x_scale.float().reshape(h)


def _input_scale(x_scale: Tensor, h: int) -> Tensor:
    """The activation scale shaped to divide a (B, C, H, W) input: (1, 1, H, 1) per row, else a scalar."""
    return x_scale.float().reshape(()) if x_scale.numel() == 1 else x_scale.float().reshape(1, 1, h, 1)


def int8_conv2d_decomposed(x: Tensor, x_scale: Tensor, qmin: int, qmax: int, w_rows: Tensor, w_scale: Tensor,
                           bias: Optional[Tensor], kernel: tuple[int, int], stride: tuple[int, int],
                           padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``F.conv2d(fake_quantize(x, x_scale, 0, qmin, qmax), dequantize(w_q, w_scale), bias, stride,
    padding, dilation)`` with exact integer products (see the module docstring). ``x`` (B, C, H,
    W) float, ``x_scale`` one element or one per row (H elements, e.g. (1, 1, H, 1)), symmetric
    codes in ``[qmin, qmax]`` (``qmax <= 127``); ``w_rows`` the int8 weight as
    :func:`conv_weight_rows` gives it (KH * N, KW * C), ``kernel`` its (KH, KW); ``w_scale`` N
    elements."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n = w_rows.shape[0] // kh
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    rows = _row_scales(x_scale, h)
    xs = _input_scale(x_scale, h)
    q = torch.round(x.float() / xs).clamp(qmin, qmax).to(torch.int8)
    # channels-last int8 codes, zero-padded: code 0 is the value 0 the reference pads with
    qc = F.pad(q.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
    amax = max(-qmin, qmax)

    def window_rows(i: int) -> Tensor:  # (B, OH, Wp, C): the input rows kernel row i reads
        return qc[:, i * dh: i * dh + sh * (oh - 1) + 1: sh]

    def im2col(r: Tensor) -> Tensor:  # (B, OH, OW, KW, C) of (B, OH, Wp, C)
        if kw == sw and dw == 1 and pw == 0 and ow * kw == w:  # patchify: a reshape
            return r.reshape(b, r.shape[1], ow, kw, c)
        return torch.stack([r[:, :, j * dw: j * dw + sw * (ow - 1) + 1: sw] for j in range(kw)], dim=3)

    if rows is None:  # one scale: all kernel rows in one GEMM
        a = torch.stack([im2col(window_rows(i)) for i in range(kh)], dim=3).reshape(-1, kh * kw * c)
        # block -1: the weight's kernel rows side by side, (N, KH * KW * C)
        acc = gemm.decomposed_mm(a, w_rows, amax, 127, kh=kh, block=-1, prepack=True).reshape(b, oh, ow, n) * xs
    elif sh == 1:  # every padded input row is read by every kernel row: one GEMM, kernel rows as N
        rows_p = F.pad(rows, (ph, ph))
        hp = h + 2 * ph
        a = im2col(qc).reshape(-1, kw * c)  # (B * Hp * OW, KW * C)
        y_all = gemm.decomposed_mm(a, w_rows, amax, 127, prepack=True).reshape(b, hp, ow, kh, n)
        acc = None
        for i in range(kh):
            part = y_all[:, i * dh: i * dh + oh, :, i] * rows_p[i * dh: i * dh + oh].reshape(1, oh, 1, 1)
            acc = part if acc is None else acc + part
    else:  # strided: a GEMM per kernel row over the input rows it reads
        rows_p = F.pad(rows, (ph, ph))  # the padding rows' scale multiplies sums of zeros
        acc = None
        for i in range(kh):
            a = im2col(window_rows(i)).reshape(-1, kw * c)
            part = gemm.decomposed_mm(a, w_rows, amax, 127, kh=kh, block=i, prepack=True)
            s_i = rows_p[i * dh: i * dh + sh * (oh - 1) + 1: sh].reshape(1, oh, 1, 1)
            part = part.reshape(b, oh, ow, n) * s_i
            acc = part if acc is None else acc + part
    y = acc * w_scale.float().reshape(1, 1, 1, n)
    if bias is not None:
        y = y + bias.float()
    return y.permute(0, 3, 1, 2)


def int8_conv2d_ref(x: Tensor, x_scale: Tensor, qmin: int, qmax: int, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor], stride, padding, dilation) -> Tensor:
    """What :func:`int8_conv2d_decomposed` computes, as the reference graph writes it: a float
    conv of the fake-quantized input and the dequantized weight."""
    from ouromamba_fx.ops.quant import fake_quantize

    xs = _input_scale(x_scale, x.shape[2])
    xq = fake_quantize(x, xs, torch.zeros_like(xs), qmin, qmax)
    wf = w_q.float() * w_scale.float().reshape(-1, 1, 1, 1)
    return F.conv2d(xq, wf, bias, stride, padding, dilation)
