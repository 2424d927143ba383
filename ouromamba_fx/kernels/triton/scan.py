"""Triton selective scan, forward and backward (the float ``ouromamba::selective_scan`` and its ``_bwd``).

Semantics of :func:`ouromamba_fx.kernels.scan_ref.selective_scan_ref` (mamba-ssm's
``selective_scan_fn``)::

    dt  = softplus(delta + delta_bias)  (or delta + delta_bias)        softplus threshold 20
    h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t + D u_t,   out = y * silu(z)

u, delta, z ``(batch, dim, L)``; A ``(dim, N)``; B, C ``(batch, N, L)`` or grouped
``(batch, G, N, L)`` (the ``dim`` channels in ``G`` equal consecutive blocks); D, delta_bias
``(dim,)``; any strides. Inputs may be float16, bfloat16, float32 or float64; the kernels compute
in float32 (float64 for float64 ``u``, as the reference) and write ``u``'s dtype.

Design (the one of mamba-ssm's CUDA kernels, written for Triton): a program owns ``BLOCK_D``
channels of one batch element, all inside one group (so it reads one B/C row per state). It walks
the sequence in chunks of ``BLOCK_L`` steps, loading each chunk's u / delta / B / C tiles once; for
each state ``n`` the chunk's recurrence is an associative scan over time of the pairs
``(exp(dt A_n), dt u B_n)`` (combine ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``), seeded with the
state carried from the previous chunk. The carried states of all ``N`` states live in registers,
a ``(BLOCK_D, BLOCK_N)`` tile; steps past ``L`` are ``(1, 0)`` so the chunk's last column is the last
state. No ``(batch, dim, L, N)`` tensor is ever built.

Backward, per program: a forward sweep stores the state at the start of every chunk
(``(batch, dim, chunks, N)`` scratch; with ``z`` it also recomputes ``y`` and writes ``dz`` and
``dy = dout * silu(z)``), then a reverse sweep over the chunks recomputes each chunk's states from
its start state and runs the adjoint ``g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}`` as a reverse
associative scan, seeded with ``g`` at the next chunk's first step. From ``g`` and the states:
``dB_t = sum_d g dt u``, ``dC_t = sum_d dy h``, ``ddt = sum_n g (A e^{dt A} h_{t-1} + u B)``,
``du = dt sum_n g B + D dy``, ``dA = sum_{b,t} g dt e^{dt A} h_{t-1}`` (``e^{dt A} h_{t-1} = h_t - dt u B``).
dB and dC are summed over the channel blocks with atomic adds (as mamba-ssm does), so their float
summation order varies from run to run; dA, dD and delta_bias are summed over the batch from
per-batch partial sums on the host (deterministic).

Host wrappers: :func:`selective_scan_fwd` and :func:`selective_scan_bwd`; plain-torch twins
:func:`selective_scan_fwd_ref` and :func:`selective_scan_bwd_ref` (same arguments, same steps:
chunks, a scan per state).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ouromamba_fx.kernels.triton.common import autotune_configs, fit_tiles, launch

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "selective_scan_fwd_ref", "selective_scan_bwd_ref",
           "FWD_CONFIGS", "BWD_CONFIGS"]

# (BLOCK_D, BLOCK_L, num_warps, num_stages). The first entry is the one the interpreter runs: small
# chunks, so that short test sequences cross several chunk boundaries. The others keep at most 8
# (forward) or 4 (backward) tile elements per thread and at most 8 warps: with more elements, or
# 16 warps (128 registers per thread), ptxas spills hundreds of bytes (``ptxas -v``, sm_80, unit
# time strides, 16-byte aligned operands); as listed, the forward spills nothing, the backward at
# most 20 bytes.
FWD_CONFIGS = [
    triton.Config({"BLOCK_D": 4, "BLOCK_L": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_D": 8, "BLOCK_L": 64}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_D": 8, "BLOCK_L": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 16, "BLOCK_L": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 8, "BLOCK_L": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 16, "BLOCK_L": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_D": 32, "BLOCK_L": 64}, num_warps=8, num_stages=2),
]
BWD_CONFIGS = [
    triton.Config({"BLOCK_D": 4, "BLOCK_L": 16}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_D": 8, "BLOCK_L": 32}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_D": 8, "BLOCK_L": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 16, "BLOCK_L": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_D": 16, "BLOCK_L": 64}, num_warps=8, num_stages=2),
]

# tiles no larger than the problem (a group's channels, the sequence)
_FIT = fit_tiles({"BLOCK_D": "DIM_PER_GROUP", "BLOCK_L": "L"}, floor=4)


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # F.softplus with threshold 20: max(x, 0) + log1p(exp(-|x|)); log1p(e) = log(v) * e / (v - 1)
    # with v = 1 + e (exact to a few ulps in float32 and float64; v - 1 is exact).
    e = tl.exp(-tl.abs(x))
    v = 1.0 + e
    exact = v == 1.0  # e below half an ulp of 1: log1p(e) = e
    log1p = tl.where(exact, e, tl.log(v) * (e / tl.where(exact, 1.0, v - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _column(tile, cols, j):
    """Column ``j`` of a register tile (as a vector over its rows)."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _chunk_dt(delta_ptr, bias, rd, rl, ok, s_dd, s_dl, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr):
    """(pre-activation x = delta + bias, dt) of a chunk tile; 0 / softplus(0) where not ok."""
    x = tl.load(delta_ptr + rd[:, None] * s_dd + rl[None, :] * s_dl, mask=ok, other=0.0).to(ACC)
    if HAS_BIAS:
        x = x + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(x)
    else:
        dt = x
    return x, dt


@triton.autotune(configs=autotune_configs(FWD_CONFIGS), key=["DIM", "L", "N", "DIM_PER_GROUP"],
                 prune_configs_by={"early_config_prune": _FIT})
@triton.jit
def _selective_scan_fwd_kernel(
    # pointers
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr,
    # sizes
    DIM, L, N, DIM_PER_GROUP,
    # strides
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    blocks_per_group = tl.cdiv(DIM_PER_GROUP, BLOCK_D)
    grp = tl.program_id(1) // blocks_per_group
    d_first = grp * DIM_PER_GROUP
    rd = d_first + (tl.program_id(1) % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < d_first + DIM_PER_GROUP
    rn = tl.arange(0, BLOCK_N)
    u_ptr += pid_b * s_ub
    delta_ptr += pid_b * s_db
    b_ptr += pid_b * s_bb + grp * s_bg
    c_ptr += pid_b * s_cb + grp * s_cg
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(ACC)
    h_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # state at the end of the previous chunk
    for l0 in range(0, L, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        l_ok = rl < L
        ok = d_ok[:, None] & l_ok[None, :]
        u = tl.load(u_ptr + rd[:, None] * s_ud + rl[None, :] * s_ul, mask=ok, other=0.0).to(ACC)
        _, dt = _chunk_dt(delta_ptr, bias, rd, rl, ok, s_dd, s_dl, ACC, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
        for n in range(0, N):
            a_n = tl.load(a_ptr + rd * s_ad + n * s_an, mask=d_ok, other=0.0).to(ACC)
            b_n = tl.load(b_ptr + n * s_bn + rl * s_bl, mask=l_ok, other=0.0).to(ACC)
            c_n = tl.load(c_ptr + n * s_cn + rl * s_cl, mask=l_ok, other=0.0).to(ACC)
            decay = tl.where(l_ok[None, :], tl.exp(dt * a_n[:, None]), 1.0)
            drive = dtu * b_n[None, :]
            h_start = _column(h_carry, rn, n)
            drive = tl.where(rl[None, :] == l0, decay * h_start[:, None] + drive, drive)
            _, h = tl.associative_scan((decay, drive), axis=1, combine_fn=_scan_combine)
            y += h * c_n[None, :]
            h_end = _column(h, rl, l0 + BLOCK_L - 1)
            h_carry = tl.where(rn[None, :] == n, h_end[:, None], h_carry)
        if HAS_D:
            y += tl.load(d_ptr + rd, mask=d_ok, other=0.0).to(ACC)[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * s_zb + rd[:, None] * s_zd + rl[None, :] * s_zl, mask=ok, other=0.0).to(ACC)
            y = y * (zz * _sigmoid(zz))
        tl.store(out_ptr + pid_b * s_ob + rd[:, None] * s_od + rl[None, :] * s_ol,
                 y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=autotune_configs(BWD_CONFIGS), key=["DIM", "L", "N", "DIM_PER_GROUP"],
                 reset_to_zero=["db_ptr", "dc_ptr"], prune_configs_by={"early_config_prune": _FIT})
@triton.jit
def _selective_scan_bwd_kernel(
    # pointers: inputs
    dout_ptr, u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,
    # pointers: gradients (du, ddelta, dz in the inputs' dtypes; db, dc (batch, G, N, L) summed
    # atomically; da (batch, dim, N), dd and dbias (batch, dim): per-batch partial sums)
    du_ptr, ddelta_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
    # pointers: scratch (chunk start states (batch, dim, CHUNK_CAP, N); dy (batch, dim, L) with z)
    state_ptr, dy_ptr,
    # sizes
    DIM, L, N, DIM_PER_GROUP, G, CHUNK_CAP,
    # strides (du, ddelta, dz, dy and the partial sums are contiguous)
    s_gb, s_gd, s_gl, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an, s_bb, s_bg, s_bn, s_bl,
    s_cb, s_cg, s_cn, s_cl, s_zb, s_zd, s_zl,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    blocks_per_group = tl.cdiv(DIM_PER_GROUP, BLOCK_D)
    grp = tl.program_id(1) // blocks_per_group
    d_first = grp * DIM_PER_GROUP
    rd = d_first + (tl.program_id(1) % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < d_first + DIM_PER_GROUP
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    dout_ptr += pid_b * s_gb
    u_ptr += pid_b * s_ub
    delta_ptr += pid_b * s_db
    b_ptr += pid_b * s_bb + grp * s_bg
    c_ptr += pid_b * s_cb + grp * s_cg
    rows = pid_b * DIM + rd  # row of the contiguous (batch, dim, ...) outputs and scratch
    state_rows = state_ptr + rows * (CHUNK_CAP * N)  # (BLOCK_D,) pointers
    db_ptr += (pid_b * G + grp) * N * L
    dc_ptr += (pid_b * G + grp) * N * L
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=d_ok, other=0.0).to(ACC)
    dd = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        dd = tl.load(d_ptr + rd, mask=d_ok, other=0.0).to(ACC)
    n_chunks = tl.cdiv(L, BLOCK_L)

    # Forward sweep: the state at the start of every chunk (and, with z, dz and dy).
    h_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    n_sweep = n_chunks if HAS_Z else n_chunks - 1  # without z the last chunk's states are not needed
    for c in range(0, n_chunks):
        tl.store(state_rows[:, None] + c * N + rn[None, :], h_carry, mask=dn_ok)
        if c < n_sweep:
            l0 = c * BLOCK_L
            rl = l0 + tl.arange(0, BLOCK_L)
            l_ok = rl < L
            ok = d_ok[:, None] & l_ok[None, :]
            u = tl.load(u_ptr + rd[:, None] * s_ud + rl[None, :] * s_ul, mask=ok, other=0.0).to(ACC)
            _, dt = _chunk_dt(delta_ptr, bias, rd, rl, ok, s_dd, s_dl, ACC, HAS_BIAS, SOFTPLUS)
            dtu = dt * u
            y = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
            for n in range(0, N):
                a_n = tl.load(a_ptr + rd * s_ad + n * s_an, mask=d_ok, other=0.0).to(ACC)
                b_n = tl.load(b_ptr + n * s_bn + rl * s_bl, mask=l_ok, other=0.0).to(ACC)
                decay = tl.where(l_ok[None, :], tl.exp(dt * a_n[:, None]), 1.0)
                drive = dtu * b_n[None, :]
                h_start = _column(h_carry, rn, n)
                drive = tl.where(rl[None, :] == l0, decay * h_start[:, None] + drive, drive)
                _, h = tl.associative_scan((decay, drive), axis=1, combine_fn=_scan_combine)
                if HAS_Z:
                    c_n = tl.load(c_ptr + n * s_cn + rl * s_cl, mask=l_ok, other=0.0).to(ACC)
                    y += h * c_n[None, :]
                h_carry = tl.where(rn[None, :] == n, _column(h, rl, l0 + BLOCK_L - 1)[:, None], h_carry)
            if HAS_Z:
                y += dd[:, None] * u
                zz = tl.load(z_ptr + pid_b * s_zb + rd[:, None] * s_zd + rl[None, :] * s_zl,
                             mask=ok, other=0.0).to(ACC)
                g_out = tl.load(dout_ptr + rd[:, None] * s_gd + rl[None, :] * s_gl, mask=ok, other=0.0).to(ACC)
                sz = _sigmoid(zz)
                dz = g_out * y * sz * (1.0 + zz * (1.0 - sz))
                offs = rows[:, None] * L + rl[None, :]
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=ok)
                tl.store(dy_ptr + offs, g_out * zz * sz, mask=ok)
    # the scratch written above is read back by other threads of this program
    tl.debug_barrier()

    # Reverse sweep.
    g_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # adjoint at the next chunk's first step
    da = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dd_sum = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_sum = tl.zeros((BLOCK_D,), dtype=ACC)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        l0 = c * BLOCK_L
        rl = l0 + tl.arange(0, BLOCK_L)
        l_ok = rl < L
        ok = d_ok[:, None] & l_ok[None, :]
        next_ok = d_ok[:, None] & (rl + 1 < L)[None, :]
        u = tl.load(u_ptr + rd[:, None] * s_ud + rl[None, :] * s_ul, mask=ok, other=0.0).to(ACC)
        x, dt = _chunk_dt(delta_ptr, bias, rd, rl, ok, s_dd, s_dl, ACC, HAS_BIAS, SOFTPLUS)
        _, dt_next = _chunk_dt(delta_ptr, bias, rd, rl + 1, next_ok, s_dd, s_dl, ACC, HAS_BIAS, SOFTPLUS)
        if HAS_Z:
            dy = tl.load(dy_ptr + rows[:, None] * L + rl[None, :], mask=ok, other=0.0)
        else:
            dy = tl.load(dout_ptr + rd[:, None] * s_gd + rl[None, :] * s_gl, mask=ok, other=0.0).to(ACC)
        dtu = dt * u
        du = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
        ddt = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
        for n in range(0, N):
            a_n = tl.load(a_ptr + rd * s_ad + n * s_an, mask=d_ok, other=0.0).to(ACC)
            b_n = tl.load(b_ptr + n * s_bn + rl * s_bl, mask=l_ok, other=0.0).to(ACC)
            c_n = tl.load(c_ptr + n * s_cn + rl * s_cl, mask=l_ok, other=0.0).to(ACC)
            # states of the chunk, from its start state
            decay = tl.where(l_ok[None, :], tl.exp(dt * a_n[:, None]), 1.0)
            x_n = dtu * b_n[None, :]
            h_start = tl.load(state_rows + c * N + n, mask=d_ok, other=0.0)
            drive = tl.where(rl[None, :] == l0, decay * h_start[:, None] + x_n, x_n)
            _, h = tl.associative_scan((decay, drive), axis=1, combine_fn=_scan_combine)
            # adjoint, backwards in time: g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}
            decay_next = tl.where(next_ok, tl.exp(dt_next * a_n[:, None]), 0.0)
            g_start = _column(g_carry, rn, n)
            src = dy * c_n[None, :]
            src = tl.where(rl[None, :] == l0 + BLOCK_L - 1, src + decay_next * g_start[:, None], src)
            _, g = tl.associative_scan((decay_next, src), axis=1, combine_fn=_scan_combine, reverse=True)
            g_carry = tl.where(rn[None, :] == n, _column(g, rl, l0)[:, None], g_carry)
            prev = h - x_n  # exp(dt A) h_{t-1}
            gb = g * b_n[None, :]
            du += gb * dt
            ddt += gb * u + g * a_n[:, None] * prev
            da = tl.where(rn[None, :] == n, da + tl.sum(g * dt * prev, axis=1)[:, None], da)
            tl.atomic_add(db_ptr + n * L + rl, tl.sum(g * dtu, axis=0), mask=l_ok)
            tl.atomic_add(dc_ptr + n * L + rl, tl.sum(dy * h, axis=0), mask=l_ok)
        if HAS_D:
            du += dd[:, None] * dy
            dd_sum += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.where(x > 20.0, 1.0, _sigmoid(x))
        if HAS_BIAS:
            dbias_sum += tl.sum(tl.where(ok, ddt, 0.0), axis=1)
        offs = rows[:, None] * L + rl[None, :]
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=ok)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=ok)
    tl.store(da_ptr + rows[:, None] * N + rn[None, :], da, mask=dn_ok)
    if HAS_D:
        tl.store(dd_ptr + rows, dd_sum, mask=d_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + rows, dbias_sum, mask=d_ok)


# ---------------------------------------------------------------------------------------------
# Host wrappers

def _acc_dtype(u: Tensor):
    return (tl.float64, torch.float64) if u.dtype == torch.float64 else (tl.float32, torch.float32)


def _bc_view(name: str, M: Tensor, batch: int, dim: int, n: int, length: int) -> tuple[Tensor, int]:
    """B or C as (batch, G, N, L) (a view) and G; errors name the shape expected."""
    if M.dim() == 3 and tuple(M.shape) == (batch, n, length):
        return M.unsqueeze(1), 1
    if M.dim() == 4 and M.shape[0] == batch and tuple(M.shape[2:]) == (n, length) and M.shape[1] >= 1 \
            and dim % M.shape[1] == 0:
        return M, M.shape[1]
    if M.dim() == 2:
        raise ValueError(f"ouromamba_fx.kernels.triton.scan: constant {name} ({tuple(M.shape)}, no batch and time "
                         "axes) is not supported by the Triton scan; use the reference scan "
                         "(ouromamba_fx.kernels.scan_ref) or pass it expanded to (batch, N, L)")
    raise ValueError(f"ouromamba_fx.kernels.triton.scan: {name} has shape {tuple(M.shape)}; expected "
                     f"({batch}, {n}, {length}) or ({batch}, G, {n}, {length}) with G dividing {dim}")


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
           delta_bias: Optional[Tensor]):
    where = "ouromamba_fx.kernels.triton.scan"
    if u.dim() != 3:
        raise ValueError(f"{where}: u must be (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"{where}: A must be real ({dim}, N), got {A.dtype} {tuple(A.shape)}")
    n = A.shape[1]
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"{where}: delta has shape {tuple(delta.shape)}, expected {tuple(u.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"{where}: z has shape {tuple(z.shape)}, expected {tuple(u.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise ValueError(f"{where}: {name} must have shape ({dim},), got {tuple(v.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise ValueError(f"{where}: inputs must be floating point, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{where}: all inputs must be on {u.device}, got one on {t.device}")
    b4, groups = _bc_view("B", B, batch, dim, n, length)
    c4, groups_c = _bc_view("C", C, batch, dim, n, length)
    if groups_c != groups:
        raise ValueError(f"{where}: B has {groups} groups but C has {groups_c}")
    return batch, dim, length, n, groups, b4, c4


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False, channels_last: bool = False) -> Tensor:
    """Selective scan forward: ``(batch, dim, L)`` in ``u``'s dtype (module docstring).

    Contiguous output, or channel-contiguous (strides ``(L * dim, 1, dim)``, the layout of
    ``ouromamba::selective_scan_cl``) when ``channels_last``.
    """
    batch, dim, length, n, groups, b4, c4 = _check(u, delta, A, B, C, D, z, delta_bias)
    if channels_last:
        out = torch.empty_strided((batch, dim, length), (length * dim, 1, dim), dtype=u.dtype, device=u.device)
    else:
        out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    if out.numel() == 0:
        return out
    acc, _ = _acc_dtype(u)
    zt = z if z is not None else u
    dpg = dim // groups

    def grid(meta):
        return (batch, groups * triton.cdiv(dpg, meta["BLOCK_D"]))

    launch(
        _selective_scan_fwd_kernel, grid,
        u, delta, A, b4, c4, D if D is not None else A, zt, delta_bias if delta_bias is not None else A, out,
        dim, length, n, dpg,
        *u.stride(), *delta.stride(), *A.stride(), *b4.stride(), *c4.stride(), *zt.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), ACC=acc, BLOCK_N=max(triton.next_power_of_2(n), 2),
    )
    return out


def selective_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`selective_scan_fwd`'s output w.r.t. (u, delta, A, B, C, D, z, delta_bias)
    given ``dout``: an 8-tuple, ``None`` where the optional input was ``None``, each gradient
    contiguous in its input's shape and dtype (the convention of
    :func:`ouromamba_fx.kernels.scan_ref.selective_scan_ref_backward`)."""
    batch, dim, length, n, groups, b4, c4 = _check(u, delta, A, B, C, D, z, delta_bias)
    if tuple(dout.shape) != tuple(u.shape) or dout.device != u.device:
        raise ValueError(f"ouromamba_fx.kernels.triton.scan: dout must have u's shape {tuple(u.shape)} on "
                         f"{u.device}, got {tuple(dout.shape)} on {dout.device}")
    acc, acc_t = _acc_dtype(u)
    dev = u.device
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=dev) if z is not None else None
    db = torch.zeros((batch, groups, n, length), dtype=acc_t, device=dev)
    dc = torch.zeros((batch, groups, n, length), dtype=acc_t, device=dev)
    da = torch.zeros((batch, dim, n), dtype=acc_t, device=dev)
    dd = torch.zeros((batch, dim), dtype=acc_t, device=dev)
    dbias = torch.zeros((batch, dim), dtype=acc_t, device=dev)
    if du.numel():
        # The chunk-state scratch is sized for the smallest chunk among the configs in use.
        chunk_cap = triton.cdiv(length, min(c.kwargs["BLOCK_L"] for c in _selective_scan_bwd_kernel.configs))
        states = torch.empty((batch, dim, chunk_cap, n), dtype=acc_t, device=dev)
        dy = torch.empty((batch, dim, length), dtype=acc_t, device=dev) if z is not None else states
        zt = z if z is not None else u
        dpg = dim // groups

        def grid(meta):
            return (batch, groups * triton.cdiv(dpg, meta["BLOCK_D"]))

        launch(
            _selective_scan_bwd_kernel, grid,
            dout, u, delta, A, b4, c4, D if D is not None else A, zt,
            delta_bias if delta_bias is not None else A,
            du, ddelta, dz if dz is not None else du, db, dc, da, dd, dbias,
            states, dy,
            dim, length, n, dpg, groups, chunk_cap,
            *dout.stride(), *u.stride(), *delta.stride(), *A.stride(), *b4.stride(), *c4.stride(), *zt.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), ACC=acc, BLOCK_N=max(triton.next_power_of_2(n), 2),
        )
    elif dz is not None:
        dz.zero_()
    return (du, ddelta, da.sum(0).to(A.dtype), db.to(B.dtype).reshape(B.shape),
            dc.to(C.dtype).reshape(C.shape), None if D is None else dd.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype))


# ---------------------------------------------------------------------------------------------
# Plain-torch twins: the kernels' steps (chunks of ``block_l``, a scan per state), in torch.

def _ref_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length, n, groups, b4, c4 = _check(u, delta, A, B, C, D, z, delta_bias)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    x = delta.to(cdt) + (delta_bias.to(cdt)[:, None] if delta_bias is not None else 0.0)
    dt = F.softplus(x) if delta_softplus else x
    rep = dim // groups
    b_full = b4.to(cdt).repeat_interleave(rep, dim=1)  # (batch, dim, N, L)
    c_full = c4.to(cdt).repeat_interleave(rep, dim=1)
    return cdt, u.to(cdt), x, dt, A.to(cdt), b_full, c_full


def _chunk_states(h_start: Tensor, decay: Tensor, drive: Tensor) -> Tensor:
    """States of one chunk, (batch, dim, N, l), from the chunk's start state (batch, dim, N)."""
    hs, h = [], h_start
    for t in range(decay.shape[-1]):
        h = decay[..., t] * h + drive[..., t]
        hs.append(h)
    return torch.stack(hs, dim=-1)


def selective_scan_fwd_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                           z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False, channels_last: bool = False, block_l: int = 16) -> Tensor:
    """Plain-torch twin of :func:`selective_scan_fwd` (chunks of ``block_l`` steps, the state carried)."""
    cdt, uc, _, dt, Ac, b_full, c_full = _ref_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    h = uc.new_zeros(batch, dim, A.shape[1])
    ys = []
    for l0 in range(0, length, block_l):
        sl = slice(l0, l0 + block_l)
        decay = torch.exp(dt[:, :, None, sl] * Ac[None, :, :, None])  # (batch, dim, N, l)
        hs = _chunk_states(h, decay, (dt * uc)[:, :, None, sl] * b_full[..., sl])
        ys.append((hs * c_full[..., sl]).sum(2))
        h = hs[..., -1]
    y = torch.cat(ys, dim=-1) if ys else uc.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else out.contiguous()


def selective_scan_bwd_ref(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                           block_l: int = 16) -> tuple[Optional[Tensor], ...]:
    """Plain-torch twin of :func:`selective_scan_bwd`: chunk start states by a forward sweep, then a
    reverse sweep over the chunks recomputing their states and running the adjoint."""
    cdt, uc, x, dt, Ac, b_full, c_full = _ref_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    n = A.shape[1]
    dtu = dt * uc
    decay = torch.exp(dt[:, :, None, :] * Ac[None, :, :, None])  # (batch, dim, N, L)
    drive = dtu[:, :, None, :] * b_full
    starts, h = [], uc.new_zeros(batch, dim, n)
    chunks = list(range(0, length, block_l))
    for l0 in chunks:
        starts.append(h)
        h = _chunk_states(h, decay[..., l0:l0 + block_l], drive[..., l0:l0 + block_l])[..., -1]
    g_out = dout.to(cdt)
    dz = None
    if z is not None:
        hs_all = torch.cat([_chunk_states(s, decay[..., l0:l0 + block_l], drive[..., l0:l0 + block_l])
                            for s, l0 in zip(starts, chunks)], dim=-1)
        y = (hs_all * c_full).sum(2) + (D.to(cdt)[:, None] * uc if D is not None else 0.0)
        zc = z.to(cdt)
        sz = torch.sigmoid(zc)
        dz = g_out * y * sz * (1 + zc * (1 - sz))
        dy = g_out * zc * sz
    else:
        dy = g_out
    du, ddt = torch.zeros_like(uc), torch.zeros_like(uc)
    dA = torch.zeros(batch, dim, n, dtype=cdt, device=u.device)
    dB_full, dC_full = torch.zeros_like(b_full), torch.zeros_like(c_full)
    decay_next = torch.cat([decay[..., 1:], torch.zeros_like(decay[..., :1])], dim=-1)
    g_next = uc.new_zeros(batch, dim, n)
    for start, l0 in reversed(list(zip(starts, chunks))):
        sl = slice(l0, l0 + block_l)
        hs = _chunk_states(start, decay[..., sl], drive[..., sl])
        src = dy[:, :, None, sl] * c_full[..., sl]
        gs, g = [], g_next
        for t in range(src.shape[-1] - 1, -1, -1):
            g = src[..., t] + decay_next[..., sl][..., t] * g
            gs.append(g)
        gs = torch.stack(gs[::-1], dim=-1)
        g_next = gs[..., 0]
        prev = hs - drive[..., sl]
        gb = gs * b_full[..., sl]
        du[..., sl] = (gb * dt[:, :, None, sl]).sum(2)
        ddt[..., sl] = (gb * uc[:, :, None, sl] + gs * Ac[None, :, :, None] * prev).sum(2)
        dA += (gs * dt[:, :, None, sl] * prev).sum(-1)
        dB_full[..., sl] = gs * dtu[:, :, None, sl]
        dC_full[..., sl] = dy[:, :, None, sl] * hs
    if D is not None:
        du = du + D.to(cdt)[:, None] * dy
    ddelta = ddt * torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x)) if delta_softplus else ddt
    groups = 1 if B.dim() == 3 else B.shape[1]

    def bc(g: Tensor, like: Tensor) -> Tensor:
        return g.reshape(batch, groups, dim // groups, n, length).sum(2).to(like.dtype).reshape(like.shape)

    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), bc(dB_full, B), bc(dC_full, C),
            None if D is None else (dy * uc).sum((0, 2)).to(D.dtype), None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype))
