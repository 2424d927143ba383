"""Triton OuroMamba-Quant activations: the run-time outlier rule and the mixed-precision quantization
in one pass per token.

The rule (:mod:`ouromamba_fx.ops.mixed`, ``outlier_mask``), on ``x`` seen as rows
(batch, L, C) (``token_axis`` / ``channel_axis`` say where L and C are): at step ``t`` of a row, with
``a = |x_t|`` over the C channels::

    theta = mean(a) + k * std(a)            (population std, two passes: mean, then mean((a - mean)^2))
    trigger = max(a) / qmax_in > s_in[t]    (the step's inliers would clip at its static scale)
    flag = (a > theta) & trigger

and the outlier mask is the OR of the flags since the start of the step's window of ``n_refresh``
steps (windows start at ``t % n_refresh == 0``; ``n_refresh <= 1``: each step's own flags). Then
(``mixed_fake_quant_rows``): inliers ``round(x / s_in[t]).clamp(+-qmax_in) * s_in[t]``, outliers
``round(x / s_o).clamp(+-qmax_out) * s_o`` with ``s_o = max(max|outliers| / qmax_out, 1e-8)`` per token
(or kept in float when ``outlier_bits >= 16``).

A program owns one window of one row (its steps depend on each other through the mask) and walks
its steps; each step's C channels are one register tile: statistics, flags, mask, both scales and
all outputs from a single read of the token. Divisions are true divisions (``div_rn``), the std a
correctly rounded ``sqrt_rn`` and the kernel is compiled without FMA contraction, so every number
is the reference's except the two channel sums of the statistics, which Triton adds in another
order than torch: a channel within an ulp or so of ``theta`` could be flagged differently (the
C++ kernel has the same caveat). Given the same mask, quantized values and codes are bit-exact.

Outputs, by wrapper (each with a plain-torch twin ``*_ref``, same arguments):

* :func:`mixed_fake_quant` -- ``ouromamba::quantize_mixed`` / ``mixed_fake_quant``: the dequantized
  float32 tensor in ``x``'s shape (memory: the rows (batch, L, C) contiguous, seen through the
  permutation back, as the CPU kernel writes it).
* :func:`outlier_mask` -- the rule's mask alone, bool, ``x``'s shape, contiguous.
* :func:`mixed_codes` -- for the W4A4O8 linear of a ``(..., L, K)`` input with the rule: inlier codes
  (``q_in``, 0 on outlier channels) and each token's outliers as a list (:class:`OutlierCodes`).
* :func:`split_codes` -- the same codes for a given mask and a static per-row or dynamic inlier
  scale (``ouromamba::outlier_split`` semantics, outliers as lists).

Step scales are given for the actual L (one value or L values); a caller holding scales
calibrated for another length resamples them first (``resample_steps`` of the ops).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.triton.common import EPS, autotune_configs, launch, round_half_even
from ouromamba_fx.numerics import is_float

__all__ = ["mixed_fake_quant", "mixed_fake_quant_ref", "outlier_mask", "outlier_mask_ref", "mixed_codes",
           "mixed_codes_ref", "split_codes", "split_codes_ref", "OutlierCodes", "dense_outliers", "CONFIGS",
           "MAX_CHANNELS"]

# (num_warps, num_stages); a program's work is one row of C channels per step, so the tile is set by
# C (BLOCK_C = next power of two) and only the warps and pipelining are tuned. First: interpreter.
CONFIGS = [
    triton.Config({}, num_warps=1, num_stages=1),
    triton.Config({}, num_warps=2, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=8, num_stages=3),
]
# A step's channels are held in registers: at most 32 per thread, beyond which ptxas spills (checked
# with ``ptxas -v``, sm_80: 8192 channels need 8 warps). Channel indices of the outlier lists are int16.
MAX_CHANNELS = 8192
_MAX_PER_THREAD = 32


def _prune(configs, named_args, **kwargs):
    """Configs whose warps hold a step's channels without spilling (the widest one if none does)."""
    block_c = kwargs["BLOCK_C"]
    fit = [c for c in configs if block_c <= _MAX_PER_THREAD * 32 * c.num_warps]
    return fit or [max(configs, key=lambda c: c.num_warps)]


class OutlierCodes(NamedTuple):
    """A W4A4O8 activation as the GEMM reads it, for M tokens of K channels.

    q_in: int8 (M, K), inlier codes, 0 on outlier channels; s_in: float32 (M,), their scale;
    idx: int16 (M, cap), each token's outlier channels in increasing order (entries past ``count``
    are unset); q_out: int8 (M, cap), their 8-bit codes; count: int32 (M,); s_out: float32 (M,).
    """

    q_in: Tensor
    s_in: Tensor
    idx: Tensor
    q_out: Tensor
    count: Tensor
    s_out: Tensor


@triton.autotune(configs=autotune_configs(CONFIGS), key=["C", "WINDOW"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mixed_quant_kernel(
    # pointers: input, inlier scales (per step or per row), given mask
    x_ptr, s_ptr, mask_in_ptr,
    # pointers: outputs (rows (R, L, C) contiguous; per token (R * L,); lists (R * L, CAP))
    y_ptr, mask_ptr, q_ptr, idx_ptr, qo_ptr, cnt_ptr, s_in_ptr, s_out_ptr,
    # sizes (WINDOW: steps per program, n_refresh for the rule)
    L, C, CAP, WINDOW,
    # strides
    s_xr, s_xt, s_xc, s_sr, s_st, s_mr, s_mt, s_mc,
    # scalars
    qi, qo, k, eps,
    # meta
    RULE: tl.constexpr, DYNAMIC_INLIER: tl.constexpr, FAKE: tl.constexpr, OUTLIER_FLOAT: tl.constexpr,
    WRITE_MASK: tl.constexpr, CODES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    qi = tl.cast(qi, tl.float32)
    qo = tl.cast(qo, tl.float32)
    k = tl.cast(k, tl.float32)
    eps = tl.cast(eps, tl.float32)
    r = tl.program_id(0)
    t0 = tl.program_id(1) * WINDOW
    t1 = tl.minimum(t0 + WINDOW, L)
    rc = tl.arange(0, BLOCK_C)
    c_ok = rc < C
    zeros = tl.zeros((BLOCK_C,), dtype=tl.float32)
    n_chan = zeros + tl.cast(C, tl.float32)
    mask = tl.zeros((BLOCK_C,), dtype=tl.int32)  # the window's outlier mask (0 / 1)
    for t in range(t0, t1):
        x = tl.load(x_ptr + r * s_xr + t * s_xt + rc * s_xc, mask=c_ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + r * s_sr + t * s_st).to(tl.float32)
        ax = tl.abs(x)
        if RULE:
            mean = tl.math.div_rn(zeros + tl.sum(ax, axis=0), n_chan)
            dev = tl.where(c_ok, ax - mean, 0.0)
            std = tl.sqrt_rn(tl.math.div_rn(zeros + tl.sum(dev * dev, axis=0), n_chan))
            theta = mean + k * std
            trigger = tl.math.div_rn(zeros + tl.max(ax, axis=0), zeros + qi) > s
            mask = mask | ((ax > theta) & trigger & c_ok).to(tl.int32)
        else:
            mask = (tl.load(mask_in_ptr + r * s_mr + t * s_mt + rc * s_mc, mask=c_ok, other=0) != 0).to(tl.int32)
        is_out = mask != 0
        if DYNAMIC_INLIER:
            s = tl.maximum(tl.math.div_rn(zeros + tl.max(tl.where(is_out, 0.0, ax), axis=0), zeros + qi), eps)
        else:
            s = zeros + s
        so = tl.maximum(tl.math.div_rn(zeros + tl.max(tl.where(is_out, ax, 0.0), axis=0), zeros + qo), eps)
        v_in = tl.math.div_rn(tl.where(is_out, 0.0, x), s)
        v_in = round_half_even(tl.minimum(tl.maximum(v_in, -qi), qi))
        v_out = tl.math.div_rn(tl.where(is_out, x, 0.0), so)
        v_out = round_half_even(tl.minimum(tl.maximum(v_out, -qo), qo))
        row = r * L + t
        if FAKE:
            if OUTLIER_FLOAT:
                y = tl.where(is_out, x, v_in * s)
            else:
                y = tl.where(is_out, v_out * so, v_in * s)
            tl.store(y_ptr + row * C + rc, y, mask=c_ok)
        if WRITE_MASK:
            tl.store(mask_ptr + row * C + rc, mask.to(tl.int8), mask=c_ok)
        if CODES:
            tl.store(q_ptr + row * C + rc, v_in.to(tl.int8), mask=c_ok)
            pos = tl.cumsum(mask, axis=0) - 1  # place of each outlier channel in the token's list
            listed = is_out & (pos < CAP)
            tl.store(idx_ptr + row * CAP + pos, rc.to(tl.int16), mask=listed)
            tl.store(qo_ptr + row * CAP + pos, v_out.to(tl.int8), mask=listed)
            tl.store(cnt_ptr + row, tl.sum(mask, axis=0))
            tl.store(s_in_ptr + row, tl.max(s, axis=0))
            tl.store(s_out_ptr + row, tl.max(so, axis=0))


def _where() -> str:
    return "ouromamba_fx.kernels.triton.mixed_quant"


def _rows(x: Tensor, token_axis: int, channel_axis: int) -> Tensor:
    moved = x.movedim((token_axis, channel_axis), (-2, -1))
    return moved.reshape(-1, moved.shape[-2], moved.shape[-1])


def _from_rows(rows: Tensor, like: Tensor, token_axis: int, channel_axis: int) -> Tensor:
    moved = like.movedim((token_axis, channel_axis), (-2, -1)).shape
    return rows.reshape(moved).movedim((-2, -1), (token_axis, channel_axis))


def _qmax(bits: int, what: str, high: int = 8) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= high:
        raise ValueError(f"{_where()}: {what} must be an int in [2, {high}], got {bits!r}")
    return numerics.qmax(bits)


def _check_x(x: Tensor, channel_axis: int = -1) -> None:
    if x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{_where()}: x must be a floating tensor with at least 2 dims, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.shape[channel_axis] > MAX_CHANNELS:
        raise ValueError(f"{_where()}: at most {MAX_CHANNELS} channels, got {x.shape[channel_axis]}")


def _step_vector(step_scale: Tensor, length: int, device) -> Tensor:
    if step_scale.numel() not in (1, length) or not step_scale.dtype.is_floating_point or step_scale.device != device:
        raise ValueError(f"{_where()}: the step scale must be a float tensor of 1 or {length} values (one per "
                         f"time step; resample calibrated scales to this length first) on {device}, got "
                         f"{step_scale.dtype} {tuple(step_scale.shape)} on {step_scale.device}")
    return step_scale.reshape(-1).to(torch.float32).contiguous()


def _launch(rows: Tensor, s: Tensor, s_strides: tuple[int, int], window: int, *, rule: bool, qi: int, qo: int,
            k: float = 0.0, mask_rows: Optional[Tensor] = None, fake: bool = False, outlier_float: bool = False,
            write_mask: bool = False, codes: bool = False, dynamic_inlier: bool = False,
            cap: Optional[int] = None) -> dict:
    r, length, c = rows.shape
    dev = rows.device
    out: dict = {}
    m = r * length
    y = torch.empty((r, length, c), dtype=torch.float32, device=dev) if fake else None
    mk = torch.empty((r, length, c), dtype=torch.bool, device=dev) if write_mask else None
    cap = c if cap is None else cap
    if codes:
        out["codes"] = OutlierCodes(
            torch.empty((m, c), dtype=torch.int8, device=dev), torch.empty(m, dtype=torch.float32, device=dev),
            torch.empty((m, cap), dtype=torch.int16, device=dev), torch.empty((m, cap), dtype=torch.int8, device=dev),
            torch.empty(m, dtype=torch.int32, device=dev), torch.empty(m, dtype=torch.float32, device=dev))
    if m and c:
        cd = out.get("codes")
        mask_u8 = mask_rows.view(torch.uint8) if mask_rows is not None else None
        mask_out = mk.view(torch.uint8) if mk is not None else None
        placeholder = s
        ms = mask_u8.stride() if mask_u8 is not None else (0, 0, 0)
        launch(
            _mixed_quant_kernel, (r, triton.cdiv(length, window)),
            rows, s, mask_u8 if mask_u8 is not None else placeholder,
            y if y is not None else placeholder, mask_out if mask_out is not None else placeholder,
            *((cd.q_in, cd.idx, cd.q_out, cd.count, cd.s_in, cd.s_out) if cd is not None else (placeholder,) * 6),
            length, c, cap, window,
            *rows.stride(), *s_strides, *ms,
            float(qi), float(qo), float(k), float(EPS),
            RULE=rule, DYNAMIC_INLIER=dynamic_inlier, FAKE=fake, OUTLIER_FLOAT=outlier_float,
            WRITE_MASK=write_mask, CODES=codes, BLOCK_C=max(triton.next_power_of_2(c), 16),
            enable_fp_fusion=False,
        )
    elif codes and m:  # no channels: all zero, no outliers, scales as the rule gives them
        cd = out["codes"]
        cd.count.zero_()
        cd.s_out.fill_(EPS)
        cd.s_in.copy_(s.expand(m) if not dynamic_inlier else torch.full((m,), EPS, device=dev))
    out["y"], out["mask"] = y, mk
    return out


def _check_overflow(codes: OutlierCodes, cap: Optional[int], k: int) -> None:
    if cap is not None and cap < k and codes.count.numel() and int(codes.count.max()) > cap:
        raise ValueError(f"{_where()}: a token has {int(codes.count.max())} outlier channels, more than "
                         f"max_outliers={cap}; pass a larger max_outliers (or None: up to all {k} channels)")


def _rule_args(x: Tensor, step_scale: Tensor, token_axis: int, channel_axis: int, n_refresh: int):
    rows = _rows(x, token_axis, channel_axis)
    s = _step_vector(step_scale, rows.shape[1], x.device)
    return rows, s, (0, 1 if s.numel() > 1 else 0), max(int(n_refresh), 1)


def mixed_fake_quant(x: Tensor, step_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int,
                     outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """The outlier rule and the mixed fake quantization (module docstring), float32 in ``x``'s shape;
    ``step_scale``: the inlier scale of each of the L steps (or one value)."""
    _check_x(x, channel_axis)
    qi = _qmax(inlier_bits, "inlier_bits")
    if not isinstance(outlier_bits, int) or outlier_bits < 2:
        raise ValueError(f"{_where()}: outlier_bits must be an int >= 2, got {outlier_bits!r}")
    qo = 1 if is_float(outlier_bits) else numerics.qmax(outlier_bits)
    rows, s, ss, window = _rule_args(x, step_scale, token_axis, channel_axis, n_refresh)
    out = _launch(rows, s, ss, window, rule=True, qi=qi, qo=qo, k=k, fake=True, outlier_float=is_float(outlier_bits))
    return _from_rows(out["y"], x, token_axis, channel_axis)


def outlier_mask(x: Tensor, step_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int, k: float,
                 n_refresh: int) -> Tensor:
    """The outlier rule's mask alone: bool, ``x``'s shape, contiguous."""
    _check_x(x, channel_axis)
    qi = _qmax(inlier_bits, "inlier_bits")
    rows, s, ss, window = _rule_args(x, step_scale, token_axis, channel_axis, n_refresh)
    out = _launch(rows, s, ss, window, rule=True, qi=qi, qo=127, k=k, write_mask=True)
    return _from_rows(out["mask"], x, token_axis, channel_axis).contiguous()


def mixed_codes(x: Tensor, step_scale: Tensor, inlier_bits: int, k: float, n_refresh: int,
                max_outliers: Optional[int] = None) -> OutlierCodes:
    """Codes of a W4A4O8 linear's input ``x`` (..., L, K) by the rule (tokens on axis -2, channels on
    axis -1), with 8-bit outliers: :class:`OutlierCodes` of the M = prod(...) * L tokens in order.
    ``max_outliers``: the capacity of the lists (default K, which cannot overflow); a smaller one
    is checked after the launch (a device sync) and an overflow raises."""
    _check_x(x)
    qi = _qmax(inlier_bits, "inlier_bits")
    rows, s, ss, window = _rule_args(x, step_scale, x.dim() - 2, x.dim() - 1, n_refresh)
    codes = _launch(rows, s, ss, window, rule=True, qi=qi, qo=127, k=k, codes=True, cap=max_outliers)["codes"]
    _check_overflow(codes, max_outliers, x.shape[-1])
    return codes


def split_codes(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], inlier_bits: int,
                max_outliers: Optional[int] = None) -> OutlierCodes:
    """Codes of ``x`` (M, K) for a given outlier ``mask`` (bool (M, K)): inliers at ``inlier_bits``
    with the static ``inlier_scale`` (1 or M values) or, when None, a dynamic per-row scale from the
    inliers' max; outliers at 8 bits per row. The numbers of ``ouromamba::outlier_split``, the
    outliers as lists."""
    _check_x(x)
    if x.dim() != 2:
        raise ValueError(f"{_where()}: split_codes takes x as (M, K), got {tuple(x.shape)}")
    qi = _qmax(inlier_bits, "inlier_bits")
    if mask.dtype != torch.bool or mask.shape != x.shape or mask.device != x.device:
        raise ValueError(f"{_where()}: mask must be bool with x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")
    m = x.shape[0]
    if inlier_scale is None:
        s, ss = torch.ones(1, dtype=torch.float32, device=x.device), (0, 0)
    else:
        if inlier_scale.numel() not in (1, m) or not inlier_scale.dtype.is_floating_point \
                or inlier_scale.device != x.device:
            raise ValueError(f"{_where()}: inlier_scale must be a float tensor of 1 or {m} values on {x.device}, "
                             f"got {inlier_scale.dtype} {tuple(inlier_scale.shape)} on {inlier_scale.device}")
        s = inlier_scale.reshape(-1).to(torch.float32).contiguous()
        ss = (1 if s.numel() > 1 else 0, 0)
    codes = _launch(x.unsqueeze(1), s, ss, 1, rule=False, qi=qi, qo=127, mask_rows=mask.unsqueeze(1), codes=True,
                    dynamic_inlier=inlier_scale is None, cap=max_outliers)["codes"]
    _check_overflow(codes, max_outliers, x.shape[-1])
    return codes


def dense_outliers(codes: OutlierCodes, k: int) -> Tensor:
    """The outlier lists of ``codes`` as a dense int8 (M, k) tensor (0 off the lists), in plain torch."""
    m, cap = codes.idx.shape
    live = torch.arange(cap, device=codes.idx.device)[None, :] < codes.count[:, None].clamp(max=cap)
    dense = torch.zeros((m, k), dtype=torch.int8, device=codes.idx.device)
    rows = torch.arange(m, device=codes.idx.device)[:, None].expand(m, cap)
    dense[rows[live], codes.idx.long()[live]] = codes.q_out[live]
    return dense


# ---------------------------------------------------------------------------------------------
# Plain-torch twins: the kernel's steps per token (statistics, window mask, scales, codes).

def _rule_mask_ref(rows: Tensor, s: Tensor, qi: int, k: float, n_refresh: int) -> Tensor:
    r, length, c = rows.shape
    a = rows.abs()
    mean = a.sum(-1, keepdim=True) / c
    std = ((a - mean).square().sum(-1, keepdim=True) / c).sqrt()
    theta = mean + k * std
    trigger = a.amax(-1, keepdim=True) / qi > s.expand(length).reshape(1, length, 1)
    flag = (a > theta) & trigger
    mask = torch.zeros_like(flag)
    window = max(int(n_refresh), 1)
    for t in range(length):
        mask[:, t] = flag[:, t] if t % window == 0 else mask[:, t - 1] | flag[:, t]
    return mask


def _quantize_ref(rows: Tensor, mask: Tensor, s: Tensor, qi: int, qo: int):
    """(inlier codes, inlier scale, outlier codes, outlier scale) of rows (R, L, C), s (R, L, 1)."""
    so = (rows.masked_fill(~mask, 0.0).abs().amax(-1, keepdim=True) / qo).clamp_min(EPS) if rows.shape[-1] \
        else rows.new_full((*rows.shape[:-1], 1), EPS)
    q_in = torch.round(rows.masked_fill(mask, 0.0) / s).clamp(-qi, qi)
    q_out = torch.round(rows.masked_fill(~mask, 0.0) / so).clamp(-qo, qo)
    return q_in, s, q_out, so


def _codes_ref(rows: Tensor, mask: Tensor, s: Tensor, qi: int, cap: Optional[int]) -> OutlierCodes:
    r, length, c = rows.shape
    q_in, s, q_out, so = _quantize_ref(rows, mask, s, qi, 127)
    m = r * length
    cap = c if cap is None else cap
    mask2 = mask.reshape(m, c)
    count = mask2.sum(-1).to(torch.int32)
    idx = torch.zeros((m, cap), dtype=torch.int16, device=rows.device)
    qo = torch.zeros((m, cap), dtype=torch.int8, device=rows.device)
    q2 = q_out.reshape(m, c)
    for i in range(m):
        chans = mask2[i].nonzero().flatten()[:cap]
        idx[i, :chans.numel()] = chans.to(torch.int16)
        qo[i, :chans.numel()] = q2[i, chans].to(torch.int8)
    return OutlierCodes(q_in.reshape(m, c).to(torch.int8), s.expand(r, length, 1).reshape(m).clone(), idx, qo,
                        count, so.reshape(m))


def mixed_fake_quant_ref(x: Tensor, step_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int,
                         outlier_bits: int, k: float, n_refresh: int) -> Tensor:
    """Plain-torch twin of :func:`mixed_fake_quant`."""
    rows = _rows(x.float(), token_axis, channel_axis)
    qi = numerics.qmax(inlier_bits)
    s = step_scale.reshape(-1).float()
    mask = _rule_mask_ref(rows, s, qi, k, n_refresh)
    qo = 1 if is_float(outlier_bits) else numerics.qmax(outlier_bits)
    q_in, s3, q_out, so = _quantize_ref(rows, mask, s.expand(rows.shape[1]).reshape(1, -1, 1), qi, qo)
    y = torch.where(mask, rows if is_float(outlier_bits) else q_out * so, q_in * s3)
    return _from_rows(y.contiguous(), x, token_axis, channel_axis)


def outlier_mask_ref(x: Tensor, step_scale: Tensor, token_axis: int, channel_axis: int, inlier_bits: int, k: float,
                     n_refresh: int) -> Tensor:
    """Plain-torch twin of :func:`outlier_mask`."""
    rows = _rows(x.float(), token_axis, channel_axis)
    mask = _rule_mask_ref(rows, step_scale.reshape(-1).float(), numerics.qmax(inlier_bits), k, n_refresh)
    return _from_rows(mask, x, token_axis, channel_axis).contiguous()


def mixed_codes_ref(x: Tensor, step_scale: Tensor, inlier_bits: int, k: float, n_refresh: int,
                    max_outliers: Optional[int] = None) -> OutlierCodes:
    """Plain-torch twin of :func:`mixed_codes`."""
    rows = _rows(x.float(), x.dim() - 2, x.dim() - 1)
    qi = numerics.qmax(inlier_bits)
    s = step_scale.reshape(-1).float()
    mask = _rule_mask_ref(rows, s, qi, k, n_refresh)
    return _codes_ref(rows, mask, s.expand(rows.shape[1]).reshape(1, -1, 1), qi, max_outliers)


def split_codes_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], inlier_bits: int,
                    max_outliers: Optional[int] = None) -> OutlierCodes:
    """Plain-torch twin of :func:`split_codes`."""
    rows = x.float().unsqueeze(1)
    qi = numerics.qmax(inlier_bits)
    m3 = mask.unsqueeze(1)
    if inlier_scale is None:
        s = (rows.masked_fill(m3, 0.0).abs().amax(-1, keepdim=True) / qi).clamp_min(EPS)
    else:
        s = inlier_scale.reshape(-1).float().expand(x.shape[0]).reshape(-1, 1, 1)
    return _codes_ref(rows, m3, s, qi, max_outliers)
