"""Affine quantization: the reference graph's ``quantize`` / ``dequantize`` pair and the dynamic
per-token quantization of the integer linears.

The passes write every quantized tensor as ``dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)``
around float ops; the lowering pattern-matches those pairs and replaces them with fused integer
ops that compute the same numbers.

Conventions, shared by every op and kernel of the package:

* ``scale`` and ``zero_point`` are float32 tensors already shaped to broadcast against ``x``:
  ``(1,)`` per tensor, ``(L, 1)`` per token position for ``(B, L, C)``, ``(1, L)`` per token for
  ``(B, C, L)``, ``(C, 1)`` per output channel of a weight ``(C, K)``, and so on.
* ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` stored as int8 (4-bit values
  live in int8 with ``qmin=-7, qmax=7`` for symmetric); ``x_hat = (q - zero_point) * scale``.
  Division (not multiplication by ``1/scale``) is the rule, so kernels reproduce it bit-exactly.
* A dynamic scale is ``max(amax / qmax, EPS)`` (:data:`ouromamba_fx.numerics.EPS`): an all-zero row
  quantizes to zeros.

Ops (namespace ``ouromamba``):

* ``quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax) -> Tensor`` (int8)
* ``dequantize(Tensor q, Tensor scale, Tensor zero_point) -> Tensor`` (float32)
* ``quantize_per_token(Tensor x, int bits) -> (Tensor q, Tensor scale)``: dynamic symmetric
  per-row quantization over the last dim, ``q`` int8 in ``[-qmax, qmax]``, ``scale`` float32
  ``(..., 1)``. CPU: a few in-place torch ops; CUDA: Triton
  (:mod:`ouromamba_fx.kernels.triton.quantize_rows`).

:func:`fake_quantize` is the pair in plain torch, for calibration searches and for the lowered
graph, where Inductor fuses it into the neighbouring kernels (custom ops are opaque to it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ouromamba_fx.numerics import EPS, int8_qmax
from ouromamba_fx.ops.checks import check_float
from ouromamba_fx.ops.dispatch import register_cuda

__all__ = ["quantize", "dequantize", "quantize_ref", "dequantize_ref", "fake_quantize", "quantize_per_token",
           "quantize_per_token_ref", "quantize_symmetric_ref", "quantize_rows", "amax_rows", "dynamic_scale",
           "QUANTIZE_OP", "DEQUANTIZE_OP", "QUANTIZE_PER_TOKEN_OP"]


def quantize_ref(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    q = torch.round(x.float() / scale) + zero_point
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_ref(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.float() - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``dequantize(quantize(x))`` in plain torch (the same numbers, no op dispatch)."""
    return dequantize_ref(quantize_ref(x, scale, zero_point, qmin, qmax), scale, zero_point)


@torch.library.custom_op("ouromamba::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Affine quantization to int8 storage with a broadcastable scale (see module docstring)."""
    if not -128 <= qmin < qmax <= 127:
        raise ValueError(f"ouromamba::quantize: range [{qmin}, {qmax}] does not fit int8")
    # contiguous, as the fake implementation says: elementwise results otherwise follow the
    # input's strides (a transposed activation gave transposed codes) and Inductor, planning
    # buffers from the fake, would read them wrongly
    return quantize_ref(x, scale, zero_point, qmin, qmax).contiguous()


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape, zero_point.shape),
                       dtype=torch.int8, device=x.device)


@torch.library.custom_op("ouromamba::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Inverse of :func:`quantize`: ``(q - zero_point) * scale`` in float32 (contiguous, like the fake)."""
    return dequantize_ref(q, scale, zero_point).contiguous()


@dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty(torch.broadcast_shapes(q.shape, scale.shape, zero_point.shape),
                       dtype=torch.float32, device=q.device)


# ---------------------------------------------------------------------------------------------
# Symmetric per-row quantization (the integer linears' activations)

def quantize_symmetric_ref(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """:func:`quantize_ref` with zero point 0 and the range ``[-qmax, qmax]``."""
    return quantize_ref(x, scale, torch.zeros((), dtype=torch.float32, device=x.device), -qmax, qmax)


def amax_rows(x: Tensor) -> Tensor:
    """``max |x|`` over the last dim, kept as ``(..., 1)`` (0 for rows of no elements)."""
    # abs() + amax: all exact, so any reduction gives the same numbers; this one is the fastest
    # on the CPU (vector_norm(inf) and aminmax reduce more slowly)
    if x.shape[-1] == 0:
        return x.new_zeros((*x.shape[:-1], 1))
    return x.abs().amax(dim=-1, keepdim=True)


def quantize_rows(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as int8 (in place on one temporary), equal to
    :func:`quantize_symmetric_ref`."""
    q = torch.div(x, scale)
    q.round_().clamp_(-qmax, qmax)
    return q.to(torch.int8)


def dynamic_scale(x: Tensor, qmax: int) -> Tensor:
    """A symmetric scale per row, ``max(amax_rows(x) / qmax, EPS)``."""
    return amax_rows(x).div_(qmax).clamp_min_(EPS)


def quantize_per_token_ref(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Definition of ``ouromamba::quantize_per_token``."""
    qmax = int8_qmax(bits)
    x = x.float()
    scale = (amax_rows(x) / qmax).clamp_min(EPS)
    return quantize_symmetric_ref(x, scale, qmax), scale


def _quantize_per_token_cpu(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    qmax = int8_qmax(bits)
    x = x.float()
    scale = dynamic_scale(x, qmax)
    return quantize_rows(x, scale, qmax), scale


def _quantize_per_token_cuda(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    check_float("x", x)
    from ouromamba_fx.kernels.triton.quantize_rows import quantize_rows as quantize_rows_triton

    q, s = quantize_rows_triton(x.reshape(-1, x.shape[-1]), int8_qmax(bits))
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@torch.library.custom_op("ouromamba::quantize_per_token", mutates_args=(),
                         schema="(Tensor x, int bits) -> (Tensor q, Tensor scale)")
def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-row quantization of ``x`` (..., K) to ``bits``; see module docstring."""
    check_float("x", x)
    int8_qmax(bits)
    return _quantize_per_token_cpu(x, bits)


@quantize_per_token.register_fake
def _(x, bits):
    check_float("x", x)
    int8_qmax(bits)
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))


register_cuda(quantize_per_token)(_quantize_per_token_cuda)

# The op overloads graph nodes call (stable, printable, picklable targets).
QUANTIZE_OP = torch.ops.ouromamba.quantize.default
DEQUANTIZE_OP = torch.ops.ouromamba.dequantize.default
QUANTIZE_PER_TOKEN_OP = torch.ops.ouromamba.quantize_per_token.default
