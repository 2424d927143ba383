"""The quantized selective scans: ``ouromamba::selective_scan_q`` (:func:`selective_scan_reparam`) and
``ouromamba::selective_scan_qi`` (:func:`selective_scan_int8_inputs`).

``selective_scan_q`` is the reparameterized, state-quantized scan of the reference graph.

With rank-1 factors ``r_C (d_inner,)``, ``r_L (L,)``, ``r_N (d_state,)`` the scan runs on the
rescaled state ``h'_t = h_t / (r_C x r_L[t] x r_N)``:

    h'_t = exp(delta_t A) * (r_L[t-1] / r_L[t]) * h'_{t-1} + delta_t B_t u_t / (r_C r_L[t] r_N)
    h'_t = fq(h'_t, state_scale[t])          (one scale per time-step, when state_bits < 16)
    y_t  = r_C r_L[t] * sum_n C_t[n] r_N[n] h'_t[n] + D u_t,   out = y * silu(z)

(``state_scale`` may also be ``(d_inner, L, 1)`` or ``(1, L, d_state)``: a scale per time-step and
channel or state index; the C++ kernel takes them, on CUDA they run the reference), so without state quantization it equals the
plain scan exactly (up to float rounding). The quantized state feeds both the output and the next
step, so state quantization is real: it changes the forward output. ``r_N`` can be folded into
``x_proj`` (B rows / r_N, C rows * r_N); then the op gets ``r_N = 1``.

:func:`scan_state_stats` gives the statistics the factors are computed from (mean and max of
``|h|`` over the batch, per channel, step and state), without keeping every state.

Kernels: on the CPU both run as fused C++ (``kernels/cpu/selective_scan_q.cpp``: threads over
blocks of channels of one batch element, the channels of a block in the lanes of a vector, so
every state update, the state quantization and the C-contraction are vector operations; no Python
loop per time-step), built on first use like the float scan's kernel
(:mod:`ouromamba_fx.kernels.cpu.build`). The state quantization divides (``h / s``, not
``h * (1/s)``) and rounds half to even, so integer state codes equal the reference's except at
ties created by float rounding elsewhere. float64 inputs are computed in float64, everything else
in float32 (reference and kernel alike). ``benchmarks/scan_cpu.py`` times both against the float
scan. On CUDA both ops run the Triton kernel :func:`ouromamba_fx.kernels.triton.qscan.qscan`
(float32; float64 inputs, and B / C not of shape (batch, d_state, L), use the reference).

``ouromamba::selective_scan_qi``: the same scan fed by int8 codes (for lowering)
-------------------------------------------------------------------------------
Schema (every argument positional, in this order)::

    selective_scan_qi(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp,
                      D, z, delta_bias, delta_softplus: bool,
                      r_c, r_l, r_n, state_scale, state_bits: int) -> Tensor

* ``delta`` ``(batch, d_inner, L)``, ``B`` and ``C`` ``(batch, d_state, L)`` (any strides, e.g.
  transposed views) are each EITHER int8 codes exactly as ``ouromamba::quantize`` returns them,
  with the ``scale`` and ``zero_point`` tensors of that quantize node (float32, per tensor
  ``(1,)``/``()`` or per time-step ``(1, L)``/``(L,)``), OR floats with ``None`` for both.
  Scale and zero point must broadcast against the codes *as passed*: codes quantized as
  ``(batch, L, d_state)`` with a per-token ``(L, 1)`` scale and then transposed into the scan's
  layout need the scale transposed too (``(1, L)``); other shapes raise ``ValueError``. The
  kernel dequantizes as ``ouromamba::dequantize`` does, ``(float(q) - zero_point) * scale`` in
  float32, right where the value is used, so no float copy of delta/B/C is ever written.
* ``u``, ``z`` float ``(batch, d_inner, L)`` (``z`` optional); ``A (d_inner, d_state)``; ``D``,
  ``delta_bias`` ``(d_inner,)`` optional; ``delta_softplus`` as in ``ouromamba::selective_scan``.
  The output is ``(y + D u) * silu(z)`` exactly as there: the D skip and the gating are fused.
* ``r_c``, ``r_l``, ``r_n``, ``state_scale``: the reparameterization of ``selective_scan_q``;
  each ``None`` means all ones. ``state_bits < 16`` quantizes the state (needs ``state_scale``);
  ``state_bits >= 16`` does not (``state_scale`` is then ignored). ``r_l``/``state_scale``
  calibrated for another L are resampled, as in ``selective_scan_q``.

It equals ``dequantize`` of each int8 input followed by ``selective_scan_q`` (or, with no factors
and ``state_bits >= 16``, by ``selective_scan``), so a lowering pass can replace

    q = quantize(x, s, zp, qmin, qmax); x_hat = dequantize(q, s, zp)     (for delta, B and/or C)
    y = selective_scan(u, x_hat_delta, A, x_hat_B, x_hat_C, D, z, bias, softplus)
        -> selective_scan_qi(u, q_delta, s_delta, zp_delta, A, q_B, s_B, zp_B, q_C, s_C, zp_C,
                             D, z, bias, softplus, None, None, None, None, 16)
    y = selective_scan_q(u, x_hat_delta, A, x_hat_B, x_hat_C, D, z, bias, softplus,
                         r_c, r_l, r_n, state_scale, state_bits)
        -> selective_scan_qi(..., r_c, r_l, r_n, state_scale, state_bits)

when the dequantize nodes have no other users. ``quantize_mixed`` outputs (outlier channels) are
floats already: pass them as float inputs. :data:`SCAN_INT8_INPUTS_OP` is the overload to target; the
reference is :func:`selective_scan_int8_inputs_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx import numerics
from ouromamba_fx.kernels.cpu.build import SELECTIVE_SCAN_Q
from ouromamba_fx.numerics import is_float
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.mixed import resample_steps
from ouromamba_fx.ops.quant import dequantize_ref


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prep(u, delta, A, B, C, delta_bias, delta_softplus):
    ct = _compute_dtype(u)
    u, delta = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.to(ct), B.to(ct), C.to(ct)


@torch.no_grad()
def scan_state_stats(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     delta_bias: Tensor | None = None, delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """(sum over batch of |h|, max over batch of |h|), each (d_inner, L, d_state), for B, C of
    shape (batch, d_state, L). Fused C++ on the CPU, :func:`scan_state_stats_ref` elsewhere.

    Example::

        h_sum, h_max = scan_state_stats(u, delta, A, B, C, delta_bias, delta_softplus=True)
        h_mean = h_sum / u.shape[0]
    """
    ext = SELECTIVE_SCAN_Q.get() if u.device.type == "cpu" and B.dim() == 3 else None
    if ext is None:
        return scan_state_stats_ref(u, delta, A, B, C, delta_bias, delta_softplus)
    ct = _compute_dtype(u)
    s, m = ext.state_stats(u.to(ct), delta.to(ct), A.to(ct).contiguous(), B.to(ct),
                           None if delta_bias is None else delta_bias.to(ct).contiguous(), bool(delta_softplus))
    return s, m


@torch.no_grad()
def scan_state_stats_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         delta_bias: Tensor | None = None, delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """Plain-torch reference of :func:`scan_state_stats` (a loop over time-steps)."""
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


def _step_params(r_l: Tensor, state_scale: Tensor, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """r_l and state_scale for ``length`` steps (resampled when calibrated for another length).
    ``state_scale`` is ``(L,)`` or, for finer scales, ``(d_inner | 1, L, d_state | 1)``."""
    if r_l.numel() != length:
        r_l = resample_steps(r_l, length)
        if state_scale.dim() == 1:
            state_scale = resample_steps(state_scale, length)
    if state_scale.dim() > 1 and state_scale.shape[1] != length:
        d, steps, n = state_scale.shape
        flat = state_scale.float().permute(0, 2, 1).reshape(1, d * n, steps)
        if length == 1:
            flat = flat.mean(-1, keepdim=True)
        elif steps == 1:
            flat = flat.expand(1, d * n, length)
        else:  # linear along the steps, as resample_steps does for (L,) scales
            flat = F.interpolate(flat, size=length, mode="linear", align_corners=True)
        state_scale = flat.reshape(d, n, length).permute(0, 2, 1)
    return r_l.to(dtype), state_scale.to(dtype)


def selective_scan_reparam_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                               z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                               r_c: Tensor, r_l: Tensor, r_n: Tensor, state_scale: Tensor,
                               state_bits: int) -> Tensor:
    """Reference of ``ouromamba::selective_scan_q`` (module docstring); B, C: (batch, d_state, L)."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prep(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = u.shape
    n = A.shape[1]
    r_c, r_n = r_c.to(u.dtype), r_n.to(u.dtype)
    r_l, state_scale = _step_params(r_l, state_scale, length, u.dtype)
    qmax = numerics.qmax(state_bits)
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
        if not is_float(state_bits):
            s = state_scale[t] if state_scale.dim() == 1 else state_scale[:, t]  # scalar or (d|1, n|1)
            h = torch.round(h / s).clamp_(-qmax, qmax) * s
        ys.append((h * (C[:, None, :, t] * out_rcn)).sum(-1) * r_l[t])
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(u.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(out_dtype)


@torch.library.custom_op("ouromamba::selective_scan_q", mutates_args=())
def selective_scan_reparam(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                           z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, r_c: Tensor,
                           r_l: Tensor, r_n: Tensor, state_scale: Tensor, state_bits: int) -> Tensor:
    return selective_scan_reparam_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n,
                                      state_scale, state_bits)


@selective_scan_reparam.register_kernel("cpu")
def _selective_scan_reparam_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale,
                                state_bits):
    ext = SELECTIVE_SCAN_Q.get()
    if ext is None or B.dim() != 3 or C.dim() != 3:
        return selective_scan_reparam_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n,
                                          state_scale, state_bits)
    ct = _compute_dtype(u)
    r_l, state_scale = _step_params(r_l, state_scale, u.shape[-1], ct)
    return _cpu_call(ext, ct, u, (delta, None, None), A, (B, None, None), (C, None, None), D, z, delta_bias,
                     delta_softplus, r_c, r_l, r_n, state_scale, state_bits).to(u.dtype)


def _cpu_call(ext, ct, u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale,
              state_bits):
    """The C++ forward; delta, B, C are (tensor, scale, zero_point) with int8 codes or floats."""
    def fl(t):
        return None if t is None else t.to(ct)

    def vec(t):
        return None if t is None else t.to(ct).contiguous()

    def seq(x, scale, zp):
        return (x, scale, zp) if x.dtype == torch.int8 else (x.to(ct), None, None)

    qmax = -1 if is_float(state_bits) else numerics.qmax(state_bits)
    return ext.fwd(fl(u), *seq(*delta), vec(A), *seq(*B), *seq(*C), vec(D), fl(z), vec(delta_bias),
                   bool(delta_softplus), vec(r_c), vec(r_l), vec(r_n), vec(state_scale), qmax)


@selective_scan_reparam.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits):
    return torch.empty_like(u)


SCAN_REPARAM_OP = torch.ops.ouromamba.selective_scan_q.default


# ---------------------------------------------------------------------------------------------
# Integer-input variant (module docstring): int8 delta / B / C codes dequantized inside the scan.

def _dequant_input(x: Tensor, scale: Tensor | None, zp: Tensor | None, name: str) -> Tensor:
    if x.dtype == torch.int8:
        if scale is None or zp is None:
            raise ValueError(f"selective_scan_qi: int8 {name} needs its scale and zero_point")
        return dequantize_ref(x, scale, zp)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"selective_scan_qi: {name} must be int8 codes or floats, got {x.dtype}")
    return x


def _factors(u, A, r_c, r_l, r_n, state_scale, state_bits):
    """Explicit factors (ones for None) in float32 / the compute dtype handled by the callers."""
    d, length, n = u.shape[1], u.shape[2], A.shape[1]
    if not is_float(state_bits) and state_scale is None:
        raise ValueError("selective_scan_qi: state_bits < 16 needs a state_scale")
    ones = lambda k: torch.ones(k, device=u.device)  # noqa: E731
    r_l = ones(length) if r_l is None else r_l
    if state_scale is None:
        state_scale = torch.ones_like(r_l, dtype=torch.float32)
    return (ones(d) if r_c is None else r_c, r_l, ones(n) if r_n is None else r_n, state_scale)


def selective_scan_int8_inputs_ref(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp, D, z,
                                   delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits) -> Tensor:
    """Reference of ``ouromamba::selective_scan_qi`` (the op's arguments): dequantize, then
    :func:`selective_scan_reparam_ref`."""
    delta = _dequant_input(delta, delta_scale, delta_zp, "delta")
    B = _dequant_input(B, B_scale, B_zp, "B")
    C = _dequant_input(C, C_scale, C_zp, "C")
    r_c, r_l, r_n, state_scale = _factors(u, A, r_c, r_l, r_n, state_scale, state_bits)
    return selective_scan_reparam_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n,
                                      state_scale, state_bits)


@torch.library.custom_op("ouromamba::selective_scan_qi", mutates_args=())
def selective_scan_int8_inputs(u: Tensor, delta: Tensor, delta_scale: Tensor | None, delta_zp: Tensor | None,
                               A: Tensor, B: Tensor, B_scale: Tensor | None, B_zp: Tensor | None, C: Tensor,
                               C_scale: Tensor | None, C_zp: Tensor | None, D: Tensor | None, z: Tensor | None,
                               delta_bias: Tensor | None, delta_softplus: bool, r_c: Tensor | None,
                               r_l: Tensor | None, r_n: Tensor | None, state_scale: Tensor | None,
                               state_bits: int) -> Tensor:
    """Selective scan on int8 delta / B / C codes (see the module docstring for the contract)."""
    return selective_scan_int8_inputs_ref(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp,
                                          D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits)


def _per_step(s: Tensor, length: int, name: str) -> Tensor:
    """A quantize node's per-tensor or per-time-step scale / zero point as a float32 (L,) tensor."""
    if s.numel() == 1:
        return s.float().reshape(1).expand(length).contiguous()
    if s.numel() == length and s.dim() >= 1 and s.shape[-1] == length:
        return s.float().reshape(length).contiguous()
    raise ValueError(f"selective_scan_qi: {name} must be per tensor or per time-step (L = {length}), "
                     f"got shape {tuple(s.shape)}")


@selective_scan_int8_inputs.register_kernel("cpu")
def _selective_scan_int8_inputs_cpu(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp, D, z,
                                    delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits):
    ext = SELECTIVE_SCAN_Q.get()
    if ext is None or B.dim() != 3 or C.dim() != 3:
        return selective_scan_int8_inputs_ref(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp,
                                              D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits)
    length = u.shape[-1]
    ct = _compute_dtype(u)
    r_c, r_l, r_n, state_scale = _factors(u, A, r_c, r_l, r_n, state_scale, state_bits)
    r_l, state_scale = _step_params(r_l, state_scale, length, ct)

    def inp(x, scale, zp, name):
        if x.dtype != torch.int8:
            return _dequant_input(x, scale, zp, name), None, None
        if scale is None or zp is None:
            raise ValueError(f"selective_scan_qi: int8 {name} needs its scale and zero_point")
        return x, _per_step(scale, length, name + "_scale"), _per_step(zp, length, name + "_zp")

    return _cpu_call(ext, ct, u, inp(delta, delta_scale, delta_zp, "delta"), A, inp(B, B_scale, B_zp, "B"),
                     inp(C, C_scale, C_zp, "C"), D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale,
                     state_bits).to(u.dtype)


@selective_scan_int8_inputs.register_fake
def _(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp, D, z, delta_bias,
      delta_softplus, r_c, r_l, r_n, state_scale, state_bits):
    torch._check(u.dim() == 3 and delta.shape == u.shape,
                 lambda: "selective_scan_qi: u and delta must be (batch, d_inner, L)")
    return torch.empty_like(u)


SCAN_INT8_INPUTS_OP = torch.ops.ouromamba.selective_scan_qi.default


# ---------------------------------------------------------------------------------------------
# CUDA: the Triton kernel (imported on first use, so this module works where triton is absent).

def _selective_scan_reparam_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale,
                                 state_bits):
    if u.dtype == torch.float64 or B.dim() != 3 or C.dim() != 3:
        return selective_scan_reparam_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n,
                                          state_scale, state_bits)
    from ouromamba_fx.kernels.triton.qscan import qscan

    r_l, state_scale = _step_params(r_l, state_scale, u.shape[-1], torch.float32)
    return qscan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale,
                 state_bits).to(u.dtype)


def _selective_scan_int8_inputs_cuda(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp, D, z,
                                     delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits):
    if u.dtype == torch.float64 or B.dim() != 3 or C.dim() != 3:
        return selective_scan_int8_inputs_ref(u, delta, delta_scale, delta_zp, A, B, B_scale, B_zp, C, C_scale, C_zp,
                                              D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits)
    from ouromamba_fx.kernels.triton.qscan import qscan

    length = u.shape[-1]
    r_c, r_l, r_n, state_scale = _factors(u, A, r_c, r_l, r_n, state_scale, state_bits)
    r_l, state_scale = _step_params(r_l, state_scale, length, torch.float32)
    params = {}
    for name, x, scale, zp in (("delta", delta, delta_scale, delta_zp), ("B", B, B_scale, B_zp),
                               ("C", C, C_scale, C_zp)):
        if x.dtype == torch.int8:
            if scale is None or zp is None:
                raise ValueError(f"selective_scan_qi: int8 {name} needs its scale and zero_point")
            params[name + "_scale"] = _per_step(scale, length, name + "_scale")
            params[name + "_zp"] = _per_step(zp, length, name + "_zp")
        else:
            _dequant_input(x, scale, zp, name)  # checks the dtype
    return qscan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, r_c, r_l, r_n, state_scale, state_bits,
                 **params).to(u.dtype)


register_cuda(selective_scan_reparam)(_selective_scan_reparam_cuda)
register_cuda(selective_scan_int8_inputs)(_selective_scan_int8_inputs_cuda)
