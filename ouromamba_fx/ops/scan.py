"""The selective scan as one differentiable custom op, ``ouromamba::selective_scan``.

Model code calls :func:`selective_scan`; under ``torch.fx.symbolic_trace`` that is a single
``call_function`` node whose target is ``torch.ops.ouromamba.selective_scan.default``, and under
``torch.compile`` the op is opaque (its fake implementation gives shapes), so quantization passes
and compilers see the whole scan as one unit.

Kernels, by device:

* CPU: a fused C++ kernel (``kernels/cpu/selective_scan.cpp``, OpenMP over (batch, d_inner) rows,
  never building a ``(batch, d_inner, L, d_state)`` tensor), built on the first CPU call
  (:mod:`ouromamba_fx.kernels.cpu.build`). If it cannot be built, a ``RuntimeWarning`` says why
  (once) and the plain-torch reference :func:`ouromamba_fx.kernels.scan_ref.selective_scan_ref` is
  used instead; :func:`scan_backend` tells which one is active. Setting the environment variable
  ``OUROMAMBA_SCAN_BACKEND=reference`` selects the reference without trying to build.
* CUDA: the chunked Triton scan, forward and backward
  (:mod:`ouromamba_fx.kernels.triton.scan`); B and C given as constant ``(d_inner, d_state)``
  matrices (no batch and time axes), which it does not take, and inputs on other devices run the
  plain-torch reference.

``ouromamba::selective_scan_cl`` is the same forward with its output in channel-contiguous memory
(strides ``(L * d_inner, 1, d_inner)``), which the lowering uses where a scan feeds out_proj.
``ouromamba::selective_scan_dt`` computes its delta itself from the x_proj output (W8A8's dt_proj
and the fake quantization of delta), which the lowering uses for quantized Vim-style mixers.

The backward pass is a second custom op, ``ouromamba::selective_scan_bwd``, which returns the
gradients of (u, delta, A, B, C, D, z, delta_bias); the entries of optional inputs that were
``None`` are empty tensors of shape ``(0,)``.

Dtypes: float64 inputs are computed in float64, everything else (float32, bfloat16, float16) in
float32; the output has ``u``'s dtype and each gradient its input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ouromamba_fx.kernels.cpu.build import SELECTIVE_SCAN
from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
from ouromamba_fx.ops.dispatch import register_cuda
from ouromamba_fx.ops.int8_linear import int8_linear_epilogue_t, quantize_input

__all__ = ["selective_scan", "selective_scan_channels_last", "selective_scan_dt", "dt_delta_ref", "combine_codes_ref",
           "z_epilogue_ref",
           "scan_backend",
           "SCAN_OP", "SCAN_BWD_OP", "SCAN_CHANNELS_LAST_OP", "SCAN_DT_OP"]


def scan_backend() -> str:
    """Which CPU implementation the op uses: ``"cpp"`` (fused kernel) or ``"reference"``.

    Triggers the (cached) build of the C++ kernel if no CPU scan has run yet.
    """
    return SELECTIVE_SCAN.backend()


# ---------------------------------------------------------------------------------------------
# Reference implementations (on CPU when the C++ build failed; on CUDA for constant B / C).

def _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus).contiguous()


def _reference_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Gradients from the plain-torch formulas, in the op's output convention (empty for None)."""
    grads = selective_scan_ref_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


def _empty_to_none(grads, inputs):
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    _, _, _, _, _, D, z, delta_bias = inputs
    return du, ddelta, dA, dB, dC, (None if D is None else dD), (None if z is None else dz), \
        (None if delta_bias is None else dbias)


# ---------------------------------------------------------------------------------------------
# Forward op

def _cpu_kernels(u: Tensor):
    """The C++ scan kernels for a CPU call (building them on the first), else None."""
    return SELECTIVE_SCAN.get() if u.device.type == "cpu" else None


@torch.library.custom_op("ouromamba::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    # CPU: the C++ kernel (once the library is loaded, CPU calls go to its registered C++ op
    # directly, kernels/cpu/ops.cpp); other devices without their own kernel: the reference.
    ext = _cpu_kernels(u)
    if ext is None:
        return _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return ext.fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


def _triton_takes(B: Tensor, C: Tensor) -> bool:
    """Whether the Triton scan takes these B and C: per sample and step (3-d or grouped 4-d), not
    constant (d_inner, d_state) matrices."""
    return B.dim() != 2 and C.dim() != 2


@register_cuda(_selective_scan_op)
def _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if not _triton_takes(B, C):
        return _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from ouromamba_fx.kernels.triton.scan import selective_scan_fwd

    return selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    torch._check(u.dim() == 3, lambda: f"selective_scan: u must be (batch, d_inner, L), got {tuple(u.shape)}")
    return u.new_empty(u.shape)


# ---------------------------------------------------------------------------------------------
# Backward op

@torch.library.custom_op("ouromamba::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                           delta_softplus: bool
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias); empty (0,) tensors for absent inputs."""
    ext = _cpu_kernels(u)
    if ext is None:
        return _reference_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return tuple(ext.bwd(dout, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus)))


@register_cuda(_selective_scan_bwd_op)
def _selective_scan_bwd_cuda(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if not _triton_takes(B, C):
        return _reference_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from ouromamba_fx.kernels.triton.scan import selective_scan_bwd

    grads = selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@_selective_scan_bwd_op.register_fake
def _selective_scan_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    def like(t):
        return u.new_empty(0) if t is None else t.new_empty(t.shape)

    return tuple(like(t) for t in (u, delta, A, B, C, D, z, delta_bias))


# ---------------------------------------------------------------------------------------------
# Autograd

def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout):
    saved = ctx.saved_tensors
    grads = torch.ops.ouromamba.selective_scan_bwd.default(dout, *saved, ctx.delta_softplus)
    return (*_empty_to_none(grads, saved), None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)

SCAN_OP = torch.ops.ouromamba.selective_scan.default
SCAN_BWD_OP = torch.ops.ouromamba.selective_scan_bwd.default


# ---------------------------------------------------------------------------------------------
# Forward op with channel-contiguous output (lowered inference graphs)

def _channels_last(t: Tensor) -> Tensor:
    """``t`` (batch, dim, L) with the same values in channel-contiguous memory (strides (L*dim, 1, dim))."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def z_epilogue_ref(z: Tensor, z_scale: Tensor, z_wscale: Tensor, z_bias: Optional[Tensor]) -> Tensor:
    """The gate the scans compute from a raw accumulator ``z`` (batch, d_inner, L) (their ``z_scale``
    / ``z_wscale`` / ``z_bias``), in plain torch: ``((z * z_scale[t]) * z_wscale[d]) + z_bias[d]`` in
    float32, ``z_scale`` one value per step of ``z`` as it lies (before any ``z_reverse``) or one in
    all: :func:`~ouromamba_fx.ops.int8_linear.int8_linear_epilogue_t` of it, the scale as a column
    over z's steps."""
    return int8_linear_epilogue_t(z.float(), z_scale.float().reshape(-1, 1), z_wscale, z_bias)


def _check_z_epilogue(op: str, u: Tensor, z: Optional[Tensor], z_scale: Optional[Tensor],
                      z_wscale: Optional[Tensor], z_bias: Optional[Tensor]) -> bool:
    """Checks the z_scale / z_wscale / z_bias arguments; whether z is a raw accumulator."""
    if z_scale is None and z_wscale is None and z_bias is None:
        return False
    torch._check(z_scale is not None and z_wscale is not None,
                 lambda: f"{op}: z_scale and z_wscale go together (z is then the raw accumulator of the linear "
                         f"producing it, with its row scale and weight scales); pass both, or neither")
    torch._check(z is not None, lambda: f"{op}: z_scale / z_wscale were given without z")
    d, length = u.shape[1], u.shape[2]
    torch._check(z_scale.numel() == length or z_scale.numel() == 1,
                 lambda: f"{op}: z_scale (the accumulator's row scale, per step of z) must have L ({length}) or 1 "
                         f"values, got {z_scale.numel()}")
    torch._check(z_wscale.numel() == d, lambda: f"{op}: z_wscale must have d_inner = {d} values")
    torch._check(z_bias is None or z_bias.numel() == d, lambda: f"{op}: z_bias must have d_inner = {d} values")
    return True


def _gate(op, u, z, z_scale, z_wscale, z_bias):
    """z as the plain-torch paths take it: the epilogue applied when z is a raw accumulator."""
    return z_epilogue_ref(z, z_scale, z_wscale, z_bias) if _check_z_epilogue(op, u, z, z_scale, z_wscale, z_bias) \
        else z


@torch.library.custom_op("ouromamba::selective_scan_cl", mutates_args=())
def selective_scan_channels_last(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                          fast_decay: bool = False, z_reverse: bool = False, z_scale: Optional[Tensor] = None,
                          z_wscale: Optional[Tensor] = None, z_bias: Optional[Tensor] = None) -> Tensor:
    """``ouromamba::selective_scan`` (same arguments, same numbers) whose output (batch, dim, L) lies
    in channel-contiguous memory, strides ``(L * dim, 1, dim)``: the layout of the transposed input
    of the out_proj after it, which then reads each token's channels contiguously. The CPU kernel
    writes it directly (its tile rows are a block's channels at one step: plain stores instead
    of the transposes that time-contiguous output takes), and so does the Triton kernel on CUDA;
    elsewhere the reference's output is copied into it. Forward only: the lowering uses it in
    inference graphs.

    ``fast_decay=True`` lets the CPU kernel compute the decays exp(dt A) in float32 with a degree-4
    polynomial (relative error under 2.9e-6 per decay, exact at dt A = 0) instead of the degree-5
    one (under 2 ulp): the lowering option ``fast_decay`` for quantized models, whose scan inputs
    carry 8-bit quantization error anyway. Other kernels (float64, reference, CUDA) compute the
    decays exactly and ignore it.

    ``z_reverse=True`` reads the gate ``z`` time-reversed: the numbers of ``z.flip(-1)`` without
    the copy (the backward scan of a bidirectional mixer; lowering rule ``reverse_scan_gate``).

    With ``z_scale`` (L or 1 values) and ``z_wscale`` (d_inner,) (and optionally ``z_bias``
    (d_inner,)), ``z`` is the raw (float32, integer-valued) accumulator of the linear producing it
    (in_proj's z half) and the gate is :func:`z_epilogue_ref` of it, ``z_scale`` indexed by z's own
    steps (before ``z_reverse``): the CPU kernel applies it as it loads each z tile, in the graph's
    order without contractions, so the same numbers as the separate epilogue (lowering rule
    ``fuse_z_epilogue``); other kernels apply it first."""
    # CPU: the C++ kernel (once the library is loaded, CPU calls go to its registered C++ op
    # directly, kernels/cpu/ops.cpp); other devices without their own kernel: the reference.
    ext = _cpu_kernels(u)
    if ext is None:
        z = _gate("selective_scan_cl", u, z, z_scale, z_wscale, z_bias)
        z = z.flip(-1) if z_reverse and z is not None else z
        return _channels_last(_reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus))
    return ext.fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), True, bool(fast_decay), bool(z_reverse),
                   z_scale, z_wscale, z_bias)


@register_cuda(selective_scan_channels_last)
def _selective_scan_cl_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, fast_decay=False, z_reverse=False,
                            z_scale=None, z_wscale=None, z_bias=None):
    z = _gate("selective_scan_cl", u, z, z_scale, z_wscale, z_bias)
    z = z.flip(-1) if z_reverse and z is not None else z
    if not _triton_takes(B, C):
        return _channels_last(_reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus))
    from ouromamba_fx.kernels.triton.scan import selective_scan_fwd

    return selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, channels_last=True)


@selective_scan_channels_last.register_fake
def _selective_scan_cl_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, fast_decay=False, z_reverse=False,
                            z_scale=None, z_wscale=None, z_bias=None):
    torch._check(u.dim() == 3, lambda: f"selective_scan_cl: u must be (batch, d_inner, L), got {tuple(u.shape)}")
    _check_z_epilogue("selective_scan_cl", u, z, z_scale, z_wscale, z_bias)
    b, d, length = u.shape
    return u.new_empty_strided((b, d, length), (length * d, 1, d))


SCAN_CHANNELS_LAST_OP = torch.ops.ouromamba.selective_scan_cl.default


# ---------------------------------------------------------------------------------------------
# Forward op computing delta from the x_proj columns (lowered W8A8 graphs)

def dt_delta_ref(dt_in: Tensor, dt_scale: Tensor, dt_qmin: int, dt_qmax: int, dt_weight: Tensor, dt_wscale: Tensor,
                 dt_bias: Optional[Tensor], delta_scale: Tensor, delta_zp: Tensor, delta_qmin: int,
                 delta_qmax: int) -> Tensor:
    """The delta ``ouromamba::selective_scan_dt`` computes, (batch, d_inner, L) float32, in plain
    torch: :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed` (``dt_in`` quantized with
    the symmetric per-token scale ``dt_scale``, the product with the int8 weight codes, the float
    epilogue), transposed and fake-quantized with ``delta_scale`` / ``delta_zp``
    (:func:`~ouromamba_fx.ops.quant.fake_quantize`). The product of the codes is
    :func:`~ouromamba_fx.ops.gemm.float_mm` (exact fp32 GEMMs), the rest the same operations."""
    from ouromamba_fx.ops.gemm import float_mm
    from ouromamba_fx.ops.quant import fake_quantize

    lead, rank = dt_in.shape[:-1], dt_in.shape[-1]
    xs = dt_scale.float().expand(*lead, 1)
    q = torch.round(dt_in.float() / xs).clamp(dt_qmin, dt_qmax)
    acc = float_mm(q.reshape(-1, rank), dt_weight, max(-dt_qmin, dt_qmax), 127).reshape(*lead, -1)
    y = acc * xs * dt_wscale.float().reshape(-1)
    if dt_bias is not None:
        y = y + dt_bias.float()
    return fake_quantize(y.transpose(1, 2), delta_scale, delta_zp, delta_qmin, delta_qmax)


_SCAN_DT_SCHEMA = ("(Tensor u, Tensor dt_in, Tensor dt_scale, int dt_qmin, int dt_qmax, Tensor dt_weight, "
                   "Tensor dt_wscale, Tensor? dt_bias, Tensor delta_scale, Tensor delta_zp, int delta_qmin, "
                   "int delta_qmax, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
                   "bool delta_softplus, bool channels_last=False, bool fast_decay=False, bool z_reverse=False, "
                   "Tensor? combine=None, Tensor? code_scale=None, int code_qmin=-127, int code_qmax=127, "
                   "Tensor? z_scale=None, Tensor? z_wscale=None, Tensor? z_bias=None) -> Tensor")


def combine_codes_ref(y: Tensor, combine: Tensor, code_scale: Tensor, code_qmin: int, code_qmax: int) -> Tensor:
    """The codes ``ouromamba::selective_scan_dt`` with ``combine`` returns, in plain torch: the
    bidirectional mixer's ``(combine + y.flip(-1)) / 2`` (``y`` the backward scan's output,
    ``combine`` the forward scan's, (batch, d_inner, L)), transposed to (batch, L, d_inner) and
    quantized as :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed` quantizes out_proj's
    input (``round(x / code_scale).clamp(code_qmin, code_qmax)``, ``code_scale`` broadcastable to
    (batch, L, 1)); int8, contiguous."""
    x = ((combine + y.flip(-1)) / 2).transpose(1, 2)
    return quantize_input(x, code_scale, code_qmin, code_qmax).to(torch.int8).contiguous()


def _scan_dt_unfused(scan, u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale, delta_zp,
                     delta_qmin, delta_qmax, A, B, C, D, z, delta_bias, delta_softplus, channels_last, fast_decay,
                     z_reverse, combine, code_scale, code_qmin, code_qmax, z_scale, z_wscale, z_bias):
    """selective_scan_dt from its pieces in plain torch: :func:`dt_delta_ref`, ``scan(u, delta, ...,
    channels_last, fast_decay)`` on the gate (:func:`z_epilogue_ref` of a raw accumulator) flipped,
    :func:`combine_codes_ref`."""
    delta = dt_delta_ref(dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale, delta_zp,
                         delta_qmin, delta_qmax).to(u.dtype)
    z = _gate("selective_scan_dt", u, z, z_scale, z_wscale, z_bias)
    if z_reverse and z is not None:
        z = z.flip(-1)
    y = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, channels_last and combine is None, fast_decay)
    if combine is None:
        return y
    _check_codes(u, combine, code_scale, code_qmin, code_qmax)
    return combine_codes_ref(y, combine, code_scale, code_qmin, code_qmax)


def _check_codes(u, combine, code_scale, code_qmin, code_qmax) -> None:
    torch._check(tuple(combine.shape) == tuple(u.shape), lambda: f"selective_scan_dt: combine (the forward scan's "
                 f"output) must have u's shape {tuple(u.shape)}, got {tuple(combine.shape)}")
    torch._check(code_scale is not None and code_scale.dim() <= 3 and (code_scale.dim() == 0 or code_scale.shape[-1] == 1),
                 lambda: "selective_scan_dt: combine needs code_scale, out_proj's input scale broadcastable to "
                         "(batch, L, 1)")
    torch._check(-128 <= code_qmin < code_qmax <= 127,
                 lambda: f"selective_scan_dt: code range [{code_qmin}, {code_qmax}] does not fit int8")


@torch.library.custom_op("ouromamba::selective_scan_dt", mutates_args=(), schema=_SCAN_DT_SCHEMA)
def selective_scan_dt(u: Tensor, dt_in: Tensor, dt_scale: Tensor, dt_qmin: int, dt_qmax: int, dt_weight: Tensor,
                      dt_wscale: Tensor, dt_bias: Optional[Tensor], delta_scale: Tensor, delta_zp: Tensor,
                      delta_qmin: int, delta_qmax: int, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                      channels_last: bool = False, fast_decay: bool = False, z_reverse: bool = False,
                      combine: Optional[Tensor] = None, code_scale: Optional[Tensor] = None, code_qmin: int = -127,
                      code_qmax: int = 127, z_scale: Optional[Tensor] = None, z_wscale: Optional[Tensor] = None,
                      z_bias: Optional[Tensor] = None) -> Tensor:
    """``ouromamba::selective_scan`` (``selective_scan_cl`` with ``channels_last``) on the delta of
    :func:`dt_delta_ref`, computed inside the scan: ``dt_in`` (batch, L, dt_rank) float, any
    strides, is the x_proj output's dt columns; ``dt_scale`` broadcasts to (batch, L, 1), the int8
    ``dt_weight`` is (d_inner, dt_rank), ``dt_wscale`` and ``dt_bias`` (d_inner,), and delta's
    ``delta_scale`` / ``delta_zp`` broadcast to (batch, d_inner, L). The lowering's rule
    ``fuse_dt_scan`` (lowering option ``dt_scan``) replaces W8A8's dt_proj, the transpose and the
    fake quantization of delta by it.

    The CPU kernel quantizes each (batch, step)'s dt_rank values once, computes each block's delta
    tile with dt_rank multiply-adds per step from the block's weight columns and follows the graph's
    operations in their order (no contractions): the same numbers as the unfused graph, bit for
    bit (tests/test_scan_op.py). Float64 scans take the delta from ATen ops in float32 (as the
    graph computes it). Other devices compute :func:`dt_delta_ref` and run the scan op. Forward
    only (inference graphs).

    The backward scan of a bidirectional (Vim) mixer: ``z_reverse=True`` reads ``z`` time-reversed
    (the mixer's ``z.flip(-1)``, never copied), and with ``combine`` (the forward scan's output,
    (batch, d_inner, L)) the op returns out_proj's int8 input codes (batch, L, d_inner),
    contiguous, instead of its output: :func:`combine_codes_ref` of the output with ``combine``,
    ``code_scale``, ``code_qmin`` and ``code_qmax`` (the lowering rule ``fuse_scan_combine``,
    option ``scan_combine``). The CPU kernel writes the codes from each block's output tile with
    the graph's float operations in their order: the same codes bit for bit, without the
    flipped copy of z or the mixer's output in memory.

    ``z_scale`` / ``z_wscale`` / ``z_bias``: ``z`` is in_proj's raw accumulator and the scan applies
    its epilogue as it loads z, as ``selective_scan_cl`` does (lowering rule ``fuse_z_epilogue``)."""
    ext = _cpu_kernels(u)
    if ext is None:
        def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cl, fast):
            out = _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
            return _channels_last(out) if cl else out

        return _scan_dt_unfused(scan, u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias,
                                delta_scale, delta_zp, delta_qmin, delta_qmax, A, B, C, D, z, delta_bias, delta_softplus,
                                channels_last, fast_decay, z_reverse, combine, code_scale, code_qmin, code_qmax, z_scale,
                                z_wscale, z_bias)
    return torch.ops.ouromamba_cpu.scan_dt_fwd.default(
        u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale, delta_zp, delta_qmin,
        delta_qmax, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(channels_last), bool(fast_decay),
        bool(z_reverse), combine, code_scale, int(code_qmin), int(code_qmax), z_scale, z_wscale, z_bias)


@register_cuda(selective_scan_dt)
def _selective_scan_dt_cuda(u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale,
                            delta_zp, delta_qmin, delta_qmax, A, B, C, D, z, delta_bias, delta_softplus,
                            channels_last=False, fast_decay=False, z_reverse=False, combine=None, code_scale=None,
                            code_qmin=-127, code_qmax=127, z_scale=None, z_wscale=None, z_bias=None):
    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cl, fast):
        if cl:
            return SCAN_CHANNELS_LAST_OP(u, delta, A, B, C, D, z, delta_bias, delta_softplus, fast)
        return SCAN_OP(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return _scan_dt_unfused(scan, u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale,
                            delta_zp, delta_qmin, delta_qmax, A, B, C, D, z, delta_bias, delta_softplus, channels_last,
                            fast_decay, z_reverse, combine, code_scale, code_qmin, code_qmax, z_scale, z_wscale, z_bias)


@selective_scan_dt.register_fake
def _selective_scan_dt_fake(u, dt_in, dt_scale, dt_qmin, dt_qmax, dt_weight, dt_wscale, dt_bias, delta_scale,
                            delta_zp, delta_qmin, delta_qmax, A, B, C, D, z, delta_bias, delta_softplus,
                            channels_last=False, fast_decay=False, z_reverse=False, combine=None, code_scale=None,
                            code_qmin=-127, code_qmax=127, z_scale=None, z_wscale=None, z_bias=None):
    torch._check(u.dim() == 3, lambda: f"selective_scan_dt: u must be (batch, d_inner, L), got {tuple(u.shape)}")
    _check_z_epilogue("selective_scan_dt", u, z, z_scale, z_wscale, z_bias)
    torch._check(dt_in.dim() == 3, lambda: f"selective_scan_dt: dt_in must be (batch, L, dt_rank), got "
                                           f"{tuple(dt_in.shape)}")
    b, d, length = u.shape
    if combine is not None:
        _check_codes(u, combine, code_scale, code_qmin, code_qmax)
        return u.new_empty((b, length, d), dtype=torch.int8)
    if channels_last:
        return u.new_empty_strided((b, d, length), (length * d, 1, d))
    return u.new_empty(u.shape)


SCAN_DT_OP = torch.ops.ouromamba.selective_scan_dt.default


# ---------------------------------------------------------------------------------------------
# Public entry point

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False) -> Tensor:
    """Selective scan (mamba-ssm's ``selective_scan_fn`` semantics), one ``ouromamba::selective_scan`` op.

    Args:
        u, delta: ``(batch, d_inner, L)``.
        A: ``(d_inner, d_state)``, real.
        B, C: ``(batch, d_state, L)``, ``(batch, groups, d_state, L)`` or ``(d_inner, d_state)``.
        D: optional ``(d_inner,)`` skip weight.
        z: optional ``(batch, d_inner, L)`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: optional ``(d_inner,)`` added to delta.
        delta_softplus: apply ``softplus`` (threshold 20) to ``delta + delta_bias``.

    Returns:
        ``(batch, d_inner, L)`` in ``u``'s dtype. Differentiable w.r.t. every tensor argument.

    This function only calls the op (so ``torch.fx.symbolic_trace`` records exactly one node).
    """
    return torch.ops.ouromamba.selective_scan.default(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
