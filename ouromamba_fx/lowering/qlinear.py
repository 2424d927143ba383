"""Integer linear layers as custom ops: dynamic/static activation quantization, W8A8 and W4A4 + 8-bit
outlier GEMMs, with plain-torch references that define the numbers.

Ops (namespace ``ouromamba``; importing this module registers them):

* ``quantize_per_token(Tensor x, int bits) -> (Tensor q, Tensor scale)``
  dynamic symmetric per-row quantization over the last dim: ``scale = max(amax(|x|) / qmax, 1e-8)``
  with ``qmax = 2**(bits-1) - 1``, ``q`` int8 in ``[-qmax, qmax]``, ``scale`` float32 ``(..., 1)``.
* ``outlier_split(Tensor x, Tensor mask, Tensor? inlier_scale, int inlier_bits)
  -> (Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out)``
  ``x`` (M, K), ``mask`` (M, K) bool, True = outlier. Inliers are quantized to ``inlier_bits``
  symmetric with the static ``inlier_scale`` (anything broadcastable to (M, 1)) or, if None, a
  dynamic per-row scale from the inliers' amax; outliers to 8 bits with a dynamic per-row scale from
  the outliers' amax. ``q_in`` is 0 where ``mask``, ``q_out`` is 0 where ``~mask``; scales (M, 1).
* ``int8_linear(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor``
  ``y = (x_q @ w_q^T exact in int32) * x_scale * w_scale + bias``, float32 (M, N); ``x_q`` (M, K)
  int8, ``x_scale`` (M, 1) or one element, ``w_q`` (N, K) int8, ``w_scale`` N elements
  ((N,) or (N, 1)), ``bias`` (N,) or None.
* ``w8a8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? x_scale) -> Tensor``
  quantize ``x`` (..., K) to 8 bits (per token, dynamic if ``x_scale`` is None, else with the static
  ``x_scale`` broadcastable to (..., 1)), then ``int8_linear``; output (..., N) float32.
* ``w4a4o8_linear(Tensor x, Tensor mask, Tensor? inlier_scale, Tensor w_packed, Tensor w_scale,
  Tensor? bias, int k) -> Tensor``
  ``y = w_scale * (s_in * (q_in @ Wq^T) + s_out * (q_out @ Wq^T)) + bias`` with
  ``(q_in, s_in, q_out, s_out) = outlier_split(x, mask, inlier_scale, 4)`` and
  ``Wq = unpack_int4(w_packed, k)``; ``x`` and ``mask`` (..., K), output (..., N) float32.

Numbers follow :mod:`ouromamba_fx.lowering.quant`: ``q = clamp(round_half_even(x / scale), -qmax,
qmax)`` (a true division), 4-bit values live in int8 in [-7, 7], 8-bit in [-127, 127]. Integer
products are exact int32 sums (exact as long as ``K * 127 * 127 < 2**31``, i.e. K < 133 000). The
float epilogue is evaluated in the order ``((acc * x_scale) * w_scale) + bias`` (for W4A4O8:
``((acc_in * s_in + acc_out * s_out) * w_scale) + bias``) in float32. The ``*_ref`` functions here
are the definitions; the CPU kernels are equal to them bit for bit (integers and, with the current
epilogue, floats too); the Triton kernels are bit-exact on integers and differ only by float
rounding (FMA contraction) in the epilogue.

int4 packing (:func:`pack_int4`): two's-complement nibbles, byte ``j`` of a row holds column ``2j``
in its low nibble and column ``2j + 1`` in its high nibble; for odd K the last high nibble is 0.

Kernels, by device:

* CPU: ``torch._int_mm`` (oneDNN, VNNI on AVX-512 CPUs) for the int8 products; on x86 CPUs
  without VNNI/AMX, where ``torch._int_mm`` is a slow reference loop, the same integers by the
  exact kernels of :mod:`ouromamba_fx.lowering.cpu_gemm`. Quantization and
  the epilogue are a few in-place torch ops. On CPU ``torch._int_mm`` accepts any 2-D int8 shapes
  (no multiple-of-8 or M > 16 rule as on CUDA), so nothing is padded, but on torch 2.14 it returns
  garbage for K == 1 (checked by a sweep over M, N in 1..1000, K in 1..769: K == 1 is the only
  failing size), so K == 1 is computed as an exact int32 outer product instead. If ``_int_mm``
  refuses a shape (older torch) the code falls back, with a one-time warning, to an exact int64
  matmul.
  W4A4O8 unpacks the int4 weight on every call (measured 2-5 % of the op, so no cache to keep
  coherent, see ``benchmarks/ops_cpu.md``) and runs the inlier GEMM on all K columns and the
  outlier GEMM only on the columns where some row has an outlier (gathered; as an fp32 GEMM, exact
  for these small integers, which skips an int32 -> float pass), falling back to a full-K int8
  GEMM when more than half of the columns hold outliers; all give the same integers. Measured
  alternatives: two full-K int8 GEMMs, or one int8 GEMM over the 2M rows ``[q_in; q_out]``, are
  both slower (the latter also pays the concatenation).
* CUDA: Triton kernels in :mod:`ouromamba_fx.kernels` (imported on first CUDA call).
* Other devices: the integer products run on the CPU and the result is copied back.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ouromamba_fx.lowering import cpu_gemm
from ouromamba_fx.lowering.quant import quantize_ref
from ouromamba_fx.numerics import EPS, int8_qmax

__all__ = [
    "pack_int4", "unpack_int4", "int_matmul_ref",
    "quantize_per_token", "quantize_per_token_ref",
    "outlier_split", "outlier_split_ref",
    "int8_linear", "int8_linear_ref",
    "w8a8_linear", "w8a8_linear_ref",
    "w4a4o8_linear", "w4a4o8_linear_ref",
]

_OUTLIER_BITS = 8
_W4A4O8_INLIER_BITS = 4
# Gather the outlier columns for the outlier GEMM when at most this fraction of K holds outliers.
_SPARSE_OUTLIER_MAX_FRACTION = 0.5
# Largest K for which an fp32 product of 8-bit activations and int4 weights is exact: 127*8*K < 2**24.
_FP32_EXACT_MAX_K = (2 ** 24 - 1) // (127 * 8)


# ---------------------------------------------------------------------------------------------
# int4 packing (plain torch, exact round trip)

def pack_int4(w_q: Tensor) -> Tensor:
    """Pack int8 values in [-8, 7] of shape (N, K) into uint8 (N, ceil(K / 2)), two per byte.

    Column ``2j`` goes to the low nibble of byte ``j``, column ``2j + 1`` to its high nibble
    (two's complement); for odd K the last high nibble is 0. :func:`unpack_int4` inverts it.
    """
    if w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 (N, K) tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if w_q.numel() and (int(w_q.min()) < -8 or int(w_q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(w_q.min())}, {int(w_q.max())}]")
    n, k = w_q.shape
    w = w_q.to(torch.int16)
    if k % 2:
        w = torch.cat([w, w.new_zeros(n, 1)], dim=1)
    lo = w[:, 0::2] & 0xF
    hi = w[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(w_packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, ceil(k / 2)) -> int8 (N, k) in [-8, 7]."""
    _check_packed(w_packed, k)
    # Sign extension by arithmetic right shifts on int8: the high nibble is byte >> 4, the low one
    # is moved up first (a uint8 shift, modulo 256) and shifted back. Three ops, no int16 temporary
    # (2-5x faster than masking and xor in int16, which matters for the per-call unpack).
    lo = (w_packed << 4).view(torch.int8) >> 4
    hi = w_packed.view(torch.int8) >> 4
    w = torch.stack([lo, hi], dim=-1).reshape(w_packed.shape[0], 2 * w_packed.shape[1])
    return w if w.shape[1] == k else w[:, :k].contiguous()


def _check_packed(w_packed: Tensor, k: int) -> None:
    if w_packed.dim() != 2 or w_packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 weight must be uint8 (N, ceil(K/2)), got {w_packed.dtype} "
                         f"{tuple(w_packed.shape)}")
    if not isinstance(k, int) or k < 0 or (k + 1) // 2 != w_packed.shape[1]:
        raise ValueError(f"k={k!r} does not match a packed weight with {w_packed.shape[1]} bytes per row "
                         f"(expected k in {{{2 * w_packed.shape[1] - 1}, {2 * w_packed.shape[1]}}})")


# ---------------------------------------------------------------------------------------------
# Plain-torch references: they define the numbers.

def int_matmul_ref(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` for int8 ``a`` (M, K) and ``b`` (N, K) as int32, computed exactly in int64 on CPU."""
    return (a.cpu().long() @ b.cpu().long().t()).to(torch.int32).to(a.device)


def _symmetric_scale(amax: Tensor, qmax: int) -> Tensor:
    return (amax / qmax).clamp_min(EPS)


def _quantize_sym_ref(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return quantize_ref(x, scale, torch.zeros((), dtype=torch.float32, device=x.device), -qmax, qmax)


def quantize_per_token_ref(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Definition of ``ouromamba::quantize_per_token``."""
    qmax = int8_qmax(bits)
    x = x.float()
    scale = _symmetric_scale(_amax_rows(x), qmax)
    return _quantize_sym_ref(x, scale, qmax), scale


def outlier_split_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                      inlier_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Definition of ``ouromamba::outlier_split``."""
    qmax_in = int8_qmax(inlier_bits)
    qmax_out = int8_qmax(_OUTLIER_BITS)
    x = x.float()
    x_in = torch.where(mask, 0.0, x)
    x_out = torch.where(mask, x, 0.0)
    if inlier_scale is None:
        s_in = _symmetric_scale(_amax_rows(x_in), qmax_in)
    else:
        s_in = inlier_scale.float().expand(x.shape[0], 1).clone()
    s_out = _symmetric_scale(_amax_rows(x_out), qmax_out)
    return (_quantize_sym_ref(x_in, s_in, qmax_in), s_in, _quantize_sym_ref(x_out, s_out, qmax_out), s_out)


def int8_linear_ref(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor]) -> Tensor:
    """Definition of ``ouromamba::int8_linear``."""
    acc = int_matmul_ref(x_q, w_q)
    y = acc.float() * _row_scale(x_scale, x_q.shape[0]) * w_scale.float().reshape(1, -1)
    return y + bias.float() if bias is not None else y


def w8a8_linear_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    x_scale: Optional[Tensor]) -> Tensor:
    """Definition of ``ouromamba::w8a8_linear``."""
    lead = x.shape[:-1]
    if x_scale is None:
        x_q, xs = quantize_per_token_ref(x, 8)
    else:
        xs = x_scale.float().expand(*lead, 1)
        x_q = _quantize_sym_ref(x.float(), xs, 127)
    y = int8_linear_ref(x_q.reshape(-1, x.shape[-1]), xs.reshape(-1, 1), w_q, w_scale, bias)
    return y.reshape(*lead, w_q.shape[0])


def w4a4o8_linear_ref(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor,
                      w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """Definition of ``ouromamba::w4a4o8_linear``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    s_static = None if inlier_scale is None else inlier_scale.float().expand(*lead, 1).reshape(-1, 1)
    q_in, s_in, q_out, s_out = outlier_split_ref(x2, mask.reshape(-1, k), s_static, _W4A4O8_INLIER_BITS)
    w = unpack_int4(w_packed, k)
    y = int_matmul_ref(q_in, w).float() * s_in + int_matmul_ref(q_out, w).float() * s_out
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w.shape[0])


# ---------------------------------------------------------------------------------------------
# Shape checks, shared by the real and the fake implementations.

def _row_scale(scale: Tensor, m: int) -> Tensor:
    """A per-tensor (one element) or per-row (M elements) scale as float32 (1, 1) or (M, 1)."""
    return scale.float().reshape(-1, 1) if scale.numel() == m else scale.float().reshape(1, 1)


def _check_float(name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")


def _check_broadcast_scale(name: str, scale: Tensor, lead: tuple) -> None:
    _check_float(name, scale)
    target = torch.Size((*lead, 1))
    try:
        ok = torch.broadcast_shapes(scale.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(scale.shape)} does not broadcast to "
                         f"{tuple(target)} (one scale per row)")


def _check_weight(w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], k: int, n: int) -> None:
    _check_float("w_scale", w_scale)
    if w_scale.numel() != n or w_scale.dim() > 2 or (w_scale.dim() == 2 and w_scale.shape[1] != 1):
        raise ValueError(f"w_scale must have one entry per output channel, shape ({n},) or ({n}, 1), "
                         f"got {tuple(w_scale.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def _check_int8_linear(x_q, x_scale, w_q, w_scale, bias) -> None:
    if x_q.dim() != 2 or x_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise ValueError(f"int8_linear expects int8 x_q (M, K) and w_q (N, K), got x_q {x_q.dtype} "
                         f"{tuple(x_q.shape)} and w_q {w_q.dtype} {tuple(w_q.shape)}")
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"int8_linear: K mismatch, x_q {tuple(x_q.shape)} vs w_q {tuple(w_q.shape)}")
    _check_float("x_scale", x_scale)
    m = x_q.shape[0]
    if not (x_scale.numel() == 1 or tuple(x_scale.shape) in ((m, 1), (m,))):
        raise ValueError(f"x_scale must be per tensor (one element) or per row ({m}, 1), "
                         f"got {tuple(x_scale.shape)}")
    _check_weight(w_q, w_scale, bias, w_q.shape[1], w_q.shape[0])


def _check_outlier_split(x, mask, inlier_scale, inlier_bits) -> None:
    int8_qmax(inlier_bits)
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"outlier_split expects x of shape (M, K), got {tuple(x.shape)}")
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask must be bool with x's shape {tuple(x.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if inlier_scale is not None:
        _check_broadcast_scale("inlier_scale", inlier_scale, (x.shape[0],))


def _check_w8a8(x, w_q, w_scale, bias, x_scale) -> None:
    _check_float("x", x)
    if x.dim() < 1 or w_q.dim() != 2 or w_q.dtype != torch.int8 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"w8a8_linear expects x (..., K) and int8 w_q (N, K), got x {tuple(x.shape)}, "
                         f"w_q {w_q.dtype} {tuple(w_q.shape)}")
    if x_scale is not None:
        _check_broadcast_scale("x_scale", x_scale, tuple(x.shape[:-1]))
    _check_weight(w_q, w_scale, bias, w_q.shape[1], w_q.shape[0])


def _check_w4a4o8(x, mask, inlier_scale, w_packed, w_scale, bias, k) -> None:
    _check_float("x", x)
    _check_packed(w_packed, k)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"w4a4o8_linear: x {tuple(x.shape)} does not end in K={k}")
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask must be bool with x's shape {tuple(x.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if inlier_scale is not None:
        _check_broadcast_scale("inlier_scale", inlier_scale, tuple(x.shape[:-1]))
    _check_weight(w_packed, w_scale, bias, k, w_packed.shape[0])


# ---------------------------------------------------------------------------------------------
# Fast host paths (CPU; any non-CUDA device, with the int products on the CPU).

_warned_fallback = False


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a @ b^T`` for int8 a (M, K), b (N, K)."""
    global _warned_fallback
    dev = a.device
    if dev.type != "cpu":
        a, b = a.cpu(), b.cpu()
    try:
        if a.shape[1] == 1:
            # torch._int_mm on CPU returns garbage (uninitialized memory) for K == 1 (torch 2.14,
            # any M, N > 1); the product is an outer product, exact in int32.
            out = a.to(torch.int32) * b.to(torch.int32).t()
        else:
            # torch._int_mm where the CPU has VNNI/AMX (b.t() is a column-major (K, N) view:
            # oneDNN takes it as is, measured as fast as a contiguous copy or faster), an exact
            # fp32 GEMM elsewhere (torch._int_mm is a slow reference loop there): cpu_gemm
            out = cpu_gemm.int_mm(a, b)
    except RuntimeError as e:
        if not _warned_fallback:
            warnings.warn(f"torch._int_mm refused shapes {tuple(a.shape)} x {tuple(b.shape)} ({e}); "
                          "using an exact but slower int64 matmul", RuntimeWarning, stacklevel=2)
            _warned_fallback = True
        out = (a.long() @ b.long().t()).to(torch.int32)
    return out if dev.type == "cpu" else out.to(dev)


def _amax_rows(x: Tensor) -> Tensor:
    # Measured: abs() + amax is ~15x faster here than vector_norm(inf) or aminmax (one pass but
    # slow reductions); all are exact, so the choice does not change numbers.
    if x.shape[-1] == 0:
        return x.new_zeros((*x.shape[:-1], 1))
    return x.abs().amax(dim=-1, keepdim=True)


def _quantize_rows(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as int8, equal to ``quantize_ref`` with zero point 0."""
    q = torch.div(x, scale)
    q.round_().clamp_(-qmax, qmax)
    return q.to(torch.int8)


def _quantize_per_token_fast(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    qmax = int8_qmax(bits)
    x = x.float()
    scale = _amax_rows(x).div_(qmax).clamp_min_(EPS)
    return _quantize_rows(x, scale, qmax), scale


def _outlier_split_fast(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], inlier_bits: int):
    qmax_in = int8_qmax(inlier_bits)
    x = x.float()
    x_in = x.masked_fill(mask, 0.0)
    x_out = x.masked_fill(~mask, 0.0)
    if inlier_scale is None:
        s_in = _amax_rows(x_in).div_(qmax_in).clamp_min_(EPS)
    else:
        s_in = inlier_scale.float().expand(x.shape[0], 1).clone()
    s_out = _amax_rows(x_out).div_(127).clamp_min_(EPS)
    return _quantize_rows(x_in, s_in, qmax_in), s_in, _quantize_rows(x_out, s_out, 127), s_out


def _float_in_place(acc: Tensor) -> Tensor:
    """int32 -> float32 in the accumulator's own memory (same element size): saves allocating and
    page-faulting a fresh (M, N) buffer, ~7 % of the int8 GEMM op here. Elementwise, each element is
    read before it is overwritten; falls back to a copy if torch refuses the aliasing."""
    if not acc.is_contiguous():
        return acc.float()
    y = acc.view(torch.float32)
    try:
        return y.copy_(acc)
    except RuntimeError:
        return acc.float()


def _epilogue(acc: Tensor, row_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    # Same order as the refs, in place on one float buffer (measured faster than torch.mul(acc,
    # scale) type promotion, and than addcmul, which also rounds differently).
    y = _float_in_place(acc).mul_(row_scale)
    y.mul_(w_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y


def _int8_linear_fast(x_q, x_scale, w_q, w_scale, bias) -> Tensor:
    return _epilogue(_int_mm(x_q, w_q), _row_scale(x_scale, x_q.shape[0]), w_scale, bias)


def _w8a8_linear_fast(x, w_q, w_scale, bias, x_scale) -> Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if x_scale is None:
        x_q, xs = _quantize_per_token_fast(x2, 8)
    else:
        xs = x_scale.float().expand(*lead, 1).reshape(-1, 1)
        x_q = _quantize_rows(x2, xs, 127)
    return _int8_linear_fast(x_q, xs, w_q, w_scale, bias).reshape(*lead, w_q.shape[0])


def _w4a4o8_linear_fast(x, mask, inlier_scale, w_packed, w_scale, bias, k) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float()
    m2 = mask.reshape(-1, k)
    s_static = None if inlier_scale is None else inlier_scale.float().expand(*lead, 1).reshape(-1, 1)
    w = unpack_int4(w_packed, k)
    qmax_in = int8_qmax(_W4A4O8_INLIER_BITS)
    x_in = x2.masked_fill(m2, 0.0)
    s_in = s_static.clone() if s_static is not None else _amax_rows(x_in).div_(qmax_in).clamp_min_(EPS)
    y = _float_in_place(_int_mm(_quantize_rows(x_in, s_in, qmax_in), w)).mul_(s_in)
    # Columns holding an outlier in some row (amax over uint8 is ~30x faster than any(dim=0)).
    cols = m2.view(torch.uint8).amax(dim=0).nonzero().flatten() if x2.shape[0] else m2.new_zeros(0)
    if cols.numel():
        gathered = cols.numel() <= _SPARSE_OUTLIER_MAX_FRACTION * k
        if gathered:
            # Only these columns can be non-zero in q_out: a GEMM over them gives the same integers.
            x_out, w_out = x2[:, cols].masked_fill_(~m2[:, cols], 0.0), w[:, cols]
        else:
            x_out, w_out = x2.masked_fill(~m2, 0.0), w
        s_out = _amax_rows(x_out).div_(127).clamp_min_(EPS)
        q_out = _quantize_rows(x_out, s_out, 127)
        if gathered and cols.numel() <= _FP32_EXACT_MAX_K:
            # Few columns: an fp32 GEMM is exact here (every product and partial sum is an integer
            # of magnitude <= 127 * 8 * K' < 2**24, whatever the summation order) and writes floats
            # directly, saving the int32 -> float pass over (M, N): ~30 % faster than _int_mm.
            acc_out = q_out.float() @ w_out.float().t()
        else:
            acc_out = _float_in_place(_int_mm(q_out, w_out))
        y.add_(acc_out.mul_(s_out))
    # else: q_out == 0, acc_out * s_out == 0 exactly, and y + 0 == y.
    y.mul_(w_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.reshape(*lead, w.shape[0])


# ---------------------------------------------------------------------------------------------
# CUDA: Triton kernels, imported on first use, so this module works where triton is not installed.

def _quantize_per_token_cuda(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    _check_float("x", x)
    from ouromamba_fx.kernels.triton.quantize_rows import quantize_rows
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]), int8_qmax(bits))
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def _outlier_split_cuda(x, mask, inlier_scale, inlier_bits):
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    from ouromamba_fx.kernels.triton.quantize_rows import outlier_split as outlier_split_triton
    s = None if inlier_scale is None else inlier_scale.float().expand(x.shape[0], 1)
    return outlier_split_triton(x, mask, s, int8_qmax(inlier_bits))


def _int8_linear_cuda(x_q, x_scale, w_q, w_scale, bias):
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    from ouromamba_fx.kernels.triton.int8_gemm import int8_gemm
    return int8_gemm(x_q, x_scale, w_q, w_scale, bias)


def _w8a8_linear_cuda(x, w_q, w_scale, bias, x_scale):
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    from ouromamba_fx.kernels.triton.int8_gemm import int8_gemm
    from ouromamba_fx.kernels.triton.quantize_rows import quantize_rows
    lead, k = x.shape[:-1], x.shape[-1]
    xs = None if x_scale is None else x_scale.float().expand(*lead, 1).reshape(-1, 1)
    x_q, xs = quantize_rows(x.reshape(-1, k), 127, xs)
    return int8_gemm(x_q, xs, w_q, w_scale, bias).reshape(*lead, w_q.shape[0])


def _w4a4o8_linear_cuda(x, mask, inlier_scale, w_packed, w_scale, bias, k):
    _check_w4a4o8(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    from ouromamba_fx.kernels.triton.int4_gemm import int4_gemm
    from ouromamba_fx.kernels.triton.quantize_rows import outlier_split as outlier_split_triton
    lead = x.shape[:-1]
    s = None if inlier_scale is None else inlier_scale.float().expand(*lead, 1).reshape(-1, 1)
    q_in, s_in, q_out, s_out = outlier_split_triton(x.reshape(-1, k), mask.reshape(-1, k), s,
                                                    int8_qmax(_W4A4O8_INLIER_BITS))
    y = int4_gemm(q_in, s_in, w_packed, w_scale, bias, q_out, s_out)
    return y.reshape(*lead, w_packed.shape[0])


# ---------------------------------------------------------------------------------------------
# The custom ops. The default implementation (CPU and any non-CUDA device) is the fast host path.

@torch.library.custom_op("ouromamba::quantize_per_token", mutates_args=(),
                         schema="(Tensor x, int bits) -> (Tensor q, Tensor scale)")
def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-row quantization of ``x`` (..., K) to ``bits``; see module docstring."""
    _check_float("x", x)
    int8_qmax(bits)
    return _quantize_per_token_fast(x, bits)


@quantize_per_token.register_fake
def _(x, bits):
    _check_float("x", x)
    int8_qmax(bits)
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))


@torch.library.custom_op("ouromamba::outlier_split", mutates_args=(),
                         schema="(Tensor x, Tensor mask, Tensor? inlier_scale, int inlier_bits) "
                                "-> (Tensor q_in, Tensor s_in, Tensor q_out, Tensor s_out)")
def outlier_split(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor],
                  inlier_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split ``x`` (M, K) into quantized inliers (``inlier_bits``) and 8-bit outliers (``mask``)."""
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    return _outlier_split_fast(x, mask, inlier_scale, inlier_bits)


@outlier_split.register_fake
def _(x, mask, inlier_scale, inlier_bits):
    _check_outlier_split(x, mask, inlier_scale, inlier_bits)
    q = lambda: torch.empty(x.shape, dtype=torch.int8, device=x.device)  # noqa: E731
    s = lambda: torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)  # noqa: E731
    return q(), s(), q(), s()


@torch.library.custom_op("ouromamba::int8_linear", mutates_args=(),
                         schema="(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) "
                                "-> Tensor")
def int8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    """``(x_q @ w_q^T) * x_scale * w_scale + bias`` with an exact int32 product, float32 (M, N)."""
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    return _int8_linear_fast(x_q, x_scale, w_q, w_scale, bias)


@int8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias):
    _check_int8_linear(x_q, x_scale, w_q, w_scale, bias)
    return torch.empty((x_q.shape[0], w_q.shape[0]), dtype=torch.float32, device=x_q.device)


@torch.library.custom_op("ouromamba::w8a8_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? x_scale) "
                                "-> Tensor")
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                x_scale: Optional[Tensor]) -> Tensor:
    """Quantize ``x`` (..., K) to int8 (dynamic per token, or static ``x_scale``), int8 GEMM, dequant."""
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    return _w8a8_linear_fast(x, w_q, w_scale, bias, x_scale)


@w8a8_linear.register_fake
def _(x, w_q, w_scale, bias, x_scale):
    _check_w8a8(x, w_q, w_scale, bias, x_scale)
    return torch.empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32, device=x.device)


@torch.library.custom_op("ouromamba::w4a4o8_linear", mutates_args=(),
                         schema="(Tensor x, Tensor mask, Tensor? inlier_scale, Tensor w_packed, "
                                "Tensor w_scale, Tensor? bias, int k) -> Tensor")
def w4a4o8_linear(x: Tensor, mask: Tensor, inlier_scale: Optional[Tensor], w_packed: Tensor,
                  w_scale: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    """4-bit inliers + 8-bit outliers of ``x`` (..., K) times packed int4 weights, float32 (..., N)."""
    _check_w4a4o8(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    return _w4a4o8_linear_fast(x, mask, inlier_scale, w_packed, w_scale, bias, k)


@w4a4o8_linear.register_fake
def _(x, mask, inlier_scale, w_packed, w_scale, bias, k):
    _check_w4a4o8(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    return torch.empty((*x.shape[:-1], w_packed.shape[0]), dtype=torch.float32, device=x.device)


quantize_per_token.register_kernel("cuda")(_quantize_per_token_cuda)
outlier_split.register_kernel("cuda")(_outlier_split_cuda)
int8_linear.register_kernel("cuda")(_int8_linear_cuda)
w8a8_linear.register_kernel("cuda")(_w8a8_linear_cuda)
w4a4o8_linear.register_kernel("cuda")(_w4a4o8_linear_cuda)
