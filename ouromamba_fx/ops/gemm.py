"""Exact integer GEMMs on the CPU: which kernel computes ``a @ b^T`` for small integers.

``torch._int_mm`` (oneDNN s8 x s8 -> s32) is fast only where the CPU has int8 dot-product
instructions (AVX-512 VNNI, AMX); without them (AVX2-only CPUs such as AMD Zen 2/3, Intel before
Cascade Lake) it runs a reference loop many times slower than an fp32 GEMM of the same shape
(``benchmarks/cpu_latency_avx2.md``). oneDNN's u8 x s8 kernel is fast on those CPUs, but it
multiplies through ``vpmaddubsw``, which adds pairs of u8 x s8 products in *saturating* int16:
exact only while ``2 * max|u| * max|w| <= 32767``.

:func:`mode` says which path runs:

* ``"int_mm"`` -- CPUs with VNNI or AMX, and non-x86 CPUs: ``torch._int_mm``, except, on x86,
  the products of the lowered graph's weights (W8A8 linears and integer convs through
  :func:`decomposed_mm` with ``prepack``, W4A4O8's inlier products), which run on oneDNN's matmul
  with the weight prepacked once (:func:`s8_mm`, :data:`S8_MM_OP`): on a CPU with AMX,
  ``torch._int_mm`` (oneDNN's ``gemm_s8s8s32`` API) stays on AVX-512 VNNI and reorders the weight
  on every call, the prepacked matmul runs on AMX.
* ``"emulated"`` -- x86 CPUs without them. W4A4O8's inlier products (4-bit codes x int4 weights)
  run on this package's own AVX2 kernel where the build has AVX2 and FMA (``u4_mm`` in
  ``kernels/cpu/mixer_ops.cpp``: vpmaddubsw pairs summed in int16, which 4-bit operands cannot
  overflow, so no pair needs widening). Otherwise, products whose operands are small enough
  (activation codes shifted to u8 = q + 128, so ``max|u| = 128 + qmax_a``, against weights of at
  most ``qmax_w`` in magnitude, with ``(128 + qmax_a) * qmax_w <= 16383``: every int4-weight
  product of W4A4O8, 4- or 8-bit activations alike) run on oneDNN u8 x s8 with the weight
  prepacked once (:func:`u8_mm`); the lowered graph's W8A8 products (8-bit codes x 8-bit weights)
  on this package's AVX2 kernel (:func:`s16_mm_op`: int16 pairs through vpmaddwd into int32, the
  weight packed once); everything else as an fp32 GEMM on the integer values, exact because every
  partial sum is an integer below 2^24 (K split into chunks where ``K * qmax_a * qmax_w`` would
  reach it; :func:`float_mm`). Same integers as ``torch._int_mm``, so the same numbers end to end.

The choice is this CPU's by default (``"auto"``). It is an option of the lowered model, not of the
process: :func:`use` sets it for a block (a context variable, so threads and async tasks each see
their own), and ``q.lower(cpu_gemm=...)`` / ``torch.compile(q, backend="ouromamba",
options={"cpu_gemm": ...})`` run their graphs inside ``use(...)``. Both modes give the same numbers;
forcing one serves tests and benchmarks (both paths on one machine).

:func:`exact_int_mm` is what the integer linear ops call: the path of :func:`mode`, with the
shapes ``torch._int_mm`` gets wrong or refuses handled exactly.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import warnings
import weakref
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import Tensor

from ouromamba_fx.kernels.cpu.build import CPU_LIBRARY, MIXER_OPS
from ouromamba_fx.ops.dispatch import on_cuda

MODES = ("int_mm", "emulated")
CHOICES = ("auto",) + MODES
_MODE: ContextVar[str] = ContextVar("ouromamba_cpu_gemm", default="auto")
# u8 x s8 pairs are added in saturating int16 (vpmaddubsw): 2 * max|u| * max|w| <= 32767.
_U8_PAIR_LIMIT = 16383
# fp32 holds every integer below 2^24 exactly.
_FP32_EXACT = 2 ** 24


@functools.lru_cache(maxsize=None)
def _detected() -> str:
    if not _x86():
        return "int_mm"
    probes = ("_is_vnni_supported", "_is_amx_tile_supported")
    fast = any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    return "int_mm" if fast else "emulated"


def check_choice(choice: str) -> str:
    """``choice`` if it is one of :data:`CHOICES` (``auto``, ``int_mm``, ``emulated``), else ``ValueError``."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_gemm={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


_CHOICE_CODES = {"auto": 0, "int_mm": 1, "emulated": 2}


def sync_choice() -> None:
    """Pass this thread's choice on to the C++ kernels of the ops (a thread-local there), once the
    library is loaded; :func:`use` calls it on entry and exit, the library when it loads. Not
    while torch.compile or torch.export trace a ``use`` block: the kernels do not run then, and
    the call would be recorded in the graph."""
    if CPU_LIBRARY.loaded and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        torch.ops.ouromamba_cpu.set_gemm_choice(_CHOICE_CODES[_MODE.get()])


CPU_LIBRARY.on_load.append(sync_choice)


@contextlib.contextmanager
def use(choice: str) -> Iterator[None]:
    """Run the block with the integer GEMM path ``choice`` (``auto``: this CPU's; see the module
    docstring). The ops' C++ kernels follow it too: they read a per-thread copy of the choice
    (:func:`sync_choice`), so a block is honoured by the calls made from its own thread."""
    token = _MODE.set(check_choice(choice))
    sync_choice()
    try:
        yield
    finally:
        _MODE.reset(token)
        sync_choice()


_PREPACK: ContextVar[bool] = ContextVar("ouromamba_prepack", default=True)


@contextlib.contextmanager
def without_prepack() -> Iterator[None]:
    """Trace the block's :func:`decomposed_mm` calls without :data:`S8_MM_OP` (``torch._int_mm``
    instead): for graphs that leave Python, e.g. exported programs, whose loaders and C++ runners
    know the package's serialisable ops but not this Python-only one."""
    token = _PREPACK.set(False)
    try:
        yield
    finally:
        _PREPACK.reset(token)


def mode() -> str:
    """``"int_mm"`` or ``"emulated"``: the path of the current :func:`use` block, else this CPU's."""
    choice = _MODE.get()
    return _detected() if choice == "auto" else choice


def emulated(device: torch.device) -> bool:
    """Whether integer GEMMs on ``device`` take the emulated paths (a CPU in mode ``emulated``)."""
    return device.type == "cpu" and mode() == "emulated"


def describe() -> str:
    """One line for reports and benchmarks: which integer GEMM this CPU runs."""
    m = mode()
    if m == "int_mm":
        if onednn_s8():
            return ("int8 GEMMs: the lowered graph's on oneDNN's matmul with prepacked weights (AMX where the CPU "
                    "has it), other products torch._int_mm (x86 CPU with VNNI/AMX)")
        return "int8 GEMMs: torch._int_mm (CPU with VNNI/AMX, or not x86)"
    avx2 = s16()
    int4 = "this package's AVX2 int4 kernel" if avx2 else "oneDNN u8 x s8"
    int8 = "the lowered graph's on this package's AVX2 int16 kernel, others" if avx2 else ""
    return ("int8 GEMMs: emulated (x86 CPU without VNNI/AMX, where torch._int_mm is a slow reference loop): "
            f"W4A4O8 inlier products on {int4}, 8-bit x 8-bit {int8} as exact fp32 GEMMs").replace("  ", " ")


def u8_exact(qmax_a: int, qmax_w: int) -> bool:
    """Whether oneDNN's u8 x s8 product is exact for activation codes in [-qmax_a, qmax_a] (shifted
    to u8) and weights of magnitude <= qmax_w, on CPUs without VNNI (saturating int16 pairs)."""
    return (128 + qmax_a) * qmax_w <= _U8_PAIR_LIMIT and torch.backends.mkldnn.is_available()


# ---------------------------------------------------------------------------------------------
# Per-weight caches (prepacked oneDNN weights, unpacked int4): keyed by the weight tensor itself,
# dropped when it is freed, rebuilt when it is modified in place.

_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be modified)
        return -1


def cached(key_tensor: Tensor, tag: str, make: Callable[[], object]) -> object:
    """``make()``, computed once per (``key_tensor``, ``tag``) while ``key_tensor`` lives and is not
    modified in place."""
    key = (id(key_tensor), tag)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is key_tensor and hit[1] == _version(key_tensor):
        return hit[2]
    value = make()
    ref = weakref.ref(key_tensor, lambda _r, key=key: _CACHE.pop(key, None))
    _CACHE[key] = (ref, _version(key_tensor), value)
    return value


def cached_pair(key_tensor: Tensor, other: Tensor, tag: str, make: Callable[[], object]) -> object:
    """:func:`cached` for a value made from two tensors: recomputed when either is modified in place
    (an entry of ``other``'s older contents stays until ``key_tensor`` is freed)."""
    return cached(key_tensor, f"{tag}|{id(other)}:{_version(other)}", make)


def cache_size() -> int:
    return len(_CACHE)


def cache_tags(t: Tensor) -> set[str]:
    """The tags of the cache entries kept for ``t``, here and in the C++ kernels' own cache
    (which layouts of a weight the integer linears have made)."""
    tags = {tag for key, (ref, _, _) in list(_CACHE.items()) if key[0] == id(t) and ref() is t for tag in [key[1]]}
    if CPU_LIBRARY.loaded:
        tags |= set(torch.ops.ouromamba_cpu.cached_tags(t))
    return tags


# ---------------------------------------------------------------------------------------------
# Kernels

def _chunked_mm(a: Tensor, b: Tensor, qmax_a: int, qmax_w: int) -> Tensor:
    # float32 when one chunk covers K (every partial sum an integer below 2^24), else int32
    k = a.shape[-1]
    per = max(1, (_FP32_EXACT - 1) // max(1, qmax_a * qmax_w))
    af = a.float()
    bf = b.float()
    if k <= per:
        return af @ bf.t()
    acc = None
    for k0 in range(0, k, per):
        part = (af[:, k0:k0 + per] @ bf[:, k0:k0 + per].t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def float_mm(a: Tensor, b: Tensor, qmax_a: int, qmax_w: int) -> Tensor:
    """``float(a @ b^T)`` (the exact integer sums, then rounded to float32 as ``torch._int_mm(...)
    .float()`` rounds them) for integer-valued ``a`` (M, K) and ``b`` (N, K) (any dtype) of
    magnitudes <= qmax_a / qmax_w: fp32 GEMMs over chunks of K short enough that every partial
    sum is an integer below 2^24 (so exact in any summation order), chunks added in int32 when
    there is more than one. Plain torch (traceable by Inductor)."""
    return _chunked_mm(a, b, qmax_a, qmax_w).float()


def u8_mm(q: Tensor, w: Tensor, key: Tensor) -> Tensor:
    """``q @ w^T`` as float32 for int8 ``q`` (M, K) and int8 ``w`` (N, K) on oneDNN u8 x s8 (``q`` is
    shifted to u8 = q + 128, oneDNN subtracts the zero point's term exactly). Exact only where
    :func:`u8_exact` holds for the operands' ranges: callers check. ``w`` is prepacked once per
    ``key`` (the model's own weight tensor, e.g. its packed int4 form). A uint8 ``q`` is taken as
    already shifted (the codes + 128, as ``mixed_quant`` writes them on request)."""
    q = q.contiguous()
    u = q if q.dtype == torch.uint8 else q.view(torch.uint8) ^ 0x80  # two's complement q + 128
    return _pointwise(u, 128, cached(key, "onednn", lambda: _prepack(w)))


def onednn_s8() -> bool:
    """Whether :func:`s8_mm` can run here: an x86 CPU with torch's oneDNN and its quantized linear ops."""
    return _x86() and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX; any non-x86 CPU counts), where
    oneDNN's s8 x s8 products are exact for the whole int8 range. Without them oneDNN adds u8 x s8
    pairs in saturating int16 (:func:`u8_exact`), so forcing mode ``int_mm`` on such a CPU keeps the
    8-bit products off :func:`s8_mm` (on ``torch._int_mm``: exact, slow)."""
    return _detected() == "int_mm"


@functools.lru_cache(maxsize=None)
def amx() -> bool:
    """Whether this CPU has AMX tiles, where :func:`s8_mm` runs oneDNN's int8 AMX kernel."""
    return _x86() and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def s8_mm(q: Tensor, weight: Callable[[], Tensor], key: Tensor, tag: str = "onednn") -> Tensor:
    """``q @ w^T`` as float32 for int8 ``q`` (M, K) and the int8 weight ``w`` (N, K) that ``weight()``
    makes, on oneDNN's matmul with ``w`` prepacked once per ``key`` (the model's own weight tensor;
    the same cache entry as :func:`u8_mm`'s). Exact as ``torch._int_mm(q, w.t()).float()`` is: int32
    sums (s8 x s8 on AMX; on VNNI oneDNN shifts the activations to u8 and subtracts the shift's
    term in int32), converted to float32 once (every scale 1). On CPUs with AMX this is oneDNN's
    AMX kernel with the weight in its blocked layout, where ``torch._int_mm`` (oneDNN's
    ``gemm_s8s8s32`` API, the weight reordered on every call) runs on AVX-512 VNNI: 2-3x less time
    for Vim-S's in_proj (``benchmarks/ops_cpu.py``). Callers check :func:`onednn_s8`; on CPUs without
    VNNI the s8 x s8 product goes through saturating int16 pairs (see :func:`u8_exact`)."""
    return _pointwise(q.contiguous(), 0, cached(key, tag, lambda: _prepack(weight())))


def weight_operand(w: Tensor, kh: int = 0, block: int = 0) -> Tensor:
    """The int8 (N', K') weight operand a GEMM of the lowering reads from the constant ``w``: ``w``
    itself (``kh == 0``: a linear's (N, K)), or from a conv's kernel rows ``w`` (KH * N, KW * C)
    (``kh`` = KH) the rows of kernel row ``block``, or with ``block == -1`` all kernel rows side by
    side, (N, KH * KW * C)."""
    if kh == 0:
        return w
    n = w.shape[0] // kh
    if block >= 0:
        return w[block * n:(block + 1) * n]
    return w.reshape(kh, n, -1).transpose(0, 1).reshape(n, -1)


@torch.library.custom_op("ouromamba::s8_mm", mutates_args=(), schema="(Tensor q, Tensor w, int kh, int block) -> Tensor")
def s8_mm_op(q: Tensor, w: Tensor, kh: int, block: int) -> Tensor:
    """float32 ``q @ weight_operand(w, kh, block)^T`` for int8 ``q`` on oneDNN's matmul, the operand
    prepacked once per (``w``, ``kh``, ``block``) (:func:`s8_mm`): an opaque op, so that a compiled
    graph calls it with the graph's own weight constant and the prepacked copy is made once."""
    _check_s8(q, w, kh, block)
    return s8_mm(q, lambda: weight_operand(w, kh, block), w, f"onednn:{kh}:{block}" if kh else "onednn")


@s8_mm_op.register_fake
def _(q, w, kh, block):
    _check_s8(q, w, kh, block)
    return q.new_empty((q.shape[0], w.shape[0] // kh if kh else w.shape[0]), dtype=torch.float32)


def _check_s8(q: Tensor, w: Tensor, kh: int, block: int, op: str = "s8_mm") -> None:
    k = w.shape[1] * (kh if kh and block == -1 else 1)
    if q.dim() != 2 or q.dtype != torch.int8 or w.dim() != 2 or w.dtype != torch.int8 or q.shape[1] != k \
            or kh < 0 or (kh and (w.shape[0] % kh or not -1 <= block < kh)):
        raise ValueError(f"ouromamba::{op} expects int8 q (M, K) and int8 w (N, K) (or a conv's KH * N kernel rows with "
                         f"0 <= block < kh or block == -1), got q {q.dtype} {tuple(q.shape)}, w {w.dtype} "
                         f"{tuple(w.shape)}, kh={kh}, block={block}")


S8_MM_OP = torch.ops.ouromamba.s8_mm.default


def s16() -> bool:
    """Whether :func:`s16_mm_op` can run here: the C++ kernels built with AVX2 and FMA."""
    ext = MIXER_OPS.get()
    return ext is not None and bool(ext.u4_available())


# Longest reduction of s16_mm: K products of magnitude <= 128^2 sum to less than 2^31 (int32).
S16_MAX_K = 131071


@torch.library.custom_op("ouromamba::s16_mm", mutates_args=(), schema="(Tensor q, Tensor w, int kh, int block) -> Tensor")
def s16_mm_op(q: Tensor, w: Tensor, kh: int, block: int) -> Tensor:
    """float32 ``q @ weight_operand(w, kh, block)^T`` for int8 ``q`` on this package's AVX2 kernel
    (``s16_mm`` in ``kernels/cpu/mixer_ops.cpp``: int16 pairs multiplied and added into int32 by
    vpmaddwd, exact), the operand packed once per (``w``, ``kh``, ``block``): the W8A8 products of
    the emulated CPU mode (x86 CPUs without VNNI / AMX), where the alternative is an fp32 GEMM of the
    codes. The same numbers as ``torch._int_mm(q, W.t()).float()``. An opaque op, as
    :func:`s8_mm_op`, so that a compiled graph packs its weight constant once."""
    _check_s8(q, w, kh, block, "s16_mm")
    ext = MIXER_OPS.get()
    if ext is None or not ext.u4_available():
        raise RuntimeError("ouromamba::s16_mm needs the C++ kernels built with AVX2 and FMA (gemm.s16() is False "
                           "here); lower the model again on this machine, or with cpu_gemm='int_mm'")
    n = w.shape[0] // kh if kh else w.shape[0]
    packed = cached(w, f"s16:{kh}:{block}" if kh else "s16", lambda: ext.s16_pack(weight_operand(w, kh, block)))
    return ext.s16_mm(q.contiguous(), packed, n)


@s16_mm_op.register_fake
def _(q, w, kh, block):
    _check_s8(q, w, kh, block, "s16_mm")
    return q.new_empty((q.shape[0], w.shape[0] // kh if kh else w.shape[0]), dtype=torch.float32)


S16_MM_OP = torch.ops.ouromamba.s16_mm.default

# Shortest reduction :func:`decomposed_mm` sends to the prepacked matmul. With K <= 16 oneDNN picks
# a kernel 40-400x slower than ``torch._int_mm`` at many rows (a VMamba-T dt_proj, K = 6 and
# 50,176 rows: 2.4 s against 62 ms on an AMX Xeon); from K = 24 up it was as fast or faster.
PREPACK_MIN_K = 32


def _prepack(w: Tensor) -> tuple:
    n = w.shape[0]
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None), torch.ones(n), torch.zeros(n, dtype=torch.long)


def _pointwise(q: Tensor, zp: int, prepacked: tuple) -> Tensor:
    """``q`` (uint8 shifted by ``zp``, or int8 with ``zp`` 0) times a :func:`_prepack` weight, float32."""
    packed, ones, zps = prepacked
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, zp, packed, ones, zps, None, 1.0, 0, torch.float32, "none", [], "")


def int_mm(a: Tensor, b: Tensor, qmax_a: int = 127, qmax_w: int = 127) -> Tensor:
    """Exact int32 ``a @ b^T`` for int8 ``a`` (M, K), ``b`` (N, K) on the CPU by this CPU's fast path:
    ``torch._int_mm`` in mode ``int_mm``, else an exact fp32 GEMM (:func:`float_mm`)."""
    if mode() == "int_mm":
        return torch._int_mm(a, b.t())
    return _chunked_mm(a, b, qmax_a, qmax_w).to(torch.int32)


def cublas_weight_ok(k: int, n: int) -> bool:
    """The weight's part of cuBLAS's ``torch._int_mm`` shape rules: K and N positive multiples of 8
    (Vim-T's x_proj has N = 44, its dt_proj K = 12)."""
    return k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0


def cublas_int_mm_ok(m: int, k: int, n: int) -> bool:
    """Whether cuBLAS's ``torch._int_mm`` takes an (M, K) x (K, N) product: it requires M > 16 and
    :func:`cublas_weight_ok`, and raises otherwise."""
    return m > 16 and cublas_weight_ok(k, n)


def decomposed_mm(q: Tensor, w: Tensor, qmax_a: int, qmax_w: int, kh: int = 0, block: int = 0,
                  prepack: bool = False) -> Tensor:
    """Exact ``float(q @ W^T)`` of integer-valued ``q`` (M, K) (int8 or float codes of magnitude <=
    ``qmax_a``) and the int8 weight operand ``W = weight_operand(w, kh, block)`` (<= ``qmax_w``), in
    plain torch for the decomposed linears and convs of the lowering (Inductor compiles it): with
    ``prepack`` (``w`` is a constant of the graph, not made per call) and K >= :data:`PREPACK_MIN_K`
    on x86 CPUs with VNNI / AMX, oneDNN's matmul on the weight prepacked once (:data:`S8_MM_OP`; AMX
    where the CPU has it, which ``torch._int_mm`` does not use), else ``torch._int_mm``, except in
    the emulated CPU mode (with ``prepack`` and 8-bit operands, this package's AVX2 kernel on the
    weight packed once, :data:`S16_MM_OP`) and, on a GPU (:func:`ouromamba_fx.ops.dispatch.on_cuda`),
    for the shapes cuBLAS refuses (:func:`cublas_int_mm_ok`): there exact fp32 GEMMs of the codes
    (:func:`float_mm`), the same integers. (The lowering sends refused shapes with a long reduction
    to the Triton int8 GEMM.)"""
    m, k = q.shape
    if (prepack and k >= PREPACK_MIN_K and _PREPACK.get() and q.device.type == "cpu" and not emulated(q.device)
            and onednn_s8() and (int8_dot() or u8_exact(qmax_a, qmax_w))):
        return S8_MM_OP(q.to(torch.int8), w, kh, block)
    if (prepack and _PREPACK.get() and q.device.type == "cpu" and emulated(q.device) and qmax_a <= 127
            and k <= S16_MAX_K and s16()):
        return S16_MM_OP(q.to(torch.int8), w, kh, block)
    wo = weight_operand(w, kh, block)
    if emulated(q.device) or (on_cuda(q) and not cublas_int_mm_ok(m, k, wo.shape[0])):
        return float_mm(q, wo, qmax_a, qmax_w)
    return torch._int_mm(q.to(torch.int8), wo.t()).float()


def int_matmul_ref(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` for int8 ``a`` (M, K) and ``b`` (N, K) as int32, computed exactly in int64 on CPU."""
    return (a.cpu().long() @ b.cpu().long().t()).to(torch.int32).to(a.device)


_warned_fallback = False


def exact_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a @ b^T`` for int8 a (M, K), b (N, K), on the CPU (inputs on another device are
    copied there and the result back)."""
    global _warned_fallback
    dev = a.device
    if dev.type != "cpu":
        a, b = a.cpu(), b.cpu()
    try:
        if a.shape[1] == 1:
            # torch._int_mm on CPU returns uninitialised memory for K == 1 (torch 2.14, any M, N > 1);
            # the product is an outer product, exact in int32.
            out = a.to(torch.int32) * b.to(torch.int32).t()
        else:
            # b.t() is a column-major (K, N) view, which oneDNN takes as it is
            out = int_mm(a, b)
    except RuntimeError as e:
        if not _warned_fallback:
            warnings.warn(f"torch._int_mm refused shapes {tuple(a.shape)} x {tuple(b.shape)} ({e}); "
                          "using an exact but slower int64 matmul", RuntimeWarning, stacklevel=2)
            _warned_fallback = True
        out = (a.long() @ b.long().t()).to(torch.int32)
    return out if dev.type == "cpu" else out.to(dev)


def float_in_place(acc: Tensor) -> Tensor:
    """int32 -> float32 in the accumulator's own memory (same element size), which saves allocating
    and page-faulting a fresh (M, N) buffer. Elementwise, each element is read before it is
    overwritten; falls back to a copy if torch refuses the aliasing."""
    if not acc.is_contiguous():
        return acc.float()
    y = acc.view(torch.float32)
    try:
        return y.copy_(acc)
    except RuntimeError:
        return acc.float()
