"""OuroMamba-Quant's mixed-precision activations: static per-time-step inlier scales, outlier
channels found at run time and kept at 8 bits with a dynamic per-token scale.

The rule (OuroMamba): at each time-step ``t`` of each sample, let ``a = |x_t|`` over channels,
``theta_t = mean(a) + k * std(a)``. A step *triggers* when its inliers would clip,
``max(a) / qmax > s_I(t)``; the channels of a triggering step with ``a > theta_t`` join the
outlier mask, which is reset at the start of every window of ``n_refresh`` steps and only grows
inside it.

What we do differently from the released code, on purpose:

* vectorised over time-steps: the mask within a window is a cumulative OR of the per-step flags,
  so there is no Python loop per token;
* decided per sample, not by one ``.any()`` over the batch;
* the trigger compares the step's full max with ``s_I(t)`` (the released loop compares the max of
  the not-yet-masked channels): a step whose clipping channels are already masked may still add
  channels above ``theta``; this only moves values from 4-bit to 8-bit, never the other way;
* the static scales serve any sequence length: ``s_I`` calibrated for ``L_cal`` positions is
  resampled linearly over relative position ``t / (L - 1)`` for another ``L`` (a middle class
  token stays in the middle, the ends stay the ends).

Everything is computed on ``x`` viewed as ``(batch, L, C)``; ``token_axis`` / ``channel_axis`` say
where those axes are in the real tensor. :func:`outlier_mask` is the rule, written once; every
user of it (the reference op, the lowered ops, the report's statistics, the calibration search)
gets its mask from that function, or from a C++ or Triton kernel tested bit for bit against it.

Ops (namespace ``ouromamba``):

* ``quantize_mixed(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k,
  n_refresh) -> Tensor``: the reference graph's mixed fake quantization (float32, ``x``'s shape).
* ``mixed_fake_quant(...)`` (same arguments, same numbers): one C++ pass per sample on the CPU
  (``kernels/cpu/mixer_ops.cpp``), for the lowered graph; the reference elsewhere.
* ``outlier_mask(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh)
  -> (mask, step_scale)``: the rule's mask and the per-step inlier scales shaped to broadcast
  against ``x`` (:func:`site_outlier_mask`). A custom op on purpose: Inductor could otherwise
  recompile the mean/std threshold with another summation order and flip channels that sit on
  the threshold.
* ``outlier_split(x, mask, inlier_scale, inlier_bits) -> (q_in, s_in, q_out, s_out)``: ``x``
  (M, K) split by ``mask`` (True = outlier) into inlier codes (``inlier_bits``, the static
  ``inlier_scale`` broadcastable to (M, 1), or a dynamic per-row scale if None) and 8-bit outlier
  codes (dynamic per-row scale); ``q_in`` is 0 where ``mask``, ``q_out`` where ``~mask``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.cpu.build import MIXER_OPS
from ouromamba_fx.numerics import EPS, int8_qmax, is_float
from ouromamba_fx.ops.checks import check_broadcast_scale, check_float, check_mask
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.quant import amax_rows, dynamic_scale, quantize_rows, quantize_symmetric_ref

OUTLIER_BITS = 8  # the outliers of the lowered ops (outlier_split, the W4A4O8 linears)


# ---------------------------------------------------------------------------------------------
# The rule

def as_rows(x: Tensor, token_axis: int, channel_axis: int) -> Tensor:
    """View ``x`` as (batch, L, C) (batch = every other axis; 0 rows for an empty batch)."""
    y = x.movedim((token_axis, channel_axis), (-2, -1))
    return y.reshape(math.prod(y.shape[:-2]), y.shape[-2], y.shape[-1])


def from_rows(rows: Tensor, like: Tensor, token_axis: int, channel_axis: int) -> Tensor:
    moved = like.movedim((token_axis, channel_axis), (-2, -1)).shape
    return rows.reshape(moved).movedim((-2, -1), (token_axis, channel_axis))


def resample_steps(s: Tensor, length: int) -> Tensor:
    """Per-step scales for ``length`` steps from scales calibrated for ``len(s)`` steps."""
    if s.numel() == length or s.numel() == 1:
        return s.expand(length) if s.numel() == 1 else s
    if length == 1:
        return s.mean().reshape(1)
    return F.interpolate(s.reshape(1, 1, -1).float(), size=length, mode="linear",
                         align_corners=True).reshape(length)


def outlier_mask(rows: Tensor, s_in: Tensor, qmax: int, k: float, n_refresh: int) -> Tensor:
    """Outlier mask (batch, L, C) for rows (batch, L, C) and inlier scales ``s_in`` (L,)."""
    b, length, c = rows.shape
    a = rows.abs()
    mean = a.mean(-1, keepdim=True)
    # Population std as two passes over the row (mean, then the mean of squared deviations): much
    # faster than torch.std's Welford kernel on rows of a few hundred channels, equal up to float
    # rounding; the fused kernels call this same function, so they flag the same channels.
    std = (a - mean).square_().mean(-1, keepdim=True).sqrt_()
    theta = mean + k * std
    trigger = a.amax(-1, keepdim=True) / qmax > s_in.reshape(1, length, 1)
    flag = (a > theta) & trigger
    if n_refresh <= 1:
        return flag
    pad = (-length) % n_refresh
    f = F.pad(flag, (0, 0, 0, pad)).reshape(b, (length + pad) // n_refresh, n_refresh, c)  # no -1: b may be 0
    # Cumulative OR inside each window as n_refresh - 1 in-place ORs of (b, windows, c) slices:
    # exact (booleans), and cheaper than cummax over uint8.
    for j in range(1, n_refresh):
        f[:, :, j] |= f[:, :, j - 1]
    return f.reshape(b, length + pad, c)[:, :length]


def site_mask(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int, k: float,
              n_refresh: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows (batch, L, C) float32, step scales (L,), mask (batch, L, C)) of a ``quantize_mixed``
    site: ``x`` and its calibrated ``inlier_scale`` (flat, as the caller wants it typed) taken
    through the rule."""
    rows = as_rows(x.float(), token_axis, channel_axis)
    s_in = resample_steps(inlier_scale, rows.shape[1])
    return rows, s_in, outlier_mask(rows, s_in, numerics.qmax(inlier_bits), k, n_refresh)


def mixed_fake_quant_rows(rows: Tensor, s_in: Tensor, mask: Tensor, inlier_bits: int,
                          outlier_bits: int) -> Tensor:
    """Dequantized rows: inliers at ``inlier_bits`` with ``s_in`` (L,), outliers at
    ``outlier_bits`` with a dynamic per-token scale (kept in float when ``outlier_bits >= 16``)."""
    qi = numerics.qmax(inlier_bits)
    s = s_in.reshape(1, -1, 1)
    x_in = torch.round(rows.masked_fill(mask, 0.0) / s).clamp_(-qi, qi) * s
    if is_float(outlier_bits):
        return torch.where(mask, rows, x_in)
    qo = numerics.qmax(outlier_bits)
    out = rows.masked_fill(~mask, 0.0)
    s_o = (out.abs().amax(-1, keepdim=True) / qo).clamp_min(EPS)
    x_out = torch.round(out / s_o).clamp_(-qo, qo) * s_o
    return torch.where(mask, x_out, x_in)


def outlier_fraction(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                     inlier_bits: int, outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """Fraction of channels flagged as outliers per time-step (mean over the batch), shape (L,);
    takes the arguments of ``quantize_mixed`` so reports can call it on a node's inputs."""
    _, _, mask = site_mask(x, inlier_scale.reshape(-1), token_axis, channel_axis, inlier_bits, k, n_refresh)
    return mask.float().mean(dim=(0, 2))


def outlier_map(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                inlier_bits: int, outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """Fraction of samples flagged per (time-step, channel), ``(L, C)``; takes the arguments of
    ``quantize_mixed``."""
    _, _, mask = site_mask(x, inlier_scale.reshape(-1), token_axis, channel_axis, inlier_bits, k, n_refresh)
    return mask.float().mean(dim=0)


# ---------------------------------------------------------------------------------------------
# ouromamba::quantize_mixed (the reference graph) and ouromamba::mixed_fake_quant (lowered)

def quantize_mixed_ref(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                       inlier_bits: int, outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    rows, s_in, mask = site_mask(x, inlier_scale.reshape(-1), token_axis, channel_axis, inlier_bits, k, n_refresh)
    return from_rows(mixed_fake_quant_rows(rows, s_in, mask, inlier_bits, outlier_bits), x,
                     token_axis, channel_axis)


@torch.library.custom_op("ouromamba::quantize_mixed", mutates_args=())
def quantize_mixed(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                   inlier_bits: int, outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """Mixed-precision fake quantization (dequantized float32 output), see module docstring."""
    return quantize_mixed_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits,
                              outlier_bits, k, n_refresh)


@quantize_mixed.register_fake
def _(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh):
    return torch.empty_like(x, dtype=torch.float32)


def triton_mixed(x: Tensor, token_axis: int, channel_axis: int, bits: int, outlier_bits: int) -> bool:
    """Whether the Triton kernel of :mod:`ouromamba_fx.kernels.triton.mixed_quant` takes this site:
    float ``x`` of at least two dims, 2..8-bit inliers, integer or float (>= 16) outliers, at most
    ``MAX_CHANNELS`` channels (a step's channels are held in registers)."""
    from ouromamba_fx.kernels.triton.mixed_quant import MAX_CHANNELS

    return (x.dtype.is_floating_point and x.dim() >= 2 and 2 <= bits <= 8 and outlier_bits >= 2
            and x.shape[channel_axis] <= MAX_CHANNELS)


@register_cuda(quantize_mixed)
def _quantize_mixed_cuda(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh):
    if not triton_mixed(x, token_axis, channel_axis, inlier_bits, outlier_bits):
        return quantize_mixed_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh)
    y = _mixed_fake_quant_cuda(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh)
    out = torch.empty_like(x, dtype=torch.float32)  # the fake's layout (x's strides)
    return y if out.stride() == y.stride() else out.copy_(y)


def step_scales(scale: Tensor, length: int) -> Tensor:
    """A site's calibrated per-step scales for ``length`` steps, float32 contiguous (L,)."""
    return resample_steps(scale.detach().reshape(-1).float(), length).contiguous()


def mixed_rows(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int) -> tuple[Tensor, Tensor]:
    """``x`` as (batch, L, C) float32 (a view when possible) and the per-step inlier scales (L,)."""
    rows = as_rows(x.float(), token_axis, channel_axis)
    return rows, step_scales(inlier_scale, rows.shape[1])


def cpp_mixed(x: Tensor, bits: int, outlier_bits: int) -> bool:
    """Whether the C++ mixed quantization serves ``x`` (a CPU tensor, 2..8-bit inliers, 8-bit outliers)."""
    return x.device.type == "cpu" and 2 <= bits <= 8 and outlier_bits == 8 and MIXER_OPS.get() is not None


@torch.library.custom_op("ouromamba::mixed_fake_quant", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, int token_axis, int channel_axis, int inlier_bits, "
                                "int outlier_bits, float k, int n_refresh) -> Tensor")
def mixed_fake_quant(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int,
                     outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """``ouromamba::quantize_mixed`` (same arguments, same numbers) in one C++ pass per sample on the
    CPU; the result is in ``x``'s shape (the time-step-major layout of the kernel, seen through a
    permutation when ``x`` is not channels-last). Elsewhere: the reference."""
    if not cpp_mixed(x, inlier_bits, outlier_bits):
        ref = quantize_mixed_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh)
        # the layout the fake implementation promises
        return from_rows(as_rows(ref, token_axis, channel_axis).contiguous(), x, token_axis, channel_axis)
    rows, s_in = mixed_rows(x, inlier_scale, token_axis, channel_axis)
    (y,) = MIXER_OPS.get().mixed_quant(rows, s_in, numerics.qmax(inlier_bits), float(k), int(n_refresh), True, 0)
    return from_rows(y, x, token_axis, channel_axis)


@mixed_fake_quant.register_fake
def _(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh):
    moved = x.movedim((token_axis, channel_axis), (-2, -1))
    rows = torch.empty(moved.shape, dtype=torch.float32, device=x.device).reshape(-1, *moved.shape[-2:])
    return from_rows(rows, x, token_axis, channel_axis)


@register_cuda(mixed_fake_quant)
def _mixed_fake_quant_cuda(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh):
    if not triton_mixed(x, token_axis, channel_axis, inlier_bits, outlier_bits):
        ref = quantize_mixed_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, outlier_bits, k, n_refresh)
        return from_rows(as_rows(ref, token_axis, channel_axis).contiguous(), x, token_axis, channel_axis)
    from ouromamba_fx.kernels.triton import mixed_quant

    # the kernel writes the rows (batch, L, C) contiguous, the layout the fake promises
    return mixed_quant.mixed_fake_quant(x, step_scales(inlier_scale, x.shape[token_axis]), token_axis, channel_axis,
                                        inlier_bits, outlier_bits, k, n_refresh)


# ---------------------------------------------------------------------------------------------
# ouromamba::outlier_mask and its plain-torch continuation (lowered graphs, non-fused)

def _step_scale_shape(x: Tensor, token_axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[token_axis] = x.shape[token_axis]
    return shape


@torch.library.custom_op("ouromamba::outlier_mask", mutates_args=(),
                         schema="(Tensor x, Tensor inlier_scale, int token_axis, int channel_axis, "
                                "int inlier_bits, float k, int n_refresh) -> (Tensor mask, Tensor step_scale)")
def site_outlier_mask(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int,
                      inlier_bits: int, k: float, n_refresh: int) -> tuple[Tensor, Tensor]:
    """The outlier mask (bool, ``x``'s shape) of ``quantize_mixed`` with the same arguments, and its
    inlier scale per time-step shaped to broadcast against ``x`` (length of the token axis there,
    1 elsewhere), resampled as the reference does when ``x`` has another sequence length."""
    return site_outlier_mask_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh)


def site_outlier_mask_ref(x: Tensor, inlier_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int,
                          k: float, n_refresh: int) -> tuple[Tensor, Tensor]:
    """Plain-torch definition of ``ouromamba::outlier_mask``."""
    _, s_in, mask = site_mask(x, inlier_scale.reshape(-1).float(), token_axis, channel_axis, inlier_bits, k,
                              n_refresh)
    mask = from_rows(mask, x, token_axis, channel_axis).contiguous()
    return mask, s_in.reshape(_step_scale_shape(x, token_axis)).clone()


@register_cuda(site_outlier_mask)
def _site_outlier_mask_cuda(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh):
    if not triton_mixed(x, token_axis, channel_axis, inlier_bits, OUTLIER_BITS):
        return site_outlier_mask_ref(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh)
    from ouromamba_fx.kernels.triton import mixed_quant

    s_in = step_scales(inlier_scale, x.shape[token_axis])
    mask = mixed_quant.outlier_mask(x, s_in, token_axis, channel_axis, inlier_bits, k, n_refresh)
    return mask, s_in.reshape(_step_scale_shape(x, token_axis)).clone()


@site_outlier_mask.register_fake
def _(x, inlier_scale, token_axis, channel_axis, inlier_bits, k, n_refresh):
    return (torch.empty(x.shape, dtype=torch.bool, device=x.device),
            torch.empty(_step_scale_shape(x, token_axis), dtype=torch.float32, device=x.device))


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


# ---------------------------------------------------------------------------------------------
# ouromamba::outlier_split (integer codes for the W4A4O8 GEMMs)

def _check_outlier_split(x, mask, inlier_scale, inlier_bits) -> None:
    int8_qmax(inlier_bits)
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"outlier_split expects x of shape (M, K), got {tuple(x.shape)}")
    check_mask(mask, x)
    if inlier_scale is not None:
        check_broadcast_scale("inlier_scale", inlier_scale, (x.shape[0],))


def outlier_split_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                      inlier_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Definition of ``ouromamba::outlier_split``."""
    qmax_in = int8_qmax(inlier_bits)
    qmax_out = int8_qmax(OUTLIER_BITS)
    x = x.float()
    x_in = torch.where(mask, 0.0, x)
    x_out = torch.where(mask, x, 0.0)
    if inlier_scale is None:
        s_in = (amax_rows(x_in) / qmax_in).clamp_min(EPS)
    else:
        s_in = inlier_scale.float().expand(x.shape[0], 1).clone()
    s_out = (amax_rows(x_out) / qmax_out).clamp_min(EPS)
    return (quantize_symmetric_ref(x_in, s_in, qmax_in), s_in, quantize_symmetric_ref(x_out, s_out, qmax_out),
            s_out)


def _outlier_split_cpu(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], inlier_bits: int):
    qmax_in = int8_qmax(inlier_bits)
    x = x.float()
    x_in = x.masked_fill(mask, 0.0)
    x_out = x.masked_fill(~mask, 0.0)
    s_in = dynamic_scale(x_in, qmax_in) if inlier_scale is None else inlier_scale.float().expand(x.shape[0], 1).clone()
    s_out = dynamic_scale(x_out, 127)
    return quantize_rows(x_in, s_in, qmax_in), s_in, quantize_rows(x_out, s_out, 127), s_out


def _outlier_split_cuda(x, mask, inlier_scale, inlier_bits):
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    from ouromamba_fx.kernels.triton.quantize_rows import outlier_split as outlier_split_triton

    s = None if inlier_scale is None else inlier_scale.float().expand(x.shape[0], 1)
    return outlier_split_triton(x, mask, s, int8_qmax(inlier_bits))


@torch.library.custom_op("ouromamba::outlier_split", mutates_args=(),
                         schema="(Tensor x, Tensor mask, Tensor? inlier_scale, int inlier_bits) "
                                "-> (Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out)")
def outlier_split(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                  inlier_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split ``x`` (M, K) into quantized inliers (``inlier_bits``) and 8-bit outliers (``mask``)."""
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    return _outlier_split_cpu(x, mask, inlier_scale, inlier_bits)


@outlier_split.register_fake
def _(x, mask, inlier_scale, inlier_bits):
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    q = lambda: torch.empty(x.shape, dtype=torch.int8, device=x.device)  # noqa: E731
    s = lambda: torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)  # noqa: E731
    return q(), s(), q(), s()


register_cuda(outlier_split)(_outlier_split_cuda)

QUANTIZE_MIXED_OP = torch.ops.ouromamba.quantize_mixed.default
MIXED_FAKE_QUANT_OP = torch.ops.ouromamba.mixed_fake_quant.default
OUTLIER_MASK_OP = torch.ops.ouromamba.outlier_mask.default
OUTLIER_SPLIT_OP = torch.ops.ouromamba.outlier_split.default
