"""Depthwise causal conv1d + SiLU with its input's fake quantization fused: the mixer's conv.

Op (namespace ``ouromamba``):

* ``causal_conv1d_silu(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point,
  int qmin, int qmax, bool reverse) -> Tensor``:
  ``silu(conv1d(fake_quantize(x'), weight, bias, padding=K-1, groups=D)[..., :L])`` for ``x``
  (B, D, L) and a depthwise ``weight`` (D, 1, K), where ``x' = x.flip(-1)`` when ``reverse`` (the
  backward branch of a bidirectional Vim block) and ``fake_quantize`` is skipped when ``scale`` is
  None; the scale and zero point are per tensor or per time step (of ``x'``). The result is
  (B, D, L) with channel-contiguous memory (strides ``(L*D, 1, D)``): x_proj (which reads it
  transposed, as (B, L, D)) and the scan read it without a copy.
* ``causal_conv1d_silu_codes(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point,
  int qmin, int qmax, bool reverse, Tensor code_scale, int code_qmin, int code_qmax) -> (Tensor, Tensor)``:
  the same output ``y`` and, beside it, the int8 codes (B, L, D) (contiguous) of its transpose
  ``y.transpose(1, 2)`` for a static symmetric scale per tensor or per time step ``code_scale``
  (1 or L values): ``round(y.transpose(1, 2) / code_scale).clamp(code_qmin, code_qmax)`` (round half
  to even, a true division), the quantization of x_proj's input in
  :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed`, so that the linear runs on these
  codes (:func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_codes`) and the compiled graph
  has no quantize pass over the conv's output. The codes come from the very floats the op stores:
  the same integers as quantizing ``y`` afterwards, bit for bit.

Kernels: on the CPU one C++ pass over memory (``kernels/cpu/mixer_ops.cpp``, kernels up to 16
taps), replacing a quantize-and-transpose kernel, the convolution and the SiLU/slice kernel;
``flip`` is never materialised. On CUDA the Triton kernel of
:mod:`ouromamba_fx.kernels.triton.conv1d_silu` (one pass too, any number of taps). Elsewhere (and
on the CPU without the C++ build) :func:`causal_conv1d_silu_ref`, the reference graph's ops in
order. Numbers: the reference's up to float summation order (K products per output) and the exp
of SiLU (about 1 ulp). The codes of ``causal_conv1d_silu_codes`` are computed in the C++ pass on
the CPU (each output row quantized while it is in L1) and by the plain-torch quantization of the
output elsewhere (CUDA: the Triton conv, then torch).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx.kernels.cpu.build import MIXER_OPS
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.quant import dequantize_ref, quantize_ref


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


def _check(x: Tensor, weight: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor]) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_silu: expected x (B, D, L) and a depthwise weight (D, 1, K); got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if (scale is None) != (zero_point is None):
        raise ValueError("causal_conv1d_silu: give both scale and zero_point, or neither")


@torch.library.custom_op("ouromamba::causal_conv1d_silu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point, "
                                "int qmin, int qmax, bool reverse) -> Tensor")
def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool) -> Tensor:
    _check(x, weight, scale, zero_point)
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


@register_cuda(causal_conv1d_silu)
def _causal_conv1d_silu_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse):
    _check(x, weight, scale, zero_point)
    from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu as conv_silu_triton

    s, z = _steps(scale, x.shape[-1]), _steps(zero_point, x.shape[-1])
    return conv_silu_triton(x, weight.detach(), None if bias is None else bias.detach(), s, z, int(qmin), int(qmax),
                            bool(reverse))


@causal_conv1d_silu.register_fake
def _(x, weight, bias, scale, zero_point, qmin, qmax, reverse):
    b, d, length = x.shape
    return torch.empty_strided((b, d, length), (length * d, 1, d), dtype=torch.float32, device=x.device)


CONV1D_SILU_OP = torch.ops.ouromamba.causal_conv1d_silu.default


# ---------------------------------------------------------------------------------------------
# causal_conv1d_silu_codes

def _check_codes(x: Tensor, code_scale: Tensor, code_qmin: int, code_qmax: int) -> None:
    if not (-128 <= int(code_qmin) <= int(code_qmax) <= 127):
        raise ValueError(f"causal_conv1d_silu_codes: the codes' range [{code_qmin}, {code_qmax}] must lie in "
                         "[-128, 127] (int8)")
    _steps(code_scale, x.shape[-1])  # 1 or L values


def conv_codes_ref(y: Tensor, code_scale: Tensor, code_qmin: int, code_qmax: int) -> Tensor:
    """The codes of the conv's output ``y`` (B, D, L): ``round(y.transpose(1, 2) / s).clamp(qmin,
    qmax)`` as int8 (B, L, D), ``s`` per tensor or per time step (int8_linear_decomposed's quantize)."""
    s = _steps(code_scale, y.shape[-1]).reshape(1, -1, 1)
    q = torch.round(y.float().transpose(1, 2) / s).clamp(code_qmin, code_qmax)
    return q.to(torch.int8).contiguous()


def causal_conv1d_silu_codes_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                                 zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool,
                                 code_scale: Tensor, code_qmin: int, code_qmax: int) -> tuple[Tensor, Tensor]:
    """Plain-torch twin of ``causal_conv1d_silu_codes``: the conv's reference, then its codes."""
    y = causal_conv1d_silu_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse)
    return y, conv_codes_ref(y, code_scale, code_qmin, code_qmax)


@torch.library.custom_op("ouromamba::causal_conv1d_silu_codes", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point, "
                                "int qmin, int qmax, bool reverse, Tensor code_scale, int code_qmin, int code_qmax) "
                                "-> (Tensor, Tensor)")
def causal_conv1d_silu_codes(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                             zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool, code_scale: Tensor,
                             code_qmin: int, code_qmax: int) -> tuple[Tensor, Tensor]:
    _check(x, weight, scale, zero_point)
    _check_codes(x, code_scale, code_qmin, code_qmax)
    ext = MIXER_OPS.get() if x.device.type == "cpu" and weight.shape[-1] <= 16 else None
    if ext is None:
        return causal_conv1d_silu_codes_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale,
                                            code_qmin, code_qmax)
    xf = x.float()
    if xf.stride(1) != 1:
        xf = xf.transpose(1, 2).contiguous().transpose(1, 2)
    length = x.shape[-1]
    empty = torch.empty(0)
    s, z = _steps(scale, length), _steps(zero_point, length)
    y, q = ext.conv_silu_codes(xf, weight.detach().float().reshape(weight.shape[0], -1).t().contiguous(),
                               empty if bias is None else bias.detach().float().contiguous(),
                               empty if s is None else s, empty if z is None else z, int(qmin), int(qmax),
                               bool(reverse), _steps(code_scale, length), int(code_qmin), int(code_qmax))
    return y.transpose(1, 2), q


@register_cuda(causal_conv1d_silu_codes)
def _causal_conv1d_silu_codes_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale, code_qmin,
                                   code_qmax):
    # the Triton conv, then the codes in torch (the lowering keeps CUDA graphs on the unfused pair)
    _check_codes(x, code_scale, code_qmin, code_qmax)
    y = _causal_conv1d_silu_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse)
    return y, conv_codes_ref(y, code_scale, code_qmin, code_qmax)


@causal_conv1d_silu_codes.register_fake
def _(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale, code_qmin, code_qmax):
    _check_codes(x, code_scale, code_qmin, code_qmax)
    b, d, length = x.shape
    y = torch.empty_strided((b, d, length), (length * d, 1, d), dtype=torch.float32, device=x.device)
    return y, torch.empty((b, length, d), dtype=torch.int8, device=x.device)


CONV1D_SILU_CODES_OP = torch.ops.ouromamba.causal_conv1d_silu_codes.default
