"""Plain-torch selective scan: the numerical reference for the fused kernels.

It follows the semantics of mamba-ssm's ``selective_scan_fn`` and is written for clarity, not
speed: the per-step decay ``exp(delta * A)`` and input ``delta * B * u`` are formed for every time
step at once (a ``(batch, d_inner, L, d_state)`` tensor, which the fused kernels never build), then
the recurrence runs as a Python loop over time. Maths is float64 for float64 inputs and float32
for everything else (float32, bfloat16, float16); the output has ``u``'s dtype.

:func:`selective_scan_ref_backward` gives the same gradients as autograd through
:func:`selective_scan_ref`, from explicit formulas (a reverse loop over time); it is what runs
where autograd is not available, e.g. inside a custom op's backward kernel.

Shapes:
    u, delta, z: ``(batch, d_inner, L)``
    A: ``(d_inner, d_state)`` (real)
    B, C: ``(batch, d_state, L)`` ("variable"), ``(batch, groups, d_state, L)`` (variable, the
    ``d_inner`` channels split into ``groups`` equal consecutive blocks) or ``(d_inner, d_state)``
    (constant over batch and time)
    D, delta_bias: ``(d_inner,)``
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_scan_ref_backward", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan computes in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(M: torch.Tensor, batch: int, d_inner: int, d_state: int, L: int, name: str) -> torch.Tensor:
    """Brings B or C to a shape that broadcasts against ``(batch, d_inner, L, d_state)``."""
    if M.dim() == 2:  # (d_inner, d_state): constant
        if M.shape != (d_inner, d_state):
            raise ValueError(f"selective_scan_ref: {name} has shape {tuple(M.shape)}, expected "
                             f"({d_inner}, {d_state})")
        return M[None, :, None, :]
    if M.dim() == 3:  # (batch, d_state, L)
        if M.shape != (batch, d_state, L):
            raise ValueError(f"selective_scan_ref: {name} has shape {tuple(M.shape)}, expected "
                             f"({batch}, {d_state}, {L})")
        return M.transpose(1, 2)[:, None, :, :]
    if M.dim() == 4:  # (batch, groups, d_state, L)
        groups = M.shape[1]
        if M.shape[0] != batch or M.shape[2:] != (d_state, L) or groups < 1 or d_inner % groups:
            raise ValueError(f"selective_scan_ref: {name} has shape {tuple(M.shape)}, expected "
                             f"({batch}, groups, {d_state}, {L}) with groups dividing {d_inner}")
        return M.repeat_interleave(d_inner // groups, dim=1).transpose(2, 3)
    raise ValueError(f"selective_scan_ref: {name} must have 2, 3 or 4 dims, got {M.dim()}")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan, reference implementation (differentiable through ordinary autograd).

    ``delta' = softplus(delta + delta_bias)`` (or without softplus),
    ``h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t``, ``y_t = C_t . h_t + D u_t``,
    ``out = y * silu(z)`` when ``z`` is given.

    Returns ``out`` with ``u``'s shape and dtype, or ``(out, last_state)`` when
    ``return_last_state``; ``last_state`` is ``(batch, d_inner, d_state)`` in the compute dtype.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan_ref: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan_ref: complex A is not supported")
    out_dtype = u.dtype
    cdt = compute_dtype(u.dtype)
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    if A.shape != (d_inner, d_state):
        raise ValueError(f"selective_scan_ref: A has shape {tuple(A.shape)}, expected ({d_inner}, d_state)")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan_ref: delta has shape {tuple(delta.shape)}, expected {tuple(u.shape)}")

    u = u.to(cdt)
    delta = delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as mamba-ssm
    A = A.to(cdt)
    Bx = _per_channel(B.to(cdt), batch, d_inner, d_state, L, "B")  # broadcasts to (b, d, L, n)
    Cx = _per_channel(C.to(cdt), batch, d_inner, d_state, L, "C")

    decay = torch.exp(delta[..., None] * A[:, None, :])  # (b, d, L, n)
    drive = (delta * u)[..., None] * Bx  # (b, d, L, n)
    # unbind (not indexing in the loop): autograd then stacks the per-step gradients once instead
    # of scattering each into a zero-filled full-size tensor.
    c_steps = Cx.unbind(2) if Cx.shape[2] == L else [Cx[:, :, 0]] * L
    h = u.new_zeros(batch, d_inner, d_state)
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(2), drive.unbind(2), c_steps):
        h = decay_t * h + drive_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(out_dtype)
    return (out, h) if return_last_state else out


def _reduce_bc_grad(g: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Sums a ``(batch, d_inner, L, d_state)`` gradient down to the shape of B or C."""
    if M.dim() == 2:
        return g.sum(dim=(0, 2))
    if M.dim() == 3:
        return g.sum(dim=1).transpose(1, 2)
    batch, d_inner, L, d_state = g.shape
    groups = M.shape[1]
    return g.reshape(batch, groups, d_inner // groups, L, d_state).sum(dim=2).transpose(2, 3)


def gate_backward(g_out: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor]):
    """(dy, dz) of ``out = y * silu(z)`` given ``g_out = d out`` (``dz`` None and ``dy = g_out``
    without a gate), in ``g_out``'s dtype."""
    if z is None:
        return g_out, None
    zc = z.to(g_out.dtype)
    sz = torch.sigmoid(zc)
    return g_out * zc * sz, g_out * y * sz * (1 + zc * (1 - sz))


def selective_scan_ref_backward(
    dout: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
):
    """Gradients of :func:`selective_scan_ref` w.r.t. (u, delta, A, B, C, D, z, delta_bias).

    Returns an 8-tuple, ``None`` where the optional input was ``None``; each gradient has its
    input's shape and dtype. No autograd is used.
    """
    cdt = compute_dtype(u.dtype)
    batch, d_inner, L = u.shape
    d_state = A.shape[1]
    uc, Ac = u.to(cdt), A.to(cdt)
    x = delta.to(cdt)
    if delta_bias is not None:
        x = x + delta_bias.to(cdt)[:, None]
    dt = F.softplus(x) if delta_softplus else x
    Bx = _per_channel(B.to(cdt), batch, d_inner, d_state, L, "B")
    Cx = _per_channel(C.to(cdt), batch, d_inner, d_state, L, "C")
    Bfull = Bx.expand(batch, d_inner, L, d_state)
    Cfull = Cx.expand(batch, d_inner, L, d_state)
    decay = torch.exp(dt[..., None] * Ac[:, None, :])  # (b, d, L, n)
    drive = (dt * uc)[..., None] * Bfull

    # Forward states h_{-1} = 0, h_0 .. h_{L-1}.
    hs = [uc.new_zeros(batch, d_inner, d_state)]
    for t in range(L):
        hs.append(decay[:, :, t] * hs[-1] + drive[:, :, t])
    h_all = torch.stack(hs[1:], dim=2) if L > 0 else uc.new_zeros(batch, d_inner, 0, d_state)
    y = (h_all * Cfull).sum(-1)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc

    dy, dz = gate_backward(dout.to(cdt), y, z)
    dD = (dy * uc).sum(dim=(0, 2)) if D is not None else None
    du = dy * D.to(cdt)[:, None] if D is not None else torch.zeros_like(uc)

    dC_full = dy[..., None] * h_all
    dB_full = torch.empty_like(decay)
    ddt = torch.empty_like(uc)
    dA = torch.zeros_like(Ac)
    g = uc.new_zeros(batch, d_inner, d_state)  # dLoss/dh_t, carried backwards
    for t in range(L - 1, -1, -1):
        g = g + dy[:, :, t, None] * Cfull[:, :, t]
        g_b = (g * Bfull[:, :, t]).sum(-1)
        dB_full[:, :, t] = g * (dt[:, :, t] * uc[:, :, t])[..., None]
        q = g * hs[t] * decay[:, :, t]
        ddt[:, :, t] = (q * Ac).sum(-1) + uc[:, :, t] * g_b
        du[:, :, t] += dt[:, :, t] * g_b
        dA += (q * dt[:, :, t, None]).sum(0)
        g = g * decay[:, :, t]
    if delta_softplus:
        ddelta = ddt * torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))
    else:
        ddelta = ddt
    dbias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else None
    dB = _reduce_bc_grad(dB_full, B)
    dC = _reduce_bc_grad(dC_full, C)

    def cast(grad, ref):
        return None if ref is None else grad.to(ref.dtype).reshape(ref.shape).contiguous()

    return (cast(du, u), cast(ddelta, delta), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
            cast(dbias, delta_bias))
