"""Integer linears on int8 weights: the W8A8 linear and its pieces.

Ops (namespace ``ouromamba``):

* ``int8_linear(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor``
  ``y = (x_q @ w_q^T exact in int32) * x_scale * w_scale + bias``, float32 (M, N); ``x_q`` (M, K)
  int8, ``x_scale`` (M, 1) or one element, ``w_q`` (N, K) int8, ``w_scale`` N elements
  ((N,) or (N, 1)), ``bias`` (N,) or None.
* ``w8a8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? x_scale) -> Tensor``
  quantize ``x`` (..., K) to 8 bits (per token, dynamic if ``x_scale`` is None, else with the
  static ``x_scale`` broadcastable to (..., 1)), then ``int8_linear``; output (..., N) float32.

Plain-torch graph targets of the lowering (Inductor fuses them with their neighbours, which it
cannot do with an opaque op):

* :func:`int8_linear_decomposed` -- quantize with a static scale (2..8 bits), the exact integer
  product, the epilogue: ``ouromamba::int8_linear``'s numbers.
* :func:`int8_linear_decomposed_codes` -- the same after the quantization, on codes a fused
  producer emitted.
* :func:`int8_linear_codes` -- ``ouromamba::int8_linear`` on codes of any leading shape.
* :func:`int8_linear_decomposed_acc` -- :func:`int8_linear_decomposed` without its epilogue (the
  raw accumulator, for consumers that apply the epilogue as they load it) and
  :func:`int8_linear_epilogue_t`, that epilogue on a transposed slice of the accumulator's columns.

Numbers follow :mod:`ouromamba_fx.ops.quant`. Integer products are exact int32 sums (exact as long
as ``K * 127 * 127 < 2**31``, i.e. K < 133 000). The float epilogue is evaluated in the order
``((acc * x_scale) * w_scale) + bias`` in float32. The ``*_ref`` functions are the definitions; the
CPU paths equal them bit for bit; the Triton kernels are bit-exact on integers and differ only by
float rounding (FMA contraction) in the epilogue.

Kernels, by device: CPU -- the exact integer GEMM of :mod:`ouromamba_fx.ops.gemm` and a few in-place
torch ops; CUDA -- Triton (:mod:`ouromamba_fx.kernels.triton.int8_gemm`, ``quantize_rows``); other
devices -- the integer products on the CPU, the result copied back.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.checks import check_broadcast_scale, check_float, check_weight
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.quant import (dynamic_scale, quantize_per_token_ref, quantize_rows, quantize_symmetric_ref)

__all__ = ["int8_linear", "int8_linear_ref", "w8a8_linear", "w8a8_linear_ref", "int8_linear_decomposed",
           "int8_linear_decomposed_codes", "quantize_input", "int8_linear_codes",
           "int8_linear_decomposed_acc", "int8_linear_epilogue_t", "INT8_LINEAR_OP", "W8A8_LINEAR_OP"]


def _row_scale(scale: Tensor, m: int) -> Tensor:
    """A per-tensor (one element) or per-row (M elements) scale as float32 (1, 1) or (M, 1)."""
    return scale.float().reshape(-1, 1) if scale.numel() == m else scale.float().reshape(1, 1)


def _output(lead: tuple, n: int, like: Tensor) -> Tensor:
    """The float32 (*lead, n) result a fake implementation promises."""
    return torch.empty((*lead, n), dtype=torch.float32, device=like.device)


# ---------------------------------------------------------------------------------------------
# Checks, shared by the real and the fake implementations

def _check_int8_linear(x_q, x_scale, w_q, w_scale, bias) -> None:
    if x_q.dim() != 2 or x_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise ValueError(f"int8_linear expects int8 x_q (M, K) and w_q (N, K), got x_q {x_q.dtype} "
                         f"{tuple(x_q.shape)} and w_q {w_q.dtype} {tuple(w_q.shape)}")
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"int8_linear: K mismatch, x_q {tuple(x_q.shape)} vs w_q {tuple(w_q.shape)}")
    check_float("x_scale", x_scale)
    m = x_q.shape[0]
    if not (x_scale.numel() == 1 or tuple(x_scale.shape) in ((m, 1), (m,))):
        raise ValueError(f"x_scale must be per tensor (one element) or per row ({m}, 1), "
                         f"got {tuple(x_scale.shape)}")
    check_weight(w_scale, bias, w_q.shape[0])


def _check_w8a8(x, w_q, w_scale, bias, x_scale) -> None:
    check_float("x", x)
    if x.dim() < 1 or w_q.dim() != 2 or w_q.dtype != torch.int8 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"w8a8_linear expects x (..., K) and int8 w_q (N, K), got x {tuple(x.shape)}, "
                         f"w_q {w_q.dtype} {tuple(w_q.shape)}")
    if x_scale is not None:
        check_broadcast_scale("x_scale", x_scale, tuple(x.shape[:-1]))
    check_weight(w_scale, bias, w_q.shape[0])


# ---------------------------------------------------------------------------------------------
# References: they define the numbers

def int8_linear_ref(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor]) -> Tensor:
    """Definition of ``ouromamba::int8_linear``."""
    acc = gemm.int_matmul_ref(x_q, w_q)
    y = acc.float() * _row_scale(x_scale, x_q.shape[0]) * w_scale.float().reshape(1, -1)
    return y + bias.float() if bias is not None else y


def w8a8_linear_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    x_scale: Optional[Tensor]) -> Tensor:
    """Definition of ``ouromamba::w8a8_linear``."""
    lead = x.shape[:-1]
    if x_scale is None:
        x_q, xs = quantize_per_token_ref(x, 8)
    else:
        xs = x_scale.float().expand(*lead, 1)
        x_q = quantize_symmetric_ref(x.float(), xs, 127)
    y = int8_linear_ref(x_q.reshape(-1, x.shape[-1]), xs.reshape(-1, 1), w_q, w_scale, bias)
    return y.reshape(*lead, w_q.shape[0])


# ---------------------------------------------------------------------------------------------
# CPU (and any non-CUDA device, with the integer products on the CPU)

def epilogue(acc: Tensor, row_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``((acc * row_scale) * w_scale) + bias`` in the references' order, in place on one float
    buffer (the int32 accumulator's own memory)."""
    y = gemm.float_in_place(acc).mul_(row_scale)
    y.mul_(w_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y


def _int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias) -> Tensor:
    return epilogue(gemm.exact_int_mm(x_q, w_q), _row_scale(x_scale, x_q.shape[0]), w_scale, bias)


def _w8a8_linear_cpu(x, w_q, w_scale, bias, x_scale) -> Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if x_scale is None:
        xs = dynamic_scale(x2, 127)
    else:
        xs = x_scale.float().expand(*lead, 1).reshape(-1, 1)
    x_q = quantize_rows(x2, xs, 127)
    return _int8_linear_cpu(x_q, xs, w_q, w_scale, bias).reshape(*lead, w_q.shape[0])


# ---------------------------------------------------------------------------------------------
# CUDA: Triton kernels, imported on first use (this module works where triton is not installed)

def _int8_linear_cuda(x_q, x_scale, w_q, w_scale, bias):
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    from ouromamba_fx.kernels.triton.int8_gemm import int8_gemm

    return int8_gemm(x_q, x_scale, w_q, w_scale, bias)


def _w8a8_linear_cuda(x, w_q, w_scale, bias, x_scale):
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    from ouromamba_fx.kernels.triton.int8_gemm import int8_gemm
    from ouromamba_fx.kernels.triton.quantize_rows import quantize_rows as quantize_rows_triton

    lead, k = x.shape[:-1], x.shape[-1]
    xs = None if x_scale is None else x_scale.float().expand(*lead, 1).reshape(-1, 1)
    x_q, xs = quantize_rows_triton(x.reshape(-1, k), 127, xs)
    return int8_gemm(x_q, xs, w_q, w_scale, bias).reshape(*lead, w_q.shape[0])


# ---------------------------------------------------------------------------------------------
# The ops

@torch.library.custom_op("ouromamba::int8_linear", mutates_args=(),
                         schema="(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) "
                                "-> Tensor")
def int8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    """``(x_q @ w_q^T) * x_scale * w_scale + bias`` with an exact int32 product, float32 (M, N)."""
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    return _int8_linear_cpu(x_q, x_scale, w_q, w_scale, bias)


@int8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias):
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    return _output(x_q.shape[:1], w_q.shape[0], x_q)


@torch.library.custom_op("ouromamba::w8a8_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? x_scale) "
                                "-> Tensor")
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                x_scale: Optional[Tensor]) -> Tensor:
    """Quantize ``x`` (..., K) to int8 (dynamic per token, or static ``x_scale``), int8 GEMM, dequant."""
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    return _w8a8_linear_cpu(x, w_q, w_scale, bias, x_scale)


@w8a8_linear.register_fake
def _(x, w_q, w_scale, bias, x_scale):
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    return _output(x.shape[:-1], w_q.shape[0], x)


register_cuda(int8_linear)(_int8_linear_cuda)
register_cuda(w8a8_linear)(_w8a8_linear_cuda)

INT8_LINEAR_OP = torch.ops.ouromamba.int8_linear.default
W8A8_LINEAR_OP = torch.ops.ouromamba.w8a8_linear.default


# ---------------------------------------------------------------------------------------------
# Plain-torch graph targets of the lowering

def int8_linear_decomposed(x: Tensor, x_scale: Tensor, qmin: int, qmax: int, w_q: Tensor, w_scale: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    """``F.linear(fake_quantize(x), dequantize(w_q))`` with integer arithmetic: ``x`` (..., K) is
    quantized with the static symmetric scale ``x_scale`` (broadcastable to (..., 1), zero point 0)
    to ``[qmin, qmax]``, multiplied by the int8 weight ``w_q`` (N, K) exactly
    (:func:`ouromamba_fx.ops.gemm.decomposed_mm`: oneDNN's matmul on the weight prepacked once on
    x86 CPUs with VNNI / AMX, ``torch._int_mm``, or exact fp32 GEMMs of the codes where it is slow
    or, on a GPU, refuses the shape), then
    ``((acc * x_scale) * w_scale) + bias`` in float32 -- the numbers of ``ouromamba::int8_linear``.
    Plain torch, so that under Inductor the quantization fuses into the kernel that produces ``x``
    and the epilogue into the one that consumes ``y``. Needs K >= 2 (``torch._int_mm`` on CPU is
    wrong for K == 1; the lowering keeps the op there)."""
    return int8_linear_decomposed_codes(quantize_input(x, x_scale, qmin, qmax), x_scale, max(-qmin, qmax), w_q,
                                        w_scale, bias)


def quantize_input(x: Tensor, x_scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """:func:`int8_linear_decomposed`'s quantization of ``x`` (..., K): ``round(x / x_scale).clamp(qmin,
    qmax)`` (a true division, round half to even) as float codes, ``x_scale`` broadcastable to
    (..., 1). The codes a producer that writes a linear's input codes must equal."""
    return torch.round(x.float() / x_scale.float().expand(*x.shape[:-1], 1)).clamp(qmin, qmax)


def _epilogue(acc: Tensor, row_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The decomposed linears' epilogue ``((acc * row_scale) * w_scale) + bias`` in float32, out of
    place (Inductor fuses it into the consumer), ``acc`` (..., N), ``row_scale`` (..., 1)."""
    y = acc * row_scale * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y


def int8_linear_decomposed_codes(x_q: Tensor, x_scale: Tensor, qmax: int, w_q: Tensor, w_scale: Tensor,
                                 bias: Optional[Tensor]) -> Tensor:
    """:func:`int8_linear_decomposed` after its quantization: ``x_q`` (..., K) holds the codes
    (int8, or integer-valued floats) of magnitude <= ``qmax`` that ``round(x / x_scale).clamp(qmin,
    qmax)`` gives, for producers that emit them (a fused kernel writing a linear's input codes
    instead of its float input); the same numbers as :func:`int8_linear_decomposed` on ``x``."""
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    xs = x_scale.float().expand(*lead, 1).reshape(-1, 1)
    acc = gemm.decomposed_mm(x_q.reshape(-1, k), w_q, qmax, 127, prepack=True)
    return _epilogue(acc, xs, w_scale, bias).reshape(*lead, w_q.shape[0])


def int8_linear_codes(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``ouromamba::int8_linear`` on integers ``x_q`` (..., K) with a scale broadcastable to
    (..., 1) (the per-token static scale of the reference graph)."""
    lead = x_q.shape[:-1]
    xs = x_scale.expand(*lead, 1).reshape(-1, 1)
    y = INT8_LINEAR_OP(x_q.reshape(-1, x_q.shape[-1]), xs, w_q, w_scale, bias)
    return y.reshape(*lead, w_q.shape[0])


def int8_linear_decomposed_acc(x: Tensor, x_scale: Tensor, qmin: int, qmax: int, w_q: Tensor) -> Tensor:
    """:func:`int8_linear_decomposed` without its epilogue: the exact integer products
    ``round(x / x_scale).clamp(qmin, qmax) @ w_q^T`` as float32 (..., N) (integer-valued), for
    consumers that apply ``((acc * x_scale) * w_scale) + bias`` themselves as they read it (the conv
    of a Mamba mixer on in_proj's x half: ``ouromamba::causal_conv1d_silu``'s ``in_scale``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    q = quantize_input(x, x_scale, qmin, qmax)
    acc = gemm.decomposed_mm(q.reshape(-1, k), w_q, max(-qmin, qmax), 127, prepack=True)
    return acc.reshape(*lead, w_q.shape[0])


def int8_linear_epilogue_t(acc_t: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The epilogue of :func:`int8_linear_decomposed` on ``acc_t`` (B, n, L), the transpose of
    columns of :func:`int8_linear_decomposed_acc`'s (B, L, N) output (``w_scale`` / ``bias``: those
    columns' n values): ``(((acc * x_scale) * w_scale) + bias)`` transposed, the same floats as
    transposing the linear's output and taking those columns (in_proj's z half in a Mamba mixer)."""
    acc = acc_t.transpose(-1, -2)
    return _epilogue(acc, x_scale.float().expand(*acc.shape[:-1], 1), w_scale, bias).transpose(-1, -2)
