"""Reference quantize / dequantize ops: the vocabulary of the reference quantized graph.

The passes write every quantized tensor as ``dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)``
around float ops; the lowering (``torch.compile(backend="ouromamba")``) pattern-matches those pairs
and replaces them with fused integer kernels that must compute the same numbers.

Conventions, shared by every kernel of the package:

* ``scale`` and ``zero_point`` are float32 tensors already shaped to broadcast against ``x``:
  ``(1,)`` per tensor, ``(L, 1)`` per token position for ``(B, L, C)``, ``(1, L)`` per token for
  ``(B, C, L)``, ``(C, 1)`` per output channel of a weight ``(C, K)``, and so on.
* ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` stored as int8 (4-bit values
  live in int8 with ``qmin=-7, qmax=7`` for symmetric); ``x_hat = (q - zero_point) * scale``.
  Division (not multiplication by ``1/scale``) is the rule, so kernels reproduce it bit-exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_ref(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    q = torch.round(x.float() / scale) + zero_point
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_ref(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.float() - zero_point) * scale


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


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``dequantize(quantize(x))`` in plain torch, for calibration searches (no op dispatch)."""
    return dequantize_ref(quantize_ref(x, scale, zero_point, qmin, qmax), scale, zero_point)


# The op overloads graph nodes call (stable, printable, picklable targets).
QUANTIZE = torch.ops.ouromamba.quantize.default
DEQUANTIZE = torch.ops.ouromamba.dequantize.default
