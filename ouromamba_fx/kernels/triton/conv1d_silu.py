"""Triton depthwise causal conv1d + SiLU, with the optional fake quantization of its input fused in
(``ouromamba::causal_conv1d_silu``).

For ``x`` (batch, dim, L) and a depthwise weight (dim, 1, K)::

    x'  = x.flip(-1) if reverse else x                 (the backward branch of a bidirectional block)
    x'' = dequantize(quantize(x', scale, zero_point, qmin, qmax))     when scale is given
    out = silu(bias + sum_j weight[:, 0, j] * x''[..., t - (K - 1) + j])     (zeros before t = 0)

``scale`` and ``zero_point`` hold one value or one per time step (of ``x'``). Quantization follows
:mod:`ouromamba_fx.ops.quant`: ``q = clamp(round_half_even(x / scale) + zero_point, qmin,
qmax)`` with a true division, ``x'' = (q - zero_point) * scale``; the padding zeros are not
quantized. ``flip`` is never materialised: the kernel reads ``x`` backwards. Output float32 in
channel-contiguous memory (strides ``(L * dim, 1, dim)``), as the reference and the CPU kernel write
it. Inputs in any float dtype and any strides; computed in float32.

A program computes a ``(BLOCK_D, BLOCK_L)`` output tile: ``K`` shifted loads of the input tile
(the overlap comes from L1), each quantized on the fly, summed with the per-channel tap. The float
sum runs in the order ``bias + w0 x0 + w1 x1 + ...``; the reference (``F.conv1d``) may sum in another
order, so results agree up to float rounding (a few ulps); the quantized input is exact.

Host wrapper :func:`causal_conv1d_silu`; plain-torch twin :func:`causal_conv1d_silu_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import autotune_configs, fit_tiles, launch, round_half_even

__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_ref", "CONFIGS"]

# (BLOCK_D, BLOCK_L, num_warps, num_stages); the first runs under the interpreter. At most 16 tile
# elements per thread: with more, ptxas spills registers (``ptxas -v``, sm_80).
CONFIGS = [
    triton.Config({"BLOCK_D": 16, "BLOCK_L": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_D": 32, "BLOCK_L": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_D": 32, "BLOCK_L": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 64, "BLOCK_L": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 64, "BLOCK_L": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_D": 128, "BLOCK_L": 32}, num_warps=8, num_stages=3),
]


@triton.autotune(configs=autotune_configs(CONFIGS), key=["DIM", "L", "KW"],
                 prune_configs_by={"early_config_prune": fit_tiles({"BLOCK_D": "DIM", "BLOCK_L": "L"})})
@triton.jit
def _causal_conv1d_silu_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, s_ptr, zp_ptr, out_ptr,
    # sizes
    DIM, L,
    # strides (s_s: 0 for a per-tensor scale, 1 for one per step)
    s_xb, s_xd, s_xl, s_wd, s_wk, s_s, s_ob, s_od, s_ol,
    # scalars
    qmin, qmax,
    # meta
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    qmin = tl.cast(qmin, tl.float32)
    qmax = tl.cast(qmax, tl.float32)
    pid_b = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rl = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    d_ok = rd < DIM
    l_ok = rl < L
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    x_ptr += pid_b * s_xb
    for j in tl.static_range(KW):
        tp = rl - (KW - 1) + j  # time step of x'
        t_ok = (tp >= 0) & (tp < L)
        ok = d_ok[:, None] & t_ok[None, :]
        if REVERSE:
            src = L - 1 - tp
        else:
            src = tp
        xv = tl.load(x_ptr + rd[:, None] * s_xd + src[None, :] * s_xl, mask=ok, other=0.0).to(tl.float32)
        if QUANT:
            s = tl.load(s_ptr + tp * s_s, mask=t_ok, other=1.0).to(tl.float32)[None, :]
            zp = tl.load(zp_ptr + tp * s_s, mask=t_ok, other=0.0).to(tl.float32)[None, :]
            v = tl.math.div_rn(xv, s + tl.zeros_like(xv))
            # clamp(round(v) + zp, qmin, qmax) == clamp(round(v') + zp, qmin, qmax) for v clamped to
            # [qmin - zp - 1, qmax - zp + 1] (monotonic); the clamp keeps |v| < 2**22 for the rounding
            v = tl.minimum(tl.maximum(v, qmin - zp - 1.0), qmax - zp + 1.0)
            q = tl.minimum(tl.maximum(round_half_even(v) + zp, qmin), qmax)
            xv = tl.where(ok, (q - zp) * s, 0.0)
        w = tl.load(w_ptr + rd * s_wd + j * s_wk, mask=d_ok, other=0.0).to(tl.float32)
        acc += w[:, None] * xv
    y = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * s_ob + rd[:, None] * s_od + rl[None, :] * s_ol, y,
             mask=d_ok[:, None] & l_ok[None, :])


def _steps(name: str, t: Optional[Tensor], length: int, device) -> Optional[Tensor]:
    if t is None:
        return None
    if t.numel() not in (1, length) or not t.dtype.is_floating_point or t.device != device:
        raise ValueError(f"ouromamba_fx.kernels.triton.conv1d_silu: {name} must be a float tensor with 1 or "
                         f"{length} (one per time step) values on {device}, got {t.dtype} {tuple(t.shape)} "
                         f"on {t.device}")
    return t.reshape(-1).to(torch.float32).contiguous()


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool) -> Tensor:
    """``silu(causal depthwise conv1d(fake_quant(x'), weight, bias))`` (module docstring); the
    arguments of ``ouromamba::causal_conv1d_silu``. float32 (batch, dim, L), channel-contiguous."""
    where = "ouromamba_fx.kernels.triton.conv1d_silu"
    if x.dim() != 3 or not x.dtype.is_floating_point:
        raise ValueError(f"{where}: x must be a floating (batch, dim, L) tensor, got {x.dtype} {tuple(x.shape)}")
    batch, dim, length = x.shape
    if weight.dim() != 3 or weight.shape[0] != dim or weight.shape[1] != 1 or weight.device != x.device:
        raise ValueError(f"{where}: weight must be depthwise ({dim}, 1, K) on {x.device}, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if bias is not None and (tuple(bias.shape) != (dim,) or bias.device != x.device):
        raise ValueError(f"{where}: bias must be ({dim},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if (scale is None) != (zero_point is None):
        raise ValueError(f"{where}: give both scale and zero_point, or neither")
    if not -128 <= int(qmin) < int(qmax) <= 127:
        raise ValueError(f"{where}: range [{qmin}, {qmax}] does not fit int8")
    s = _steps("scale", scale, length, x.device)
    zp = _steps("zero_point", zero_point, length, x.device)
    out = torch.empty_strided((batch, dim, length), (length * dim, 1, dim), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    w = weight.reshape(dim, weight.shape[2])
    s_step = 0 if s is None or s.numel() == 1 else 1
    if zp is not None and zp.numel() != s.numel():  # one of them per step: expand the other
        s, zp = s.expand(length).contiguous(), zp.expand(length).contiguous()
        s_step = 1

    def grid(meta):
        return (batch, triton.cdiv(dim, meta["BLOCK_D"]), triton.cdiv(length, meta["BLOCK_L"]))

    launch(
        _causal_conv1d_silu_kernel, grid,
        x, w, bias if bias is not None else w, s if s is not None else w, zp if zp is not None else w, out,
        dim, length,
        *x.stride(), *w.stride(), s_step, *out.stride(),
        float(qmin), float(qmax),
        KW=w.shape[1], HAS_BIAS=bias is not None, QUANT=s is not None, REVERSE=bool(reverse),
    )
    return out


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                           zero_point: Optional[Tensor], qmin: int, qmax: int, reverse: bool) -> Tensor:
    """Plain-torch twin of :func:`causal_conv1d_silu`, following the kernel: the K taps as shifted
    slices of the zero-padded (fake-quantized) input, summed from the bias on."""
    xf = x.float()
    if reverse:
        xf = xf.flip(-1)
    batch, dim, length = xf.shape
    if scale is not None:
        s = scale.reshape(-1).float().reshape(1, 1, -1)
        zp = zero_point.reshape(-1).float().reshape(1, 1, -1)
        q = (torch.round(xf / s) + zp).clamp(qmin, qmax)
        xf = (q - zp) * s
    k = weight.shape[-1]
    padded = F.pad(xf, (k - 1, 0))
    w = weight.reshape(dim, k).float()
    acc = torch.zeros_like(xf) if bias is None else bias.float()[None, :, None].expand_as(xf).clone()
    for j in range(k):
        acc = acc + w[None, :, j, None] * padded[..., j:j + length]
    y = F.silu(acc)
    return y.transpose(1, 2).contiguous().transpose(1, 2)
