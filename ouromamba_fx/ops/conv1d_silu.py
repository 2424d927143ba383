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

Both ops take three optional trailing arguments ``Tensor? in_scale=None, Tensor? in_wscale=None,
Tensor? in_bias=None``: with ``in_scale``, ``x`` is the raw (float32, integer-valued) accumulator of
the int8 linear that produces the conv's input (in_proj's x half, as the (B, D, L) transposed view),
and the op first makes it that linear's output, ``((x * in_scale) * in_wscale) + in_bias`` in float32
in that order (:func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed`'s epilogue, each operation
rounded, no multiply-add contraction), ``in_scale`` per tensor or per time step of ``x`` itself (1 or
L values, before any reversal), ``in_wscale`` and ``in_bias`` one value per channel (D). The same
output bit for bit as running the epilogue first, without its pass over memory.

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
from ouromamba_fx.ops.int8_linear import quantize_input
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


def _epilogue_args(x: Tensor, in_scale: Optional[Tensor], in_wscale: Optional[Tensor],
                   in_bias: Optional[Tensor]) -> Optional[tuple]:
    """The accumulator epilogue's (row scale, weight scale, bias) as flat float32 vectors, checked
    against x (B, D, L); None without an epilogue."""
    if (in_scale is None) != (in_wscale is None) or (in_scale is None and in_bias is not None):
        raise ValueError("causal_conv1d_silu: give in_scale and in_wscale (and optionally in_bias) together, or none")
    if in_scale is None:
        return None
    d, length = x.shape[1], x.shape[-1]
    xs = in_scale.detach().reshape(-1).float().contiguous()
    if xs.numel() not in (1, length):
        raise ValueError(f"causal_conv1d_silu: in_scale has {xs.numel()} values; expected 1 or one per time step of "
                         f"x ({length})")
    ws = in_wscale.detach().reshape(-1).float().contiguous()
    b = None if in_bias is None else in_bias.detach().reshape(-1).float().contiguous()
    for name, t in (("in_wscale", ws), ("in_bias", b)):
        if t is not None and t.numel() != d:
            raise ValueError(f"causal_conv1d_silu: {name} has {t.numel()} values; expected one per channel ({d})")
    return xs, ws, b


def conv_epilogue_ref(x: Tensor, in_scale: Tensor, in_wscale: Tensor, in_bias: Optional[Tensor]) -> Tensor:
    """The linear's output from its accumulator x (B, D, L): ``((x * in_scale) * in_wscale) + in_bias``."""
    xs, ws, b = _epilogue_args(x, in_scale, in_wscale, in_bias)
    y = x.float() * xs.reshape(1, 1, -1)
    y = y * ws.reshape(1, -1, 1)
    return y if b is None else y + b.reshape(1, -1, 1)


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                           zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool,
                           in_scale: Optional[Tensor] = None, in_wscale: Optional[Tensor] = None,
                           in_bias: Optional[Tensor] = None) -> Tensor:
    """Plain-torch twin of the op (the reference graph's ops in order), same output strides."""
    if _epilogue_args(x, in_scale, in_wscale, in_bias) is not None:
        x = conv_epilogue_ref(x, in_scale, in_wscale, in_bias)
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
                                "int qmin, int qmax, bool reverse, Tensor? in_scale=None, Tensor? in_wscale=None, "
                                "Tensor? in_bias=None) -> Tensor")
def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool,
                       in_scale: Optional[Tensor] = None, in_wscale: Optional[Tensor] = None,
                       in_bias: Optional[Tensor] = None) -> Tensor:
    _check(x, weight, scale, zero_point)
    epi = _epilogue_args(x, in_scale, in_wscale, in_bias)
    ext = MIXER_OPS.get() if x.device.type == "cpu" and weight.shape[-1] <= 16 else None
    if ext is None:
        return causal_conv1d_silu_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale, in_wscale,
                                      in_bias)
    xf = x.float()
    if xf.stride(1) != 1:  # the kernel reads a time step's channels as one vector
        xf = xf.transpose(1, 2).contiguous().transpose(1, 2)
    length = x.shape[-1]
    empty = torch.empty(0)
    s, z = _steps(scale, length), _steps(zero_point, length)
    out = ext.conv_silu(xf, weight.detach().float().reshape(weight.shape[0], -1).t().contiguous(),
                        empty if bias is None else bias.detach().float().contiguous(),
                        empty if s is None else s, empty if z is None else z, int(qmin), int(qmax),
                        bool(reverse), *_kernel_epilogue(epi))
    return out.transpose(1, 2)


def _kernel_epilogue(epi: Optional[tuple]) -> tuple[Tensor, Tensor, Tensor]:
    """The C++ kernel's (in_scale, in_wscale, in_bias) arguments: empty tensors where absent."""
    empty = torch.empty(0)
    if epi is None:
        return empty, empty, empty
    return epi[0], epi[1], empty if epi[2] is None else epi[2]


@register_cuda(causal_conv1d_silu)
def _causal_conv1d_silu_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale=None, in_wscale=None,
                             in_bias=None):
    _check(x, weight, scale, zero_point)
    if _epilogue_args(x, in_scale, in_wscale, in_bias) is not None:  # the epilogue in torch, then the Triton conv
        x = conv_epilogue_ref(x, in_scale, in_wscale, in_bias)
    from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu as conv_silu_triton

    s, z = _steps(scale, x.shape[-1]), _steps(zero_point, x.shape[-1])
    return conv_silu_triton(x, weight.detach(), None if bias is None else bias.detach(), s, z, int(qmin), int(qmax),
                            bool(reverse))


@causal_conv1d_silu.register_fake
def _(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale=None, in_wscale=None, in_bias=None):
    _epilogue_args(x, in_scale, in_wscale, in_bias)
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
    return quantize_input(y.transpose(1, 2), s, code_qmin, code_qmax).to(torch.int8).contiguous()


def causal_conv1d_silu_codes_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                                 zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool,
                                 code_scale: Tensor, code_qmin: int, code_qmax: int, in_scale: Optional[Tensor] = None,
                                 in_wscale: Optional[Tensor] = None,
                                 in_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain-torch twin of ``causal_conv1d_silu_codes``: the conv's reference, then its codes."""
    y = causal_conv1d_silu_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale, in_wscale, in_bias)
    return y, conv_codes_ref(y, code_scale, code_qmin, code_qmax)


@torch.library.custom_op("ouromamba::causal_conv1d_silu_codes", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? zero_point, "
                                "int qmin, int qmax, bool reverse, Tensor code_scale, int code_qmin, int code_qmax, "
                                "Tensor? in_scale=None, Tensor? in_wscale=None, Tensor? in_bias=None) "
                                "-> (Tensor, Tensor)")
def causal_conv1d_silu_codes(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                             zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool, code_scale: Tensor,
                             code_qmin: int, code_qmax: int, in_scale: Optional[Tensor] = None,
                             in_wscale: Optional[Tensor] = None,
                             in_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    _check(x, weight, scale, zero_point)
    _check_codes(x, code_scale, code_qmin, code_qmax)
    epi = _epilogue_args(x, in_scale, in_wscale, in_bias)
    ext = MIXER_OPS.get() if x.device.type == "cpu" and weight.shape[-1] <= 16 else None
    if ext is None:
        return causal_conv1d_silu_codes_ref(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale,
                                            code_qmin, code_qmax, in_scale, in_wscale, in_bias)
    xf = x.float()
    if xf.stride(1) != 1:
        xf = xf.transpose(1, 2).contiguous().transpose(1, 2)
    length = x.shape[-1]
    empty = torch.empty(0)
    s, z = _steps(scale, length), _steps(zero_point, length)
    y, q = ext.conv_silu_codes(xf, weight.detach().float().reshape(weight.shape[0], -1).t().contiguous(),
                               empty if bias is None else bias.detach().float().contiguous(),
                               empty if s is None else s, empty if z is None else z, int(qmin), int(qmax),
                               bool(reverse), _steps(code_scale, length), int(code_qmin), int(code_qmax),
                               *_kernel_epilogue(epi))
    return y.transpose(1, 2), q


@register_cuda(causal_conv1d_silu_codes)
def _causal_conv1d_silu_codes_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale, code_qmin,
                                   code_qmax, in_scale=None, in_wscale=None, in_bias=None):
    # the Triton conv, then the codes in torch (the lowering keeps CUDA graphs on the unfused pair)
    _check_codes(x, code_scale, code_qmin, code_qmax)
    y = _causal_conv1d_silu_cuda(x, weight, bias, scale, zero_point, qmin, qmax, reverse, in_scale, in_wscale, in_bias)
    return y, conv_codes_ref(y, code_scale, code_qmin, code_qmax)


@causal_conv1d_silu_codes.register_fake
def _(x, weight, bias, scale, zero_point, qmin, qmax, reverse, code_scale, code_qmin, code_qmax, in_scale=None,
      in_wscale=None, in_bias=None):
    _check_codes(x, code_scale, code_qmin, code_qmax)
    _epilogue_args(x, in_scale, in_wscale, in_bias)
    b, d, length = x.shape
    y = torch.empty_strided((b, d, length), (length * d, 1, d), dtype=torch.float32, device=x.device)
    return y, torch.empty((b, length, d), dtype=torch.int8, device=x.device)


CONV1D_SILU_CODES_OP = torch.ops.ouromamba.causal_conv1d_silu_codes.default
