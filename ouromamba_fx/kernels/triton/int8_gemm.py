"""Triton int8 x int8 -> int32 GEMM with a fused dequantization epilogue.

``y = ((x_q @ w_q^T) * x_scale) * w_scale + bias`` in float32, where the product is accumulated
exactly in int32 by ``tl.dot`` on int8 tiles. ``x_q`` (M, K) int8, ``x_scale`` one element or one per
row, ``w_q`` (N, K) int8 (the ``nn.Linear`` layout, read in place as a (K, N) operand), ``w_scale``
N elements, ``bias`` (N,) or None; any strides. On a GPU the epilogue may be contracted to FMAs,
so floats can differ from :func:`int8_gemm_ref` by float rounding; the integers cannot.

Any M, K, N (tails are masked): it serves the shapes cuBLAS's ``torch._int_mm`` refuses (M <= 16,
K or N not a multiple of 8) as well as the others. Tiles are autotuned over :data:`CONFIGS`
(pruned to the problem's size; the first one alone under the interpreter).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import autotune_configs, fit_tiles, launch, tile_offsets

__all__ = ["int8_gemm", "int8_gemm_ref", "CONFIGS"]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 8-bit tl.dot needs K tiles of at least 32 and
# M, N tiles of at least 16 on NVIDIA GPUs. The first entry is the interpreter's; the 16-row one
# serves few tokens (batch 1 of a short sequence), the 128 x 128 one the large GEMMs. None of these
# spills registers (``ptxas -v``, sm_80 and sm_90a); 128 x 64 and 64 x 128 tiles on 4 warps and 128 x 128 x 128
# tiles on 8 do.
CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]


@triton.autotune(configs=autotune_configs(CONFIGS), key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": fit_tiles({"BLOCK_M": "M", "BLOCK_N": "N"})})
@triton.jit
def _int8_gemm_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_xs,
    # meta
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm * stride_xs, mask=m_ok, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y,
             mask=m_ok[:, None] & n_ok[None, :])


def _vector(name: str, t: Tensor, n: int, device) -> Tensor:
    if t.numel() != n or t.device != device or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor of {n} elements on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return t.reshape(n).to(torch.float32).contiguous()


def _check_operands(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor], k_w: int) -> tuple[Tensor, int, Tensor, Optional[Tensor]]:
    """Shared checks of the GEMM wrappers; returns (x_scale flat, its stride, w_scale, bias)."""
    if x_q.dim() != 2 or x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be int8 (M, K), got {x_q.dtype} {tuple(x_q.shape)}")
    if x_q.shape[1] != k_w or w_q.device != x_q.device:
        raise ValueError(f"x_q {tuple(x_q.shape)} on {x_q.device} does not match the weight "
                         f"(K={k_w}) on {w_q.device}")
    m, n = x_q.shape[0], w_q.shape[0]
    per_row = x_scale.numel() == m and m != 1
    if not per_row and x_scale.numel() != 1:
        raise ValueError(f"x_scale must have 1 or M={m} elements, got {tuple(x_scale.shape)}")
    xs = _vector("x_scale", x_scale, x_scale.numel(), x_q.device)
    ws = _vector("w_scale", w_scale, n, x_q.device)
    b = None if bias is None else _vector("bias", bias, n, x_q.device)
    return xs, (1 if per_row else 0), ws, b


def int8_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
              bias: Optional[Tensor] = None) -> Tensor:
    """``((x_q @ w_q^T) * x_scale) * w_scale + bias`` as float32 (M, N), int32-exact product."""
    if w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise ValueError(f"w_q must be int8 (N, K), got {w_q.dtype} {tuple(w_q.shape)}")
    xs, stride_xs, ws, b = _check_operands(x_q, x_scale, w_q, w_scale, bias, w_q.shape[1])
    (m, k), n = x_q.shape, w_q.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x_q.device)
    if m == 0 or n == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(
        _int8_gemm_kernel, grid,
        x_q, w_q, y, xs, ws, ws if b is None else b,
        m, n, k,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), y.stride(0), y.stride(1), stride_xs,
        HAS_BIAS=b is not None,
    )
    return y


def int8_gemm_ref(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                  bias: Optional[Tensor] = None) -> Tensor:
    """Plain-torch twin of :func:`int8_gemm` (exact int64 product on the CPU, same epilogue order)."""
    acc = (x_q.cpu().long() @ w_q.cpu().long().t()).to(torch.int32).to(x_q.device)
    xs = x_scale.float().reshape(-1, 1) if x_scale.numel() == x_q.shape[0] else x_scale.float().reshape(1, 1)
    y = acc.float() * xs * w_scale.float().reshape(1, -1)
    return y if bias is None else y + bias.float()
