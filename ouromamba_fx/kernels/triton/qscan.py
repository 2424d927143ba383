"""Triton kernel of the quantized selective scan (``ouromamba::selective_scan_q`` / ``_qi``).

One program owns ``BLOCK_D`` channels of one batch element and keeps their ``(BLOCK_D, d_state)``
state in registers while it walks the time-steps:

    dt    = softplus(delta + bias)  (or delta + bias)        delta = (q - zp[t]) * scale[t] if int8
    h'_t  = exp(dt A) (r_L[t-1] / r_L[t]) h'_{t-1} + dt u B_t / (r_C r_N) / r_L[t]
    h'_t  = clamp(round_half_even(h'_t / s), -qmax, qmax) * s               (QUANT only)
    y_t   = r_L[t] sum_n h'_t[n] C_t[n] (r_C r_N)[n] + D u_t,   out = y * silu(z)

``delta``, ``B`` and ``C`` are float or int8 codes; int8 ones come with per-time-step float32
``scale`` and ``zero_point`` vectors of length L (per-tensor parameters expanded by the caller).
The state scale ``s`` is one per time-step ``(L,)`` or finer, ``(d_inner | 1, L, d_state | 1)``
(per time-step and channel, or per time-step and state index): the kernel reads it through
strides, 0 along a broadcast axis.
Everything is computed in float32; the division ``h / s`` is a true division (``div_rn``) and the
rounding uses the float32 add-and-subtract trick after clamping (as ``quantize_rows`` does), so
state codes follow :func:`qscan_ref` except at ties created by float rounding (on a GPU the
products may be contracted to FMAs). :func:`qscan_ref` is the plain-torch twin, with the same
arguments.

``BLOCK_D`` and the warps are autotuned over :data:`CONFIGS` (the first one alone under the
interpreter), pruned to tiles of at most 16 state elements per thread.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.triton.common import autotune_configs, launch, round_half_even
from ouromamba_fx.numerics import is_float

__all__ = ["qscan", "qscan_ref", "CONFIGS"]

# (BLOCK_D, num_warps, num_stages): a program keeps BLOCK_D channels' (BLOCK_D, d_state) state and
# its factors in registers and walks the L steps; the first entry is the interpreter's. None spills
# registers at d_state 16 (``ptxas -v``, sm_80 and sm_90a); 128 channels on 8 warps do (sm_80).
CONFIGS = [
    triton.Config({"BLOCK_D": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_D": 16}, num_warps=1, num_stages=2),
    triton.Config({"BLOCK_D": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_D": 64}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=2),
]
_MAX_PER_THREAD = 16


def _prune(configs, named_args, **kwargs):
    """Configs of at most ``_MAX_PER_THREAD`` state elements per thread and no more channels than DIM."""
    block_n, dim = kwargs["BLOCK_N"], int(named_args["DIM"])
    fit = [c for c in configs if c.kwargs["BLOCK_D"] * block_n <= _MAX_PER_THREAD * 32 * c.num_warps
           and c.kwargs["BLOCK_D"] <= max(16, triton.next_power_of_2(dim))]
    return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_D"], -c.num_warps))]


@triton.jit
def _softplus(x):
    # F.softplus (threshold 20): max(x, 0) + log1p(exp(-|x|)), log1p(e) = 2 atanh(e / (2 + e)) as an
    # odd series (s <= 1/3), accurate where log(1 + e) would lose e's digits.
    e = tl.exp(-tl.abs(x))
    s = e / (2.0 + e)
    s2 = s * s
    q = s2 * (1.0 / 15.0) + 1.0 / 13.0
    q = q * s2 + 1.0 / 11.0
    q = q * s2 + 1.0 / 9.0
    q = q * s2 + 1.0 / 7.0
    q = q * s2 + 1.0 / 5.0
    q = q * s2 + 1.0 / 3.0
    q = q * s2 + 1.0
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * q)


@triton.autotune(configs=autotune_configs(CONFIGS), key=["DIM", "L", "N"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _qscan_kernel(
    # pointers: sequences, parameters, output
    u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, a_ptr, d_ptr, bias_ptr, out_ptr,
    # pointers: per-step dequantization parameters (L,), reparameterization factors, state scales
    dts_ptr, dtz_ptr, bs_ptr, bz_ptr, cs_ptr, cz_ptr, rc_ptr, rl_ptr, rn_ptr, ss_ptr,
    # sizes
    DIM, L, N,
    # strides (of the state scales: 0 along an axis they do not vary on)
    s_ub, s_ud, s_ut, s_db, s_dd, s_dt, s_bb, s_bn, s_bt, s_cb, s_cn, s_ct, s_zb, s_zd, s_zt,
    s_ob, s_od, s_ot, s_sd, s_st, s_sn,
    # scalars
    qmax,
    # meta
    DT_INT: tl.constexpr, B_INT: tl.constexpr, C_INT: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, QUANT: tl.constexpr,
    FINE_SCALES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    d_ok = rd < DIM
    n_ok = rn < N
    a = tl.load(a_ptr + rd[:, None] * N + rn[None, :], mask=d_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    rc = tl.load(rc_ptr + rd, mask=d_ok, other=1.0).to(tl.float32)
    rnf = tl.load(rn_ptr + rn, mask=n_ok, other=1.0).to(tl.float32)
    rcn = rc[:, None] * rnf[None, :]
    inv_rcn = 1.0 / rcn
    if HAS_D:
        dd = tl.load(d_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    rl_prev = tl.load(rl_ptr).to(tl.float32)
    for t in range(0, L):
        rl = tl.load(rl_ptr + t).to(tl.float32)
        u = tl.load(u_ptr + pid_b * s_ub + rd * s_ud + t * s_ut, mask=d_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * s_db + rd * s_dd + t * s_dt, mask=d_ok, other=0).to(tl.float32)
        if DT_INT:
            dt = (dt - tl.load(dtz_ptr + t)) * tl.load(dts_ptr + t)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        bv = tl.load(b_ptr + pid_b * s_bb + rn * s_bn + t * s_bt, mask=n_ok, other=0).to(tl.float32)
        if B_INT:
            bv = (bv - tl.load(bz_ptr + t)) * tl.load(bs_ptr + t)
        cv = tl.load(c_ptr + pid_b * s_cb + rn * s_cn + t * s_ct, mask=n_ok, other=0).to(tl.float32)
        if C_INT:
            cv = (cv - tl.load(cz_ptr + t)) * tl.load(cs_ptr + t)
        carry = tl.exp(dt[:, None] * a) * (rl_prev / rl)  # rl / rl == 1 exactly at t = 0
        drive = (dt * u)[:, None] * bv[None, :] * (inv_rcn / rl)
        h = carry * h + drive
        if QUANT:
            if FINE_SCALES:
                s = tl.load(ss_ptr + rd[:, None] * s_sd + t * s_st + rn[None, :] * s_sn,
                            mask=d_ok[:, None] & n_ok[None, :], other=1.0).to(tl.float32)
            else:
                s = tl.load(ss_ptr + t * s_st).to(tl.float32)
            x = tl.math.div_rn(h, tl.zeros_like(h) + s)
            x = tl.minimum(tl.maximum(x, -qmax), qmax)
            h = round_half_even(x) * s
        y = tl.sum(h * (cv[None, :] * rcn), axis=1) * rl
        if HAS_D:
            y = y + dd * u
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * s_zb + rd * s_zd + t * s_zt, mask=d_ok, other=0.0).to(tl.float32)
            y = y * (zz / (1.0 + tl.exp(-zz)))
        tl.store(out_ptr + pid_b * s_ob + rd * s_od + t * s_ot, y, mask=d_ok)
        rl_prev = rl


def _seq(name: str, x: Tensor, shape: tuple, scale: Optional[Tensor], zp: Optional[Tensor], length: int):
    if x.dim() != 3 or tuple(x.shape) != shape:
        raise ValueError(f"qscan: {name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype == torch.int8:
        for what, p in (("scale", scale), ("zero_point", zp)):
            if p is None or p.dtype != torch.float32 or p.shape != (length,):
                raise ValueError(f"qscan: int8 {name} needs a float32 ({length},) {what}")
        return True, scale.contiguous(), zp.contiguous()
    if not x.is_floating_point():
        raise ValueError(f"qscan: {name} must be int8 codes or floats, got {x.dtype}")
    return False, x, x  # placeholders, never read


def _state_scales(state_scale: Tensor, dim: int, length: int, n: int) -> tuple[Tensor, tuple[int, int, int]]:
    """The state scales as float32 and their (d_inner, step, d_state) strides, 0 where they broadcast."""
    ss = state_scale.float().contiguous()
    if ss.dim() == 1 and ss.numel() == length:
        return ss, (0, 1, 0)
    if ss.dim() == 3 and ss.shape[1] == length and ss.shape[0] in (1, dim) and ss.shape[2] in (1, n):
        return ss, tuple(0 if ss.shape[i] == 1 else ss.stride(i) for i in range(3))
    raise ValueError(f"qscan: state_scale must be ({length},) or ({dim} or 1, {length}, {n} or 1), "
                     f"got {tuple(state_scale.shape)}")


def qscan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
          delta_bias: Optional[Tensor], delta_softplus: bool, r_c: Tensor, r_l: Tensor, r_n: Tensor,
          state_scale: Tensor, state_bits: int, delta_scale: Optional[Tensor] = None,
          delta_zp: Optional[Tensor] = None, B_scale: Optional[Tensor] = None, B_zp: Optional[Tensor] = None,
          C_scale: Optional[Tensor] = None, C_zp: Optional[Tensor] = None) -> Tensor:
    """Quantized selective scan, float32 ``(batch, d_inner, L)`` output (module docstring).

    u, delta, z: ``(batch, d_inner, L)``; B, C: ``(batch, d_state, L)`` (any strides); A
    ``(d_inner, d_state)``; D, delta_bias, r_c ``(d_inner,)``; r_l ``(L,)``; state_scale ``(L,)``
    or ``(d_inner | 1, L, d_state | 1)``; r_n ``(d_state,)``. ``state_bits >= 16``: no state quantization. For int8 delta / B / C pass their
    float32 ``(L,)`` scale and zero point.

    Example::

        y = qscan(u, delta, A, B, C, D, z, bias, True, r_c, r_l, r_n, state_scale, 8)
    """
    if u.dim() != 3:
        raise ValueError(f"qscan: u must be (batch, d_inner, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"qscan: A must be ({dim}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    dt_int, dts, dtz = _seq("delta", delta, (batch, dim, length), delta_scale, delta_zp, length)
    b_int, bs, bz = _seq("B", B, (batch, n, length), B_scale, B_zp, length)
    c_int, cs, cz = _seq("C", C, (batch, n, length), C_scale, C_zp, length)
    if z is not None and tuple(z.shape) != (batch, dim, length):
        raise ValueError(f"qscan: z must have u's shape, got {tuple(z.shape)}")
    for name, v, k in (("r_c", r_c, dim), ("r_l", r_l, length), ("r_n", r_n, n), ("D", D, dim),
                       ("delta_bias", delta_bias, dim)):
        if v is not None and v.numel() != k:
            raise ValueError(f"qscan: {name} must have {k} elements, got {tuple(v.shape)}")
    ss, ss_strides = _state_scales(state_scale, dim, length, n)
    out = torch.empty(batch, dim, length, device=u.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    vec = lambda v: v.float().contiguous()  # noqa: E731
    A_, rc, rl, rn = vec(A), vec(r_c), vec(r_l), vec(r_n)
    D_ = vec(D) if D is not None else rc
    bias = vec(delta_bias) if delta_bias is not None else rc
    zt = z if z is not None else u
    qmax = 0.0 if is_float(state_bits) else float(numerics.qmax(state_bits))

    def grid(meta):
        return (batch, triton.cdiv(dim, meta["BLOCK_D"]))

    launch(
        _qscan_kernel, grid,
        u, delta, B, C, zt, A_, D_, bias, out,
        dts, dtz, bs, bz, cs, cz, rc, rl, rn, ss,
        dim, length, n,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zt.stride(), *out.stride(), *ss_strides,
        qmax,
        DT_INT=dt_int, B_INT=b_int, C_INT=c_int, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), QUANT=not is_float(state_bits),
        FINE_SCALES=state_scale.dim() > 1, BLOCK_N=max(triton.next_power_of_2(n), 2),
    )
    return out


def qscan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, r_c: Tensor, r_l: Tensor, r_n: Tensor,
              state_scale: Tensor, state_bits: int, delta_scale: Optional[Tensor] = None,
              delta_zp: Optional[Tensor] = None, B_scale: Optional[Tensor] = None, B_zp: Optional[Tensor] = None,
              C_scale: Optional[Tensor] = None, C_zp: Optional[Tensor] = None) -> Tensor:
    """Plain-torch twin of :func:`qscan` (same arguments, float32 output)."""
    def val(x, s, zp):
        return (x.float() - zp) * s if x.dtype == torch.int8 else x.float()

    u = u.float()
    delta = val(delta, delta_scale, delta_zp)
    B, C = val(B, B_scale, B_zp), val(C, C_scale, C_zp)
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    A, r_c, r_l, r_n, state_scale = A.float(), r_c.float(), r_l.float(), r_n.float(), state_scale.float()
    rcn = r_c[:, None] * r_n[None, :]
    inv_rcn = 1.0 / rcn
    qmax = numerics.qmax(state_bits)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        carry = torch.exp(delta[:, :, t, None] * A) * (r_l[max(t - 1, 0)] / r_l[t])
        h = carry * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t] * (inv_rcn / r_l[t])
        if not is_float(state_bits):
            s = state_scale[t] if state_scale.dim() == 1 else state_scale[:, t]  # scalar or (d | 1, n | 1)
            h = torch.round(h / s).clamp(-qmax, qmax) * s
        ys.append((h * (C[:, None, :, t] * rcn)).sum(-1) * r_l[t])
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y
