"""Triton per-row (per-token) symmetric quantization and the inlier / outlier split.

Numbers (see :mod:`ouromamba_fx.ops.quant`): ``q = clamp(round_half_even(x / scale), -qmax,
qmax)`` as int8, with a true (round-to-nearest) division ``tl.math.div_rn``; a dynamic scale is
``max(amax / qmax, eps)``, also with ``div_rn``. Rounding half to even uses the float32 trick
``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for ``|v| < 2**22``; the value is clamped to
``[-qmax, qmax]`` first (clamping and rounding commute for integer bounds), so it always holds.
(``libdevice.rint`` would do on a GPU but is not available under ``TRITON_INTERPRET=1``.)

Host wrappers (shapes checked, outputs allocated here):

* :func:`quantize_rows` ``(x (M, K) float, qmax, scale=None) -> (q int8 (M, K), scale f32 (M, 1))``
* :func:`outlier_split` ``(x (M, K) float, mask (M, K) bool, inlier_scale (M, 1) | None, qmax_in)
  -> (q_in, s_in, q_out, s_out)``; outliers are always 8-bit (qmax 127).

Each has a plain-torch twin (``*_ref``) with the same signature, following the kernel's steps.

A program quantizes ``BLOCK_M`` rows, walking them in ``BLOCK_K`` columns at a time (``BLOCK_K`` is
K rounded up to a power of two, at most 256); ``BLOCK_M`` and the warps are autotuned over
:data:`CONFIGS` (the first one alone under the interpreter).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import autotune_configs, launch, round_half_even
from ouromamba_fx.numerics import EPS

__all__ = ["quantize_rows", "quantize_rows_ref", "outlier_split", "outlier_split_ref", "EPS", "CONFIGS"]

# (BLOCK_M, num_warps, num_stages); the first is the interpreter's. A program's tile is
# BLOCK_M x BLOCK_K (BLOCK_K <= 256): configs are pruned to at most 16 tile elements per thread.
CONFIGS = [
    triton.Config({"BLOCK_M": 4}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_M": 1}, num_warps=1, num_stages=2),
    triton.Config({"BLOCK_M": 2}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_M": 4}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16}, num_warps=8, num_stages=3),
]
_MAX_PER_THREAD = 16


def _prune(configs, named_args, **kwargs):
    """Configs of at most ``_MAX_PER_THREAD`` tile elements per thread and no more rows than M."""
    block_k, m = kwargs["BLOCK_K"], int(named_args["M"])
    fit = [c for c in configs if c.kwargs["BLOCK_M"] * block_k <= _MAX_PER_THREAD * 32 * c.num_warps
           and c.kwargs["BLOCK_M"] <= triton.next_power_of_2(m)]
    return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]


_AUTOTUNE = dict(configs=autotune_configs(CONFIGS), key=["M", "K"], prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _round_clamp(v, qmax):
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    return round_half_even(v).to(tl.int8)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk, stride_qm, stride_qk,
    # meta
    qmax, eps,
    STATIC_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    qmax = tl.cast(qmax, tl.float32)
    eps = tl.cast(eps, tl.float32)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    if STATIC_SCALE:
        scale = tl.load(scale_ptr + rm, mask=row_ok, other=1.0)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = tl.maximum(tl.math.div_rn(amax, tl.zeros_like(amax) + qmax), eps)
        tl.store(scale_ptr + rm, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale[:, None] + tl.zeros_like(x.to(tl.float32)))
        tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :] * stride_qk, _round_clamp(v, qmax), mask=ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _outlier_split_kernel(
    # pointers
    x_ptr, mask_ptr, q_in_ptr, s_in_ptr, q_out_ptr, s_out_ptr,
    # sizes
    M, K,
    # strides (q_in and q_out share one layout)
    stride_xm, stride_xk, stride_mm, stride_mk, stride_qm, stride_qk,
    # meta
    qmax_in, eps,
    STATIC_INLIER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    qmax_in = tl.cast(qmax_in, tl.float32)
    qmax_out = tl.cast(127.0, tl.float32)
    eps = tl.cast(eps, tl.float32)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    amax_in = tl.zeros((BLOCK_M,), dtype=tl.float32)
    amax_out = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)
        is_out = tl.load(mask_ptr + rm[:, None] * stride_mm + rk[None, :] * stride_mk, mask=ok, other=0) != 0
        ax = tl.abs(x.to(tl.float32))
        amax_in = tl.maximum(amax_in, tl.max(tl.where(is_out, 0.0, ax), axis=1))
        amax_out = tl.maximum(amax_out, tl.max(tl.where(is_out, ax, 0.0), axis=1))
    if STATIC_INLIER:
        s_in = tl.load(s_in_ptr + rm, mask=row_ok, other=1.0)
    else:
        s_in = tl.maximum(tl.math.div_rn(amax_in, tl.zeros_like(amax_in) + qmax_in), eps)
        tl.store(s_in_ptr + rm, s_in, mask=row_ok)
    s_out = tl.maximum(tl.math.div_rn(amax_out, tl.zeros_like(amax_out) + qmax_out), eps)
    tl.store(s_out_ptr + rm, s_out, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)
        x = x.to(tl.float32)
        is_out = tl.load(mask_ptr + rm[:, None] * stride_mm + rk[None, :] * stride_mk, mask=ok, other=0) != 0
        v_in = tl.math.div_rn(tl.where(is_out, 0.0, x), s_in[:, None] + tl.zeros_like(x))
        v_out = tl.math.div_rn(tl.where(is_out, x, 0.0), s_out[:, None] + tl.zeros_like(x))
        offs = rm[:, None] * stride_qm + rk[None, :] * stride_qk
        tl.store(q_in_ptr + offs, _round_clamp(v_in, qmax_in), mask=ok)
        tl.store(q_out_ptr + offs, _round_clamp(v_out, qmax_out), mask=ok)


def _block_k(k: int) -> int:
    return min(max(triton.next_power_of_2(k), 16), 256)


def _grid(m: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)


def _check_x(x: Tensor, qmax: int) -> None:
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"expected a floating (M, K) tensor, got {x.dtype} {tuple(x.shape)}")
    if not 1 <= int(qmax) <= 127:
        raise ValueError(f"qmax must be in [1, 127] (int8 storage), got {qmax}")


def _check_row_scale(name: str, s: Tensor, m: int, device) -> Tensor:
    if s.numel() != m or s.dim() > 2 or s.device != device:
        raise ValueError(f"{name} must hold one scale per row ({m}) on {device}, got "
                         f"{tuple(s.shape)} on {s.device}")
    return s.reshape(m).to(torch.float32).contiguous()


def quantize_rows(x: Tensor, qmax: int, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of ``x`` (M, K) to ``[-qmax, qmax]``: dynamic scale
    ``max(amax(|x|) / qmax, eps)`` if ``scale`` is None, else the given per-row ``scale`` (M, 1)."""
    _check_x(x, qmax)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if scale is None:
        s = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        s = _check_row_scale("scale", scale, m, x.device).clone()
    if m == 0:
        return q, s.reshape(m, 1)
    launch(
        _quantize_rows_kernel, _grid(m),
        x, q, s,
        m, k,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        float(qmax), float(EPS),
        STATIC_SCALE=scale is not None, BLOCK_K=_block_k(k),
    )
    return q, s.reshape(m, 1)


def quantize_rows_ref(x: Tensor, qmax: int, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain-torch twin of :func:`quantize_rows`."""
    x = x.float()
    if scale is None:
        scale = (x.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(EPS)
    else:
        scale = scale.float().reshape(-1, 1)
    return torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8), scale


def outlier_split(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                  qmax_in: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inliers (``~mask``) to ``[-qmax_in, qmax_in]`` with the static per-row ``inlier_scale`` (M, 1)
    or a dynamic one; outliers (``mask``) to 8 bits with a dynamic per-row scale. Returns
    ``(q_in, s_in, q_out, s_out)``, int8 (M, K) and float32 (M, 1)."""
    _check_x(x, qmax_in)
    if mask.dtype != torch.bool or mask.shape != x.shape or mask.device != x.device:
        raise ValueError(f"mask must be bool with x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")
    m, k = x.shape
    q_in = torch.empty((m, k), dtype=torch.int8, device=x.device)
    q_out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s_out = torch.empty(m, dtype=torch.float32, device=x.device)
    if inlier_scale is None:
        s_in = torch.empty(m, dtype=torch.float32, device=x.device)
    else:
        s_in = _check_row_scale("inlier_scale", inlier_scale, m, x.device).clone()
    if m:
        mask_u8 = mask.view(torch.uint8)  # same bytes; avoids i1 pointers
        launch(
            _outlier_split_kernel, _grid(m),
            x, mask_u8, q_in, s_in, q_out, s_out,
            m, k,
            x.stride(0), x.stride(1), mask_u8.stride(0), mask_u8.stride(1), q_in.stride(0), q_in.stride(1),
            float(qmax_in), float(EPS),
            STATIC_INLIER=inlier_scale is not None, BLOCK_K=_block_k(k),
        )
    return q_in, s_in.reshape(m, 1), q_out, s_out.reshape(m, 1)


def outlier_split_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                      qmax_in: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain-torch twin of :func:`outlier_split`."""
    x = x.float()
    q_in, s_in = quantize_rows_ref(torch.where(mask, 0.0, x), qmax_in, inlier_scale)
    q_out, s_out = quantize_rows_ref(torch.where(mask, x, 0.0), 127)
    return q_in, s_in, q_out, s_out
