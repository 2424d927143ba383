"""Triton GEMM on int4 weights packed two per byte, with an optional 8-bit outlier operand.

``y = ((acc_in * s_in + acc_out * s_out) * w_scale) + bias`` in float32, with
``acc_in = x_q @ Wq^T`` and (if given) ``acc_out = x_q_out @ Wq^T`` exact in int32, ``Wq`` the int4
weight unpacked in the kernel from ``w_packed`` (N, ceil(K / 2)) uint8 (the layout of
:func:`ouromamba_fx.ops.int4.pack_int4`: column ``2j`` in the low nibble of byte ``j``,
column ``2j + 1`` in the high nibble). ``x_q`` holds the 4-bit inliers as int8 (any int8 values
work, so this is also a W4A8 GEMM), ``x_q_out`` the 8-bit outliers; each weight tile is loaded and
unpacked once and feeds both products.

Unpacking: a tile of ``BLOCK_KP`` packed columns gives two int8 tiles, the low nibbles (even K
columns) and the high nibbles (odd K columns); the activations are loaded at the even and odd
columns (stride-2 pointers, the same cache lines) and each half goes through its own ``tl.dot``,
so no in-register interleave is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import tile_offsets
from ouromamba_fx.kernels.triton.int8_gemm import _check_operands, gemm_blocks

__all__ = ["int4_gemm", "int4_gemm_ref"]


@triton.jit
def _nibbles(w_bytes):
    """uint8 tile -> (low nibbles, high nibbles) as sign-extended int8 tiles."""
    w = w_bytes.to(tl.int32)
    lo = ((w & 15) ^ 8) - 8
    hi = (((w >> 4) & 15) ^ 8) - 8
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def _int4_gemm_kernel(
    # pointers
    a_ptr, b_ptr, w_ptr, y_ptr, sa_ptr, sb_ptr, ws_ptr, bias_ptr,
    # sizes (K unpacked)
    M, N, K,
    # strides (a: inliers, b: outliers, w: packed weight (N, ceil(K/2)))
    stride_am, stride_ak, stride_bm, stride_bk, stride_wn, stride_wp, stride_ym, stride_yn,
    stride_sa, stride_sb,
    # meta
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kp_total = (K + 1) // 2
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j0 in range(0, kp_total, BLOCK_KP):
        rj = j0 + tl.arange(0, BLOCK_KP)
        w_bytes = tl.load(w_ptr + rj[:, None] * stride_wp + rn[None, :] * stride_wn,
                          mask=(rj < kp_total)[:, None] & n_ok[None, :], other=0)
        w_even, w_odd = _nibbles(w_bytes)  # (BLOCK_KP, BLOCK_N): columns 2j and 2j + 1
        ke = 2 * rj
        ko = ke + 1
        e_ok = m_ok[:, None] & (ke < K)[None, :]
        o_ok = m_ok[:, None] & (ko < K)[None, :]
        a_e = tl.load(a_ptr + rm[:, None] * stride_am + ke[None, :] * stride_ak, mask=e_ok, other=0)
        a_o = tl.load(a_ptr + rm[:, None] * stride_am + ko[None, :] * stride_ak, mask=o_ok, other=0)
        acc_a += tl.dot(a_e, w_even, out_dtype=tl.int32)
        acc_a += tl.dot(a_o, w_odd, out_dtype=tl.int32)
        if HAS_OUTLIERS:
            b_e = tl.load(b_ptr + rm[:, None] * stride_bm + ke[None, :] * stride_bk, mask=e_ok, other=0)
            b_o = tl.load(b_ptr + rm[:, None] * stride_bm + ko[None, :] * stride_bk, mask=o_ok, other=0)
            acc_b += tl.dot(b_e, w_even, out_dtype=tl.int32)
            acc_b += tl.dot(b_o, w_odd, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm * stride_sa, mask=m_ok, other=0.0).to(tl.float32)
    y = acc_a.to(tl.float32) * sa[:, None]
    if HAS_OUTLIERS:
        sb = tl.load(sb_ptr + rm * stride_sb, mask=m_ok, other=0.0).to(tl.float32)
        y = y + acc_b.to(tl.float32) * sb[:, None]
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y,
             mask=m_ok[:, None] & n_ok[None, :])


def _check_packed(w_packed: Tensor, k: int) -> None:
    if w_packed.dim() != 2 or w_packed.dtype != torch.uint8:
        raise ValueError(f"w_packed must be uint8 (N, ceil(K/2)), got {w_packed.dtype} {tuple(w_packed.shape)}")
    if (k + 1) // 2 != w_packed.shape[1]:
        raise ValueError(f"x has K={k} columns but w_packed holds {w_packed.shape[1]} bytes per row "
                         f"(K in {{{2 * w_packed.shape[1] - 1}, {2 * w_packed.shape[1]}}})")


def int4_gemm(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor,
              bias: Optional[Tensor] = None, x_q_out: Optional[Tensor] = None,
              x_scale_out: Optional[Tensor] = None) -> Tensor:
    """``((x_q @ Wq^T) * x_scale [+ (x_q_out @ Wq^T) * x_scale_out]) * w_scale + bias``, float32 (M, N).

    ``x_q``, ``x_q_out``: int8 (M, K); ``x_scale``, ``x_scale_out``: 1 or M elements;
    ``w_packed``: uint8 (N, ceil(K / 2)); ``w_scale``: N elements; ``bias``: (N,) or None.
    """
    if x_q.dim() != 2:
        raise ValueError(f"x_q must be int8 (M, K), got {x_q.dtype} {tuple(x_q.shape)}")
    k = x_q.shape[1]
    _check_packed(w_packed, k)
    sa, stride_sa, ws, b = _check_operands(x_q, x_scale, w_packed, w_scale, bias, k)
    if (x_q_out is None) != (x_scale_out is None):
        raise ValueError("x_q_out and x_scale_out must be given together")
    if x_q_out is not None:
        if x_q_out.shape != x_q.shape:
            raise ValueError(f"x_q_out {tuple(x_q_out.shape)} must have x_q's shape {tuple(x_q.shape)}")
        sb, stride_sb, _, _ = _check_operands(x_q_out, x_scale_out, w_packed, w_scale, None, k)
    else:
        sb, stride_sb = sa, 0
    m, n = x_q.shape[0], w_packed.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x_q.device)
    if m == 0 or n == 0:
        return y
    bm, bn, bk, warps = gemm_blocks(m, n, k)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    b_op = x_q if x_q_out is None else x_q_out
    _int4_gemm_kernel[grid](
        x_q, b_op, w_packed, y, sa, sb, ws, ws if b is None else b,
        m, n, k,
        x_q.stride(0), x_q.stride(1), b_op.stride(0), b_op.stride(1), w_packed.stride(0), w_packed.stride(1),
        y.stride(0), y.stride(1), stride_sa, stride_sb,
        HAS_OUTLIERS=x_q_out is not None, HAS_BIAS=b is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KP=max(bk // 2, 32), GROUP_M=8, num_warps=warps,
    )
    return y


def int4_gemm_ref(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor,
                  bias: Optional[Tensor] = None, x_q_out: Optional[Tensor] = None,
                  x_scale_out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch twin of :func:`int4_gemm`, following the kernel: even/odd nibble halves, two
    exact products per operand, the same epilogue order."""
    m, k = x_q.shape
    p = w_packed.cpu().long()
    w_even = ((p & 15) ^ 8) - 8  # (N, KP): weight columns 0, 2, 4, ...
    w_odd = (((p >> 4) & 15) ^ 8) - 8  # columns 1, 3, 5, ... (0 past K when K is odd)

    def product(a: Tensor) -> Tensor:
        a = a.cpu().long()
        a_even, a_odd = a[:, 0::2], a[:, 1::2]
        if a_odd.shape[1] < a_even.shape[1]:
            a_odd = torch.cat([a_odd, a_odd.new_zeros(m, 1)], dim=1)
        return (a_even @ w_even.t() + a_odd @ w_odd.t()).to(torch.int32).to(x_q.device)

    def rows(s: Tensor) -> Tensor:
        return s.float().reshape(-1, 1) if s.numel() == m else s.float().reshape(1, 1)

    y = product(x_q).float() * rows(x_scale)
    if x_q_out is not None:
        y = y + product(x_q_out).float() * rows(x_scale_out)
    y = y * w_scale.float().reshape(1, -1)
    return y if bias is None else y + bias.float()
