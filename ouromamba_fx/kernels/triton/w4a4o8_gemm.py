"""Triton W4A4O8 linear: a 4-bit-inlier x int4-weight GEMM plus an 8-bit product over only each
token's outlier channels (OuroMamba-Quant), in one kernel.

For M tokens of K channels (from :mod:`ouromamba_fx.kernels.triton.mixed_quant`,
:class:`~ouromamba_fx.kernels.triton.mixed_quant.OutlierCodes`) and int4 weights packed two per byte,
``w_packed`` (N, ceil(K / 2)) uint8 (column ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the
high nibble; any strides)::

    acc_in[m, n]  = sum_k q_in[m, k] W[n, k]                           (tl.dot on int8 tiles, exact)
    acc_out[m, n] = sum_{j < count[m]} q_out[m, j] W[n, idx[m, j]]      (the token's outliers only)
    y = ((acc_in * s_in[m] + acc_out * s_out[m]) * w_scale[n]) + bias[n]          (float32)

The outlier term is a gather, not a second dense GEMM: a tile of ``BLOCK_M`` tokens loops over its
largest outlier count, each step adding one weight column per token (``BLOCK_M x BLOCK_N`` integer
FMAs); the method's outliers are a few channels per token, so this costs a few percent of the
inlier product, where the dense alternative doubles it. The gathered weight bytes are read through
``w_packed``'s strides: a weight stored K-major (``w_packed.t().contiguous().t()``) makes each
token's gather one contiguous run over N (and the inlier tiles are read as well either way).

The kernel is compiled without FMA contraction, so the float epilogue is evaluated exactly as
written: the output equals the reference's bit for bit (``w4a4o8_linear_ref`` of the ops).

Host wrappers: :func:`w4a4o8_gemm` (the codes given), :func:`w4a4o8_linear` (``x`` and its outlier
mask: ``ouromamba::w4a4o8_linear``'s arguments) and :func:`w4a4o8_linear_detect` (``x`` and its step
scales, the outlier rule applied on the way: ``ouromamba::w4a4o8_linear_rt``'s arguments, scales
resampled to L). Plain-torch twins: :func:`w4a4o8_gemm_ref`, :func:`w4a4o8_linear_ref`,
:func:`w4a4o8_linear_detect_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import autotune_configs, fit_tiles, launch, tile_offsets
from ouromamba_fx.kernels.triton.mixed_quant import (OutlierCodes, dense_outliers, mixed_codes, mixed_codes_ref,
                                                     split_codes, split_codes_ref)

__all__ = ["w4a4o8_gemm", "w4a4o8_gemm_ref", "w4a4o8_linear", "w4a4o8_linear_ref", "w4a4o8_linear_detect",
           "w4a4o8_linear_detect_ref", "CONFIGS"]

# (BLOCK_M, BLOCK_N, BLOCK_KP packed bytes = 2 * BLOCK_KP channels, num_warps, num_stages). 8-bit
# tl.dot needs K tiles of at least 32 and M, N tiles of at least 16 on NVIDIA GPUs. None of these
# spills registers (``ptxas -v``, sm_80, 16-byte aligned operands); 128 x 128 tiles of 64 bytes and
# 128 x 256 tiles do. First: the interpreter's.
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KP": 32, "GROUP_M": 8}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_KP": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KP": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_KP": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_KP": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_KP": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_KP": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
]


@triton.jit
def _nibbles(w):
    """Packed bytes (as int8) -> (low nibbles, high nibbles), sign-extended by arithmetic shifts in
    int8 (the low nibble moved up first; the shift left wraps modulo 256)."""
    return (w << 4) >> 4, w >> 4


@triton.autotune(configs=autotune_configs(CONFIGS), key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": fit_tiles({"BLOCK_M": "M", "BLOCK_N": "N"})})
@triton.jit
def _w4a4o8_gemm_kernel(
    # pointers
    q_ptr, w_ptr, y_ptr, s_in_ptr, ws_ptr, bias_ptr, idx_ptr, qo_ptr, cnt_ptr, s_out_ptr,
    # sizes (K unpacked; CAP: capacity of the outlier lists)
    M, N, K, CAP,
    # strides (w: packed (N, ceil(K / 2)); s_sin: 0 for one inlier scale, else the row stride)
    s_qm, s_qk, s_wn, s_wp, s_ym, s_yn, s_sin, s_im, s_ij, s_om, s_oj,
    # meta
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # inliers: all K channels, the weight tile unpacked into its even and odd columns
    kp_total = (K + 1) // 2
    acc_in = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j0 in range(0, kp_total, BLOCK_KP):
        rj = j0 + tl.arange(0, BLOCK_KP)
        w_bytes = tl.load(w_ptr + rj[:, None] * s_wp + rn[None, :] * s_wn,
                          mask=(rj < kp_total)[:, None] & n_ok[None, :], other=0).to(tl.int8, bitcast=True)
        w_even, w_odd = _nibbles(w_bytes)
        # the activation tile's 2 * BLOCK_KP channels in one contiguous load, split into even / odd
        rk = 2 * j0 + tl.arange(0, 2 * BLOCK_KP)
        a = tl.load(q_ptr + rm[:, None] * s_qm + rk[None, :] * s_qk, mask=m_ok[:, None] & (rk < K)[None, :], other=0)
        a_e, a_o = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_KP, 2)))
        acc_in += tl.dot(a_e, w_even, out_dtype=tl.int32)
        acc_in += tl.dot(a_o, w_odd, out_dtype=tl.int32)
    # outliers: each token's own channels, one weight column per token and step
    cnt = tl.minimum(tl.load(cnt_ptr + rm, mask=m_ok, other=0), CAP)
    acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j in range(0, tl.max(cnt, axis=0)):
        live = m_ok & (j < cnt)
        ch = tl.load(idx_ptr + rm * s_im + j * s_ij, mask=live, other=0).to(tl.int32)
        v = tl.load(qo_ptr + rm * s_om + j * s_oj, mask=live, other=0).to(tl.int32)
        w_byte = tl.load(w_ptr + (ch >> 1)[:, None] * s_wp + rn[None, :] * s_wn,
                         mask=live[:, None] & n_ok[None, :], other=0).to(tl.int8, bitcast=True)
        lo, hi = _nibbles(w_byte)
        acc_out += v[:, None] * tl.where((ch & 1)[:, None] != 0, hi, lo).to(tl.int32)
    s_in = tl.load(s_in_ptr + rm * s_sin, mask=m_ok, other=0.0).to(tl.float32)
    s_out = tl.load(s_out_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)
    y = acc_in.to(tl.float32) * s_in[:, None] + acc_out.to(tl.float32) * s_out[:, None]
    y = y * tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, y, mask=m_ok[:, None] & n_ok[None, :])


def _where() -> str:
    return "ouromamba_fx.kernels.triton.w4a4o8_gemm"


def _check_weight(w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int, device) -> int:
    if w_packed.dim() != 2 or w_packed.dtype != torch.uint8 or w_packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"{_where()}: w_packed must be uint8 (N, {(k + 1) // 2}) for K={k}, got {w_packed.dtype} "
                         f"{tuple(w_packed.shape)}")
    n = w_packed.shape[0]
    for name, t in (("w_packed", w_packed), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{_where()}: {name} is on {t.device}, the activations on {device}")
    if w_scale.numel() != n or not w_scale.dtype.is_floating_point:
        raise ValueError(f"{_where()}: w_scale must hold {n} floats (one per output channel), got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"{_where()}: bias must be float ({n},), got {bias.dtype} {tuple(bias.shape)}")
    return n


def w4a4o8_gemm(q_in: Tensor, s_in: Tensor, idx: Tensor, q_out: Tensor, count: Tensor, s_out: Tensor,
                w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``((acc_in * s_in + acc_out * s_out) * w_scale) + bias``, float32 (M, N) (module docstring).

    The first six arguments are an :class:`OutlierCodes` (``w4a4o8_gemm(*codes, w_packed, ...)``):
    q_in int8 (M, K); s_in 1 or M floats; idx int16/int32 (M, cap); q_out int8 (M, cap); count
    int32 (M,) (entries past ``cap`` are ignored: the codes' producers raise on overflow); s_out
    M floats.
    """
    if q_in.dim() != 2 or q_in.dtype != torch.int8:
        raise ValueError(f"{_where()}: q_in must be int8 (M, K), got {q_in.dtype} {tuple(q_in.shape)}")
    m, k = q_in.shape
    dev = q_in.device
    n = _check_weight(w_packed, w_scale, bias, k, dev)
    if idx.dim() != 2 or idx.shape[0] != m or idx.dtype not in (torch.int16, torch.int32) \
            or q_out.shape != idx.shape or q_out.dtype != torch.int8:
        raise ValueError(f"{_where()}: idx (int16/int32) and q_out (int8) must be ({m}, cap), got {idx.dtype} "
                         f"{tuple(idx.shape)} and {q_out.dtype} {tuple(q_out.shape)}")
    if count.shape != (m,) or count.dtype != torch.int32:
        raise ValueError(f"{_where()}: count must be int32 ({m},), got {count.dtype} {tuple(count.shape)}")
    if s_in.numel() not in (1, m) or s_out.numel() != m:
        raise ValueError(f"{_where()}: s_in must hold 1 or {m} scales and s_out {m}, got {tuple(s_in.shape)} "
                         f"and {tuple(s_out.shape)}")
    for name, t in (("idx", idx), ("q_out", q_out), ("count", count), ("s_in", s_in), ("s_out", s_out)):
        if t.device != dev:
            raise ValueError(f"{_where()}: {name} is on {t.device}, q_in on {dev}")
    y = torch.empty((m, n), dtype=torch.float32, device=dev)
    if m == 0 or n == 0:
        return y
    si = s_in.reshape(-1).to(torch.float32).contiguous()
    so = s_out.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(
        _w4a4o8_gemm_kernel, grid,
        q_in, w_packed, y, si, ws, b if b is not None else ws, idx, q_out, count, so,
        m, n, k, idx.shape[1],
        *q_in.stride(), *w_packed.stride(), *y.stride(), 1 if si.numel() > 1 else 0, *idx.stride(),
        *q_out.stride(),
        HAS_BIAS=b is not None, enable_fp_fusion=False,
    )
    return y


def _lead(x: Tensor, k: int) -> tuple:
    if x.dim() < 1 or x.shape[-1] != k or not x.dtype.is_floating_point:
        raise ValueError(f"{_where()}: x must be a floating (..., {k}) tensor, got {x.dtype} {tuple(x.shape)}")
    return tuple(x.shape[:-1])


def _rows_scale(inlier_scale: Optional[Tensor], lead: tuple) -> Optional[Tensor]:
    """A static inlier scale broadcastable to (..., 1) as one value per row (M,)."""
    if inlier_scale is None:
        return None
    return inlier_scale.to(torch.float32).expand(*lead, 1).reshape(-1)


def w4a4o8_linear(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor, w_scale: Tensor,
                  bias: Optional[Tensor], k: int) -> Tensor:
    """``ouromamba::w4a4o8_linear``: ``x`` (..., K) split by ``mask`` (bool, x's shape) into 4-bit
    inliers (static ``inlier_scale`` broadcastable to (..., 1), or dynamic per row when None) and
    8-bit per-row outliers, times the packed int4 weight; float32 (..., N)."""
    lead = _lead(x, k)
    if mask.shape != x.shape:
        raise ValueError(f"{_where()}: mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    codes = split_codes(x.reshape(-1, k), mask.reshape(-1, k), _rows_scale(inlier_scale, lead), 4)
    return w4a4o8_gemm(*codes, w_packed, w_scale, bias).reshape(*lead, w_packed.shape[0])


def w4a4o8_linear_detect(x: Tensor, step_scale: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                         k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """``ouromamba::w4a4o8_linear_rt``: ``x`` (..., L, K) quantized by the outlier rule (threshold
    ``outlier_k``, windows of ``n_refresh`` steps, 4-bit inliers at ``step_scale`` (1 or L values),
    8-bit outliers per token) and multiplied by the packed int4 weight; float32 (..., L, N)."""
    _lead(x, k)
    if x.dim() < 2:
        raise ValueError(f"{_where()}: x must be (..., L, {k}), got {tuple(x.shape)}")
    codes = mixed_codes(x, step_scale, 4, outlier_k, n_refresh)
    return w4a4o8_gemm(*codes, w_packed, w_scale, bias).reshape(*x.shape[:-1], w_packed.shape[0])


# ---------------------------------------------------------------------------------------------
# Plain-torch twins

def _unpack_int4(w_packed: Tensor, k: int) -> Tensor:
    p = w_packed.long()
    lo, hi = (p & 15) ^ 8, ((p >> 4) & 15) ^ 8
    return torch.stack([lo - 8, hi - 8], dim=-1).reshape(p.shape[0], -1)[:, :k]


def w4a4o8_gemm_ref(q_in: Tensor, s_in: Tensor, idx: Tensor, q_out: Tensor, count: Tensor, s_out: Tensor,
                    w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain-torch twin of :func:`w4a4o8_gemm`: exact int64 products (the outliers as a dense
    tensor rebuilt from the lists), the same epilogue order."""
    m, k = q_in.shape
    w = _unpack_int4(w_packed.cpu(), k)
    codes = OutlierCodes(q_in, s_in, idx, q_out, count.clamp(max=idx.shape[1]), s_out)
    acc_in = (q_in.cpu().long() @ w.t()).to(torch.int32).to(q_in.device)
    acc_out = (dense_outliers(codes, k).cpu().long() @ w.t()).to(torch.int32).to(q_in.device)
    si = s_in.float().reshape(-1, 1) if s_in.numel() == m else s_in.float().reshape(1, 1)
    y = acc_in.float() * si + acc_out.float() * s_out.float().reshape(-1, 1)
    y = y * w_scale.float().reshape(1, -1)
    return y if bias is None else y + bias.float()


def w4a4o8_linear_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor, w_scale: Tensor,
                      bias: Optional[Tensor], k: int) -> Tensor:
    """Plain-torch twin of :func:`w4a4o8_linear`."""
    lead = tuple(x.shape[:-1])
    codes = split_codes_ref(x.reshape(-1, k), mask.reshape(-1, k), _rows_scale(inlier_scale, lead), 4)
    return w4a4o8_gemm_ref(*codes, w_packed, w_scale, bias).reshape(*lead, w_packed.shape[0])


def w4a4o8_linear_detect_ref(x: Tensor, step_scale: Tensor, w_packed: Tensor, w_scale: Tensor,
                             bias: Optional[Tensor], k: int, outlier_k: float, n_refresh: int) -> Tensor:
    """Plain-torch twin of :func:`w4a4o8_linear_detect`."""
    codes = mixed_codes_ref(x, step_scale, 4, outlier_k, n_refresh)
    return w4a4o8_gemm_ref(*codes, w_packed, w_scale, bias).reshape(*x.shape[:-1], w_packed.shape[0])
