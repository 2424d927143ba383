"""The reparameterized, state-quantized selective scan: ``ouromamba::selective_scan_q``.

With rank-1 factors ``r_C (d_inner,)``, ``r_L (L,)``, ``r_N (d_state,)`` the scan runs on the
rescaled state ``h'_t = h_t / (r_C x r_L[t] x r_N)``:

    h'_t = exp(delta_t A) * (r_L[t-1] / r_L[t]) * h'_{t-1} + delta_t B_t u_t / (r_C r_L[t] r_N)
    h'_t = fq(h'_t, state_scale[t])          (one scale per time-step, when state_bits < 16)
    y_t  = r_C r_L[t] * sum_n C_t[n] r_N[n] h'_t[n] + D u_t,   out = y * silu(z)

so without state quantization it equals the plain scan exactly (up to float rounding). The
quantized state feeds both the output and the next step, so state quantization is real: it
changes the forward output. ``r_N`` can be folded into ``x_proj`` (B rows / r_N, C rows * r_N);
then the op gets ``r_N = 1``.

:func:`scan_state_stats` gives the statistics the factors are computed from (mean and max of
``|h|`` over the batch, per channel, step and state), without keeping every state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx.kernels.scan_ref import selective_scan_ref  # noqa: F401  (same semantics)


def _prep(u, delta, A, B, C, delta_bias, delta_softplus):
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.float(), B.float(), C.float()


@torch.no_grad()
def scan_state_stats(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     delta_bias: Tensor | None = None, delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """(sum over batch of |h|, max over batch of |h|), each (d_inner, L, d_state), for B, C of
    shape (batch, d_state, L)."""
    u, delta, A, B, C = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]
    h = u.new_zeros(b, d, n)
    h_sum = u.new_zeros(d, length, n)
    h_max = u.new_zeros(d, length, n)
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        a = h.abs()
        h_sum[:, t] = a.sum(0)
        h_max[:, t] = a.amax(0)
    return h_sum, h_max


def selective_scan_q_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                         r_c: Tensor, r_l: Tensor, r_n: Tensor, state_scale: Tensor,
                         state_bits: int) -> Tensor:
    """Reference of ``ouromamba::selective_scan_q`` (module docstring); B, C: (batch, d_state, L)."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]
    r_c, r_l, r_n = r_c.float(), r_l.float(), r_n.float()
    if r_l.numel() != length:
        from ouromamba_fx.lowering.outlier import resample_steps

        r_l, state_scale = resample_steps(r_l, length), resample_steps(state_scale.float(), length)
    qmax = 2 ** (state_bits - 1) - 1
    inv_rcn = 1.0 / (r_c[:, None] * r_n[None, :])  # (d, n)
    out_rcn = r_c[:, None] * r_n[None, :]
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(length):
        carry = torch.exp(delta[:, :, t, None] * A)
        if t > 0:
            carry = carry * (r_l[t - 1] / r_l[t])
        drive = (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t] * (inv_rcn / r_l[t])
        h = carry * h + drive
        if state_bits < 16:
            s = state_scale[t]
            h = torch.round(h / s).clamp_(-qmax, qmax) * s
        ys.append((h * (C[:, None, :, t] * out_rcn)).sum(-1) * r_l[t])
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


@torch.library.custom_op("ouromamba::selective_scan_q", mutates_args=())
def selective_scan_q(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, r_c: Tensor,
                     r_l: Tensor, r_n: Tensor, state_scale: Tensor, state_bits: int) -> Tensor:
    return selective_scan_q_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n,
                                state_scale, state_bits)


@selective_scan_q.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits):
    return torch.empty_like(u)


SCAN_Q_OP = torch.ops.ouromamba.selective_scan_q.default
