"""The lowering rules: each rewrites one pattern of the reference quantized graph into fused ops.

A rule is a :class:`~ouromamba_fx.lowering.rewrite.Rule`: a ``match`` that reads a node's
structure and the values of its constant inputs (:mod:`~ouromamba_fx.lowering.patterns`) and a
``build`` that creates the replacement; :class:`~ouromamba_fx.lowering.rewrite.RewritePass` does
the rest. :func:`lowering_rules` lists them in the order they run:

* ``lower_w8a8_linear`` -- ``quantize -> dequantize -> F.linear(., dequantize(w_q))`` with
  symmetric activations (<= 8 bits) and a scale per token (or per tensor) becomes
  :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed` (quantize, ``torch._int_mm``,
  epilogue, in plain torch for Inductor to fuse); with ``int8_inline=False`` the custom ops
  ``ouromamba::w8a8_linear`` (8 bits) or ``ouromamba::int8_linear`` on the kept ``quantize``.
  For a GPU (``target``), a weight whose K or N cuBLAS's ``torch._int_mm`` refuses (not multiples
  of 8) gets the ops (the Triton int8 GEMM), unless K < ``SMALL_K``: so short a reduction stays
  decomposed and runs as an exact float GEMM of the codes (:func:`~ouromamba_fx.ops.gemm.decomposed_mm`,
  which also takes the few-token products, M <= 16, that cuBLAS refuses at run time).
* ``lower_w4a4o8_linear`` -- ``quantize_mixed`` (4-bit inliers, 8-bit outliers, channels last)
  ``-> F.linear(., dequantize(w_q))`` with weights in [-8, 7] becomes, on weights packed two per
  byte, ``ouromamba::w4a4o8_linear_rt`` (outlier rule, split, quantization, int4 GEMM and sparse
  outlier term in one op), or with ``mixed_fused=False`` ``ouromamba::outlier_mask`` +
  :func:`~ouromamba_fx.ops.w4a4o8_linear.w4a4o8_linear_masked_decomposed` (or, with
  ``int4_inline=False`` or, for a GPU, shapes cuBLAS refuses as above, the op
  ``ouromamba::w4a4o8_linear``). Same integers, same epilogue (up to outlier channels sitting
  exactly on the threshold, which the summation order of the mean/std decides).
* ``lower_int8_conv2d`` -- ``quantize -> dequantize -> F.conv2d(., dequantize(w_q))`` (dense,
  ``groups == 1``) with a symmetric activation scale per image row or per tensor becomes
  :func:`~ouromamba_fx.ops.int8_conv2d.int8_conv2d_decomposed` (int8 im2col per kernel row and
  ``torch._int_mm``, or the exact fp32 GEMMs of the codes on CPUs without VNNI / AMX). Only where
  it is the faster path: one kernel row's reduction ``KW * C`` of at least ``conv2d_min_k``
  (default :data:`~ouromamba_fx.ops.int8_conv2d.MIN_ROW_K`; below, im2col and the per-row epilogue cost
  more than the int8 GEMM saves: stems, narrow stages). Depthwise / grouped convs (VMamba's SS2D
  conv) stay float convs on the dequantized weights; for a GPU (``target``) every conv2d does
  (no Triton integer conv kernel). Each kept conv is counted in the rule's log lines with its
  reason.
* ``lower_integer_scan`` -- ``dequantize`` of delta/B/C into ``ouromamba::selective_scan`` (or
  ``selective_scan_q``) becomes ``ouromamba::selective_scan_qi`` on the int8 codes.
* ``channels_last_scan`` -- ``ouromamba::selective_scan`` feeding only lowered linears (through
  elementwise ops and the transpose to (batch, L, d_inner)) becomes ``ouromamba::selective_scan_cl``,
  the same output in channel-contiguous memory: the transposed tensor the linear reads is then
  contiguous (the W4A4O8 linear's outlier pass would otherwise gather each token's channels
  across time-contiguous rows). With ``fast_decay`` its decays use the degree-4 exp2 (relative
  error under 2.9e-6 per decay instead of 2 ulp; one multiply-add of about twelve per state update
  on AVX-512).
* ``lower_conv1d_silu`` -- ``[flip ->] quantize -> dequantize -> conv1d (depthwise, causal
  padding) -> [..., :L] -> silu`` becomes ``ouromamba::causal_conv1d_silu`` (one pass, input
  quantization fused, the flip read backwards instead of copied, channel-contiguous output).
* ``fuse_conv_codes`` -- that conv feeding, through its transpose to (batch, L, d_inner), a
  decomposed int8 linear (x_proj: :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed`
  with a static scale per token or per tensor, int8 range) becomes
  ``ouromamba::causal_conv1d_silu_codes``, which also writes the linear's input codes, and
  :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_codes` on them: the same numbers bit
  for bit, without the quantize pass over the conv's output (the scan still reads the floats).
  CPU targets only (lowering option ``conv_codes``).
* ``fuse_in_proj_epilogue`` -- a decomposed int8 linear (in_proj) whose output, transposed to
  (batch, N, L) and chunked in two halves along the channels, feeds with its first half (x) only
  the mixer's convs (``causal_conv1d_silu`` / ``_codes``, either direction) becomes
  :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_acc` (no epilogue): the convs take
  the raw accumulator with the row scale, the x half's weight scales and bias and apply the
  epilogue as they load it (their ``in_scale`` / ``in_wscale`` / ``in_bias``), and the second half
  (z) gets the epilogue alone (:func:`~ouromamba_fx.ops.int8_linear.int8_linear_epilogue_t`, a
  pass over half the tensor). The same numbers bit for bit. CPU targets only (lowering option
  ``inproj_epilogue``).
* ``fuse_z_epilogue`` -- that z half's epilogue read only by scans as their gate ``z``
  (``selective_scan_dt`` / ``selective_scan_cl``, either direction: it runs after
  ``reverse_scan_gate``) goes too: the scans take the raw accumulator half with the row scale, the
  z half's weight scales and bias (their ``z_scale`` / ``z_wscale`` / ``z_bias``) and apply the
  epilogue as they load z, the same numbers bit for bit. Where another op reads it the epilogue
  stays, and the log says so (lowering option ``inproj_epilogue``).
* ``inline_fake_quant`` -- any quantize/dequantize pair still left (in front of float ops)
  becomes :func:`~ouromamba_fx.ops.quant.fake_quantize`, and a ``quantize`` kept for its
  integers (feeding ``selective_scan_qi`` or ``int8_linear``) becomes ``quantize_ref``: plain
  torch with the same formula, which Inductor fuses into the kernel producing its input.
* ``inline_mixed_fake_quant`` -- ``quantize_mixed`` sites left (feeding float ops) become the
  one-pass ``ouromamba::mixed_fake_quant`` (8-bit outliers), else ``ouromamba::outlier_mask`` +
  :func:`~ouromamba_fx.ops.mixed.mixed_fake_quant_decomposed`.
* ``fuse_dt_scan`` -- a float scan whose delta is ``fake_quantize(int8_linear_decomposed(dt_in,
  ...).transpose(1, 2))`` (W8A8's dt_proj, Vim / Mamba mixers), the linear and the fake quantization
  used by nothing else, becomes ``ouromamba::selective_scan_dt``: the scan computes that delta
  itself from ``dt_in`` (the x_proj output's columns), the same numbers bit for bit, without the
  short-reduction GEMM and the epilogue pass over a (batch, L, d_inner) tensor in between. CPU
  targets only (lowering option ``dt_scan``).
* ``reverse_scan_gate`` -- ``selective_scan_dt`` or ``selective_scan_cl`` whose gate ``z`` is
  ``x.flip(-1)`` reads ``x`` time-reversed instead (``z_reverse``): the flipped copy is not made
  (lowering option ``scan_combine``).
* ``fuse_scan_combine`` -- a bidirectional (Vim) mixer's ``int8_linear_decomposed(((y_f +
  y_b.flip(-1)) / 2).transpose(1, 2))`` (out_proj), y_b a ``selective_scan_dt`` and nothing else
  reading the pieces, becomes the backward scan with ``combine=y_f``, which writes out_proj's int8
  input codes (batch, L, d_inner) with the graph's float operations in their order (the same
  codes), and :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_codes` on them: the
  flipped output, the mean and the quantization pass over two (batch, d_inner, L) float tensors
  are gone. Lowering option ``scan_combine``; on CUDA targets (no ``selective_scan_dt`` there) the
  plain-torch flip, mean and quantization stay, and the log says so.
* ``fuse_linear_mixed_fake_quant`` -- ``mixed_fake_quant`` of a short-reduction
  ``w4a4o8_linear_rt`` (Vim's dt_proj feeding the scan's delta) becomes
  ``ouromamba::w4a4o8_linear_mixed``, one pass per row.
* ``fold_weight_dequant`` -- ``dequantize`` of a constant weight (conv1d, or a linear no rule
  took) is computed once into a float constant (the same numbers).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.fx as fx
import torch.nn.functional as F

from ouromamba_fx.lowering.patterns import (CONV1D_TARGETS, CONV2D_TARGETS, LINEAR_TARGETS, all_zero, arg, bias_ok,
                                            const, const_weight, const_weight_any, elementwise,
                                            flip_last, is_call, linear_parts, ndim, pair, qdq_source, single,
                                            swaps_last_two, transpose_dims)
from ouromamba_fx.lowering.rewrite import Built, Match, Pattern, Rule, new_const
from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.conv1d_silu import CONV1D_SILU_CODES_OP, CONV1D_SILU_OP
from ouromamba_fx.ops.int4 import pack_int4
from ouromamba_fx.ops.int8_conv2d import MIN_ROW_K, conv_weight_rows, int8_conv2d_decomposed
from ouromamba_fx.ops.int8_linear import (INT8_LINEAR_OP, W8A8_LINEAR_OP, int8_linear_codes, int8_linear_decomposed,
                                         int8_linear_decomposed_acc, int8_linear_decomposed_codes,
                                         int8_linear_epilogue_t)
from ouromamba_fx.ops.mixed import (MIXED_FAKE_QUANT_OP, OUTLIER_MASK_OP, QUANTIZE_MIXED_OP,
                                    mixed_fake_quant_decomposed)
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP, dequantize_ref, fake_quantize, quantize_ref
from ouromamba_fx.ops.scan import SCAN_CHANNELS_LAST_OP, SCAN_DT_OP, SCAN_OP
from ouromamba_fx.ops.scan_quant import SCAN_INT8_INPUTS_OP, SCAN_REPARAM_OP
from ouromamba_fx.ops.w4a4o8_linear import (SMALL_K, W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP, W4A4O8_MASKED_OP,
                                            w4a4o8_linear_masked_decomposed)
from ouromamba_fx.passes.spec import ActSpec
from ouromamba_fx.tags import ABSORBED, SPEC, Kind, absorb_site, carry_spec


@dataclass(frozen=True)
class LoweringOptions:
    """Which rules run and what they emit (the ``options=`` keys of ``torch.compile(q,
    backend="ouromamba")`` and of ``q.lower()``; see :func:`ouromamba_fx.lowering.lower.lowering_passes`)."""

    conv_silu: bool = True
    int8_conv2d: bool = True
    # dense conv2d run as integer GEMMs from this reduction per kernel row (KW * C) on; 0: all
    conv2d_min_k: int = MIN_ROW_K
    integer_scan: bool = False
    int8_inline: bool = True
    int4_inline: bool = True
    mixed_fused: bool = True
    scan_cl: bool = True
    # the channel-contiguous scans compute their decays with the degree-4 exp2 (see
    # ouromamba::selective_scan_cl); only where scan_cl rewrote the scan. Off: its agreement with
    # the reference graph was below the 99.5 % target (benchmarks/lowering_agreement.md)
    fast_decay: bool = False
    # W8A8's dt_proj and the fake quantization of delta computed inside the scan
    # (ouromamba::selective_scan_dt); CPU targets only
    dt_scan: bool = True
    # the mixer's conv also writes x_proj's int8 input codes (ouromamba::causal_conv1d_silu_codes);
    # CPU targets only, and only where conv_silu made the conv an op
    conv_codes: bool = True
    # a bidirectional mixer's backward scan reads z reversed (selective_scan_dt / _cl), and a
    # selective_scan_dt emits out_proj's int8 input codes (the flips, the mean and the quantization
    # pass gone); the codes where dt_scan fused, so CPU only
    scan_combine: bool = True
    # in_proj's epilogue applied by the convs as they load its x half and by the scans as they load
    # its z half (else alone on it); CPU targets only, and only where conv_silu made the convs ops
    inproj_epilogue: bool = True
    target: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in (bool, "bool") and type(getattr(self, f.name)) is not bool:
                raise ValueError(f"lowering option {f.name}={getattr(self, f.name)!r}: expected True or False")
        if type(self.conv2d_min_k) is not int or self.conv2d_min_k < 0:
            raise ValueError(f"lowering option conv2d_min_k={self.conv2d_min_k!r}: expected an int >= 0")
        if self.target not in TARGETS:
            raise ValueError(f"lowering option target={self.target!r}: expected one of {', '.join(TARGETS)}")


#: Devices the lowering can target: ``auto`` is the device of the graph's weights.
TARGETS = ("auto", "cpu", "cuda")


def _for_gpu(target: str, weight) -> bool:
    return target == "cuda" or (target == "auto" and weight.is_cuda)


def _inline_product(target: str, wq) -> bool:
    """Whether the plain-torch product of the decomposed linears serves this int8 weight (N, K):
    K >= 2 (``torch._int_mm`` on the CPU is wrong for K == 1) and, for a GPU, a K and N that cuBLAS
    takes, or a K short enough (< ``SMALL_K``) for the exact float GEMM the product falls back to."""
    n, k = wq.shape
    if k < 2:
        return False
    return not _for_gpu(target, wq) or gemm.cublas_weight_ok(k, n) or k < SMALL_K


def _mixed_args(node: fx.Node) -> tuple:
    """(x, inlier scale, token axis, channel axis, bits, outlier bits, k, n_refresh) of a
    ``quantize_mixed`` or ``mixed_fake_quant`` node."""
    return tuple(node.args[:8])


# ---------------------------------------------------------------------------------------------
# lower_w8a8_linear

def _match_w8a8(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if not is_call(node, LINEAR_TARGETS):
        return None
    x_dq, w_dq, b = linear_parts(node)
    src, w = qdq_source(gm, x_dq), const_weight(gm, w_dq)
    if src is None or w is None or not bias_ok(gm, b):
        return None
    q, s_n, z_n, qmin, qmax = src
    s, z = const(gm, s_n), const(gm, z_n)
    # symmetric, zero points 0, one scale per row (per token or per tensor)
    if s is None or not all_zero(z) or qmin != -qmax or qmax > 127:
        return None
    if s.numel() != 1 and s.shape[-1] != 1:
        return None
    return Match(node, dict(q=q, s_n=s_n, qmin=qmin, qmax=qmax, w=w, b=b))


def _build_w8a8(inline_option: bool, target: str):
    def build(gm: fx.GraphModule, m: Match, state: dict) -> Built:
        q, s_n, qmin, qmax, b = (m.fields[k] for k in ("q", "s_n", "qmin", "qmax", "b"))
        wq_n, wq, ws = m.fields["w"]
        ws_n = new_const(gm, f"{wq_n.target}_wscale", ws.clone(), m.anchor)
        inline = inline_option and _inline_product(target, wq)
        if inline:
            new = gm.graph.call_function(int8_linear_decomposed, (q.args[0], s_n, qmin, qmax, wq_n, ws_n, b))
        elif qmax == 127:
            new = gm.graph.call_function(W8A8_LINEAR_OP, (q.args[0], wq_n, ws_n, b, s_n))
        else:  # fewer bits: keep the quantize node's integers, int8 GEMM on them
            new = gm.graph.call_function(int8_linear_codes, (q, s_n, wq_n, ws_n, b))
        op = "int8_linear_decomposed" if inline else "w8a8_linear" if qmax == 127 else "int8_linear"
        return Built(new, ((m.anchor, new, dict(kind=Kind.FUSED, op=op, act_bits=qmax.bit_length() + 1)),),
                     keep_tensor_meta=True)
    return build


# ---------------------------------------------------------------------------------------------
# lower_w4a4o8_linear

def _match_w4a4o8(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if not is_call(node, LINEAR_TARGETS):
        return None
    x_mq, w_dq, b = linear_parts(node)
    w = const_weight(gm, w_dq)
    if not is_call(x_mq, QUANTIZE_MIXED_OP) or w is None or not bias_ok(gm, b):
        return None
    x, _, token_axis, channel_axis, bits, obits, _, _ = _mixed_args(x_mq)
    wq = w[1]
    # Channels must be the last axis (the one F.linear contracts) and, for the detecting op, which
    # reads x as (..., L, C), time-steps the second-to-last. The site's axes are positive (fixed by
    # the observer); they are read against the rank the graph records or, in a graph without
    # shapes, against the axes the annotate pass gave the linear's input (counted from the end:
    # (B, L, C) Vim tokens and (B, H, W, C) VMamba / Linear2d pixels alike).
    rank, given = ndim(x), _linear_input_axes(node)
    if rank is not None:
        last, steps_ok = channel_axis in (-1, rank - 1), token_axis in (-2, rank - 2)
    elif given is not None:
        last, steps_ok = given[1] == -1, given[0] == -2
    else:
        last, steps_ok = channel_axis == -1 or (token_axis, channel_axis) == (1, 2), token_axis in (-2, 1)
    if bits != 4 or obits != 8 or not last or int(wq.min()) < -8 or int(wq.max()) > 7:
        return None
    return Match(node, dict(x_mq=x_mq, w=w, b=b, steps_ok=steps_ok))


def _linear_input_axes(node: fx.Node) -> tuple[int, int] | None:
    """(token axis, channel axis) the annotate pass gave a linear's input (its site spec), or None
    (a graph the pipeline did not annotate, e.g. Dynamo's, which records shapes instead)."""
    spec = node.meta.get(SPEC)
    a = spec.inputs[0] if spec is not None and spec.inputs else None
    return (a.token_axis, a.channel_axis) if isinstance(a, ActSpec) else None


def _build_w4a4o8(fused: bool, inline_option: bool, target: str):
    def build(gm: fx.GraphModule, m: Match, state: dict) -> Built:
        x_mq, b = m.fields["x_mq"], m.fields["b"]
        x, s_n, token_axis, channel_axis, bits, _, k, n_refresh = _mixed_args(x_mq)
        wq_n, wq, ws = m.fields["w"]
        packed = state.setdefault("packed", {})  # one packed weight per weight, however many uses
        if wq_n.target not in packed:
            packed[wq_n.target] = new_const(gm, f"{wq_n.target}_int4", pack_int4(wq), x_mq)
        wp_n = packed[wq_n.target]
        ws_n = new_const(gm, f"{wq_n.target}_wscale", ws.clone(), m.anchor)
        if fused and m.fields["steps_ok"]:
            new = gm.graph.call_function(W4A4O8_DETECT_OP, (x, s_n, wp_n, ws_n, b, int(wq.shape[1]), float(k),
                                                            n_refresh))
            return Built(new, ((m.anchor, new, dict(kind=Kind.FUSED, op="w4a4o8_linear_rt")),))
        mask = gm.graph.call_function(OUTLIER_MASK_OP, (x, s_n, token_axis, channel_axis, bits, float(k), n_refresh))
        mask_n, step_n = (gm.graph.call_function(operator.getitem, (mask, i)) for i in (0, 1))
        inline = inline_option and _inline_product(target, wq)
        fn = w4a4o8_linear_masked_decomposed if inline else W4A4O8_MASKED_OP
        new = gm.graph.call_function(fn, (x, mask_n, step_n, wp_n, ws_n, b, int(wq.shape[1])))
        op = getattr(fn, "__name__", "w4a4o8_linear")
        return Built(new, ((x_mq, mask, dict(kind=Kind.OUTLIER_MASK)), (m.anchor, new, dict(kind=Kind.FUSED, op=op))))
    return build


# ---------------------------------------------------------------------------------------------
# lower_int8_conv2d

def _conv2d_args(node: fx.Node) -> tuple:
    """(stride, padding, dilation, groups) of an ``F.conv2d`` call, defaults filled in."""
    return (arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1),
            arg(node, 6, "groups", 1))


def _match_int8_conv2d(target: str, min_k: int):
    def match(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
        if not is_call(node, CONV2D_TARGETS):
            return None
        src = qdq_source(gm, arg(node, 0, "input"))
        w = const_weight(gm, arg(node, 1, "weight"), dim=4)
        b = arg(node, 2, "bias")
        if src is None or w is None:
            return None
        notes = state.setdefault("notes", Counter())
        stride, padding, dilation, groups = _conv2d_args(node)
        if groups != 1:
            notes["kept float: grouped / depthwise conv2d (groups > 1), a float conv on the dequantized "
                  "weights (no integer kernel: a depthwise conv's few products per output are no GEMM)"] += 1
            return None
        if _for_gpu(target, w[1]):
            notes["kept float for CUDA: no Triton integer conv2d kernel; a float conv on the dequantized "
                  "weights"] += 1
            return None
        q, s_n, z_n, qmin, qmax = src
        s, z = const(gm, s_n), const(gm, z_n)
        per_row = s is not None and s.dim() == 4 and s.shape[0] == s.shape[1] == s.shape[3] == 1
        sym = s is not None and all_zero(z) and qmin == -qmax and qmax <= 127
        sp, pp, dp = pair(stride), pair(padding), pair(dilation)
        if not sym or not (s.numel() == 1 or per_row) or None in (sp, pp, dp) or not bias_ok(gm, b):
            notes["kept float: an activation quantizer (asymmetric, or a scale neither per row nor per "
                  "tensor) or padding mode the integer conv2d does not take"] += 1
            return None
        n, c, kh, kw = w[1].shape
        if kw * c < min_k:
            notes[f"kept float: one kernel row's reduction KW * C = {kw * c} < conv2d_min_k = {min_k} (there the "
                  f"float conv is the faster path)"] += 1
            return None
        return Match(node, dict(q=q, s_n=s_n, qmin=qmin, qmax=qmax, w=w, b=b, geom=((kh, kw), sp, pp, dp)))
    return match


def _build_int8_conv2d(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    q, s_n, qmin, qmax, b, geom = (m.fields[k] for k in ("q", "s_n", "qmin", "qmax", "b", "geom"))
    wq_n, wq, ws = m.fields["w"]
    wr_n = new_const(gm, f"{wq_n.target}_rows", conv_weight_rows(wq), m.anchor)
    ws_n = new_const(gm, f"{wq_n.target}_wscale", ws.clone(), m.anchor)
    new = gm.graph.call_function(int8_conv2d_decomposed, (q.args[0], s_n, qmin, qmax, wr_n, ws_n, b, *geom))
    return Built(new, ((m.anchor, new, dict(kind=Kind.FUSED, op="int8_conv2d_decomposed",
                                            act_bits=qmax.bit_length() + 1)),), keep_tensor_meta=True)


# ---------------------------------------------------------------------------------------------
# lower_integer_scan

_SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")
_REPARAM_ARGS = ("r_c", "r_l", "r_n", "state_scale", "state_bits")


def _match_integer_scan(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if not is_call(node, (SCAN_OP, SCAN_REPARAM_OP)):
        return None
    names = _SCAN_ARGS + (_REPARAM_ARGS if node.target is SCAN_REPARAM_OP else ())
    v = dict(zip(names, node.args))
    v.update(node.kwargs)
    v.setdefault("delta_bias", None)
    v.setdefault("delta_softplus", False)
    ins = {}
    for key in ("delta", "B", "C"):
        src = qdq_source(gm, v[key])
        ins[key] = (src[0], src[1], src[2]) if src is not None else (v[key], None, None)
    if all(z is None for _, _, z in ins.values()):
        return None
    return Match(node, dict(v=v, ins=ins))


def _build_integer_scan(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    v, ins = m.fields["v"], m.fields["ins"]
    factors = tuple(v.get(k) for k in _REPARAM_ARGS[:4]) + (int(v.get("state_bits", 16)),)
    args = (v["u"], *ins["delta"], v["A"], *ins["B"], *ins["C"], v.get("D"), v.get("z"), v["delta_bias"],
            v["delta_softplus"], *factors)
    new = gm.graph.call_function(SCAN_INT8_INPUTS_OP, args)
    return Built(new, ((m.anchor, new, dict(kind=Kind.FUSED, op="selective_scan_qi")),))


# ---------------------------------------------------------------------------------------------
# channels_last_scan

_LOWERED_LINEARS = (W4A4O8_DETECT_OP, W4A4O8_MASKED_OP, W8A8_LINEAR_OP, INT8_LINEAR_OP, int8_linear_decomposed)


def _only_feeds_lowered_linears(scan: fx.Node) -> bool:
    todo, seen = [scan], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if elementwise(user):
                todo.append(user)
            elif swaps_last_two(user) and user.args[0] is node:
                if not user.users or not all(is_call(u, _LOWERED_LINEARS) and u.args[0] is user for u in user.users):
                    return False
            else:
                return False
    return True


def _match_channels_last_scan(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if is_call(node, SCAN_OP) and node.users and _only_feeds_lowered_linears(node):
        return Match(node)
    return None


def _build_channels_last_scan(fast_decay: bool):
    def build(gm: fx.GraphModule, m: Match, state: dict) -> Built:
        m.anchor.target = SCAN_CHANNELS_LAST_OP  # same arguments, same numbers, another output layout
        if fast_decay:
            m.anchor.kwargs = {**m.anchor.kwargs, "fast_decay": True}
        return Built(None)
    return build


# ---------------------------------------------------------------------------------------------
# fuse_dt_scan

def _int8_range(*bounds) -> bool:
    return all(isinstance(v, int) and -128 <= v <= 127 for v in bounds)


def _match_dt_scan(target: str):
    def match(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
        if not is_call(node, (SCAN_OP, SCAN_CHANNELS_LAST_OP)):
            return None
        v = dict(zip(_SCAN_ARGS + ("fast_decay",), node.args))
        v.update(node.kwargs)
        fq = v.get("delta")
        if not is_call(fq, fake_quantize) or len(fq.users) != 1 or len(fq.args) != 5:
            return None
        tr, ds_n, dz_n, dqmin, dqmax = fq.args
        if not (isinstance(tr, fx.Node) and swaps_last_two(tr) and len(tr.users) == 1):
            return None
        lin = tr.args[0]
        if not is_call(lin, int8_linear_decomposed) or len(lin.users) != 1 or len(lin.args) != 7:
            return None
        x, s_n, qmin, qmax, wq_n, ws_n, b = lin.args
        wq = const(gm, wq_n)
        # (ranks: the scan takes only a (batch, d_inner, L) delta, so the linear's output, transposed
        # into it, is (batch, L, d_inner) and its input x (batch, L, dt_rank))
        if wq is None or wq.dtype != torch.int8 or wq.dim() != 2:
            return None
        if not _int8_range(qmin, qmax, dqmin, dqmax) or not isinstance(ds_n, fx.Node) or \
                not isinstance(dz_n, fx.Node):
            return None
        if _for_gpu(target, wq):
            state.setdefault("notes", Counter())["kept for CUDA: the Triton scan reads delta (no fused dt_proj "
                                                 "kernel there)"] += 1
            return None
        dt = (x, s_n, qmin, qmax, wq_n, ws_n, b, ds_n, dz_n, dqmin, dqmax)
        return Match(node, dict(v=v, dt=dt, lin=lin), erase=(fq, tr, lin))
    return match


def _build_dt_scan(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    v, dt = m.fields["v"], m.fields["dt"]
    args = (v["u"], *dt, v["A"], v["B"], v["C"], v.get("D"), v.get("z"), v.get("delta_bias"),
            bool(v.get("delta_softplus", False)))
    kwargs = {"channels_last": m.anchor.target is SCAN_CHANNELS_LAST_OP}
    if v.get("fast_decay", False):
        kwargs["fast_decay"] = True
    new = gm.graph.call_function(SCAN_DT_OP, args, kwargs)
    absorb_site(m.fields["lin"], new)  # the dt_proj's row of the report stays, on the scan
    return Built(new, ((m.anchor, new, dict(kind=Kind.FUSED, op="selective_scan_dt")),))


# ---------------------------------------------------------------------------------------------
# reverse_scan_gate, fuse_scan_combine: the bidirectional (Vim) mixer's flips and out_proj's
# quantization done by its backward scan

# the position of z in the arguments of the scans that take z_reverse
_Z_ARG = {SCAN_DT_OP: 16, SCAN_CHANNELS_LAST_OP: 6}


def _match_reversed_gate(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    """``selective_scan_dt`` / ``selective_scan_cl`` with ``z=x.flip(-1)``: the scan reads ``x``
    time-reversed instead."""
    if not is_call(node, tuple(_Z_ARG)) or node.kwargs.get("z_reverse", False) or len(node.args) <= _Z_ARG[node.target]:
        return None
    z = node.args[_Z_ARG[node.target]]
    return Match(node, dict(z=z)) if flip_last(z) and ndim(z.args[0]) in (3, None) else None


def _build_reversed_gate(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    node = m.anchor
    args = list(node.args)
    args[_Z_ARG[node.target]] = m.fields["z"].args[0]
    node.args = tuple(args)  # the flip, now unread here, goes with the cleanup if nothing else reads it
    node.kwargs = {**node.kwargs, "z_reverse": True}
    return Built(None)


_ADD_TARGETS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
_DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide, torch.ops.aten.div.Tensor)


def _same_shape(a: fx.Node, b: fx.Node) -> bool | None:
    """Whether two nodes' recorded values have the same shape; None where a graph records none."""
    shapes = []
    for n in (a, b):
        v = next((n.meta[k] for k in ("val", "example_value") if isinstance(n.meta.get(k), torch.Tensor)), None)
        tm = n.meta.get("tensor_meta")
        shapes.append(tuple(v.shape) if v is not None else tuple(tm.shape) if hasattr(tm, "shape") else None)
    return None if None in shapes else shapes[0] == shapes[1]


def _match_scan_combine(target: str):
    def match(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
        """``int8_linear_decomposed(((y_f + y_b.flip(-1)) / 2).transpose(1, 2), ...)`` (out_proj of a
        bidirectional mixer; the addition in either order) where y_b is a ``selective_scan_dt`` and
        y_b, its flip, the sum, the mean and the transpose have no other use."""
        if not is_call(node, int8_linear_decomposed) or len(node.args) != 7:
            return None
        tr, s_n, qmin, qmax = node.args[:4]
        if not (isinstance(tr, fx.Node) and swaps_last_two(tr) and len(tr.users) == 1 and tr.args[0] is not None):
            return None
        div = tr.args[0]
        if not is_call(div, _DIV_TARGETS) or len(div.args) != 2 or div.kwargs or len(div.users) != 1:
            return None
        add, two = div.args
        if isinstance(two, bool) or not isinstance(two, (int, float)) or two != 2:
            return None
        if not is_call(add, _ADD_TARGETS) or len(add.args) != 2 or add.kwargs or len(add.users) != 1:
            return None
        flips = [a for a in add.args if flip_last(a) and len(a.users) == 1]
        if not flips:
            return None
        fl = flips[0]
        yf = add.args[1] if add.args[0] is fl else add.args[0]
        yb = fl.args[0]
        if not isinstance(yf, fx.Node) or not isinstance(yb, fx.Node) or len(yb.users) != 1:
            return None
        if is_call(yb, (SCAN_OP, SCAN_CHANNELS_LAST_OP)) and _for_gpu(target, const(gm, node.args[4])):
            state.setdefault("notes", Counter())["kept for CUDA: the Triton scan writes its float output (the "
                                                 "flip, mean and quantization stay plain torch)"] += 1
            return None
        if not is_call(yb, SCAN_DT_OP) or yb.kwargs.get("combine") is not None:
            return None
        s = const(gm, s_n)
        if not _int8_range(qmin, qmax) or qmin >= qmax or s is None or s.dim() > 3 or (s.dim() and s.shape[-1] != 1):
            return None
        # y_f must have y_b's shape (the op reads it as (batch, d_inner, L)): the recorded shapes,
        # or, in a graph without shapes, y_f another scan's output
        same = _same_shape(yf, yb)
        if same is False or (same is None and not is_call(yf, (SCAN_OP, SCAN_CHANNELS_LAST_OP, SCAN_DT_OP))):
            return None
        return Match(node, dict(yf=yf, yb=yb), erase=(tr, div, add, fl, yb))
    return match


def _build_scan_combine(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    lin, yf, yb = m.anchor, m.fields["yf"], m.fields["yb"]
    _, s_n, qmin, qmax, wq_n, ws_n, b = lin.args
    codes = gm.graph.call_function(SCAN_DT_OP, yb.args, {**yb.kwargs, "combine": yf, "code_scale": s_n,
                                                         "code_qmin": qmin, "code_qmax": qmax})
    if ABSORBED in yb.meta:
        codes.meta[ABSORBED] = yb.meta[ABSORBED]  # (the dt_proj the scan computes)
    new = gm.graph.call_function(int8_linear_decomposed_codes, (codes, s_n, max(-qmin, qmax), wq_n, ws_n, b))
    return Built(new, ((yb, codes, dict(kind=Kind.FUSED, op="selective_scan_dt")),
                       (lin, new, dict(kind=Kind.FUSED, op="int8_linear_decomposed_codes"))), keep_tensor_meta=True)


# ---------------------------------------------------------------------------------------------
# lower_conv1d_silu

def _match_conv1d_silu(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if not is_call(node, F.silu) or not is_call(node.args[0], operator.getitem):
        return None
    sl = node.args[0]
    conv, index = sl.args
    if not is_call(conv, CONV1D_TARGETS) or len(conv.users) != 1 or len(sl.users) != 1:
        return None
    stride, padding, dilation, groups = (tuple(conv.args[3:7]) + (1, 0, 1, 1)[len(conv.args) - 3:])[:4]
    w = const_weight_any(gm, arg(conv, 1, "weight"))
    if w is None or w.dim() != 3 or w.shape[1] != 1 or groups != w.shape[0]:
        return None
    taps = w.shape[-1]
    if single(stride) != 1 or single(dilation) != 1 or single(padding) != taps - 1:
        return None
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
            and index[1] == slice(None, -(taps - 1), None)):
        return None
    return Match(node, dict(conv=conv, w=w), erase=(sl, conv))


def _build_conv1d_silu(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    conv, w = m.fields["conv"], m.fields["w"]
    x_in, b_in = conv.args[0], arg(conv, 2, "bias")
    src = qdq_source(gm, x_in)
    w_n = new_const(gm, f"{conv.name}_weight_f", w.contiguous(), m.anchor)
    if src is not None:
        q, s_n, z_n, qmin, qmax = src
        x_src, qargs = q.args[0], (s_n, z_n, qmin, qmax)
    else:
        x_src, qargs = x_in, (None, None, -127, 127)
    # conv(fq(flip(x))) reads x backwards inside the op: flip(x) is never materialised
    reverse = flip_last(x_src)
    if reverse:
        x_src = x_src.args[0]
    new = gm.graph.call_function(CONV1D_SILU_OP, (x_src, w_n, b_in, *qargs, reverse))
    return Built(new, ((conv, new, dict(kind=Kind.FUSED, op="causal_conv1d_silu")),))


# ---------------------------------------------------------------------------------------------
# fuse_conv_codes

def _per_token_scale(s) -> bool:
    """A static scale that int8_linear_decomposed broadcasts to (batch, L, 1) with one value per
    time step (or one in all): one element, or (..., L, 1) with ones in front (Vim's (1, L, 1)).
    (L itself is checked by the op at run time: 1 or L values.)"""
    return s is not None and s.dtype.is_floating_point and \
        (s.numel() == 1 or (s.dim() >= 2 and s.shape[-1] == 1 and all(d == 1 for d in s.shape[:-2])))


def _match_conv_codes(target: str):
    def match(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
        if not is_call(node, int8_linear_decomposed) or len(node.args) != 7 or node.kwargs:
            return None
        tr, s_n, qmin, qmax, wq_n, ws_n, b = node.args
        if not (isinstance(tr, fx.Node) and swaps_last_two(tr) and tr.args and is_call(tr.args[0], CONV1D_SILU_OP)):
            return None
        conv = tr.args[0]
        if len(conv.args) != 8 or conv.kwargs or not _int8_range(qmin, qmax) or qmin > qmax:
            return None
        wq = const(gm, wq_n)
        if wq is None or not _per_token_scale(const(gm, s_n)):
            return None
        if _for_gpu(target, wq):
            state.setdefault("notes", Counter())["kept for CUDA: x_proj quantizes the conv's output (no fused "
                                                 "codes there)"] += 1
            return None
        return Match(node, dict(conv=conv, tr=tr), erase=((tr,) if len(tr.users) == 1 else ()) + (conv,))
    return match


def _build_conv_codes(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    conv = m.fields["conv"]
    _, s_n, qmin, qmax, wq_n, ws_n, b = m.anchor.args
    # the new conv goes where the old one was (its other readers, the scan, may come before x_proj),
    # with its own read of the codes' scale (the linear's may be defined after the conv)
    with gm.graph.inserting_after(conv):
        cs_n = gm.graph.get_attr(s_n.target)
    with gm.graph.inserting_after(cs_n):
        fused = gm.graph.call_function(CONV1D_SILU_CODES_OP, (*conv.args, cs_n, qmin, qmax))
    with gm.graph.inserting_after(fused):
        y = gm.graph.call_function(operator.getitem, (fused, 0))
    with gm.graph.inserting_after(y):
        codes = gm.graph.call_function(operator.getitem, (fused, 1))
    y.meta.update({k: v for k, v in conv.meta.items() if k in ("val", "example_value", "tensor_meta")})
    conv.replace_all_uses_with(y)
    new = gm.graph.call_function(int8_linear_decomposed_codes, (codes, s_n, max(-qmin, qmax), wq_n, ws_n, b))
    return Built(new, ((conv, fused, dict(kind=Kind.FUSED, op="causal_conv1d_silu_codes")),
                       (m.anchor, new, dict(op="int8_linear_decomposed_codes"))), keep_tensor_meta=True)


# ---------------------------------------------------------------------------------------------
# fuse_in_proj_epilogue

_CONV_OPS = (CONV1D_SILU_OP, CONV1D_SILU_CODES_OP)


def _halves(tr: fx.Node):
    """(x half, z half) getitem nodes of ``tr.chunk(2, dim=1)`` (method or torch.chunk; dim 1 or
    -2 of the 3-d transposed tensor) when that chunk is tr's only reader and its halves are read
    only through them; else None."""
    if len(tr.users) != 1:
        return None
    (ch,) = tr.users
    if not (ch.op == "call_method" and ch.target == "chunk") and not is_call(ch, torch.chunk):
        return None
    chunks, dim = arg(ch, 1, "chunks"), arg(ch, 2, "dim", 0)
    if ch.args[0] is not tr or chunks != 2 or dim not in (1, -2):
        return None
    gets = {}
    for u in ch.users:
        if not is_call(u, operator.getitem) or u.args[1] not in (0, 1) or u.args[1] in gets:
            return None
        gets[u.args[1]] = u
    return (gets.get(0), gets.get(1)) if 0 in gets else None


def _match_in_proj_epilogue(target: str):
    def match(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
        if not is_call(node, int8_linear_decomposed) or len(node.args) != 7 or node.kwargs or len(node.users) != 1:
            return None
        x, s_n, qmin, qmax, wq_n, ws_n, b = node.args
        (tr,) = node.users
        if not (swaps_last_two(tr) and tr.args[0] is node):
            return None
        halves = _halves(tr)
        if halves is None or not _int8_range(qmin, qmax) or qmin > qmax:
            return None
        gx, gz = halves
        wq, ws = const(gm, wq_n), const(gm, ws_n)
        bias = None if b is None else const(gm, b)
        if wq is None or wq.dim() != 2 or wq.shape[0] % 2 or ws is None or ws.numel() != wq.shape[0] or \
                (b is not None and (bias is None or bias.numel() != wq.shape[0])) or \
                not _per_token_scale(const(gm, s_n)):
            return None
        # the x half feeds only convs (as their input x, with no epilogue of their own yet)
        convs = list(gx.users)
        if not convs or not all(is_call(c, _CONV_OPS) and c.args[0] is gx and gx not in c.args[1:] and
                                len(c.args) == (8 if c.target is CONV1D_SILU_OP else 11) and not c.kwargs
                                for c in convs):
            return None
        if _for_gpu(target, wq):
            state.setdefault("notes", Counter())["kept for CUDA: the Triton conv reads in_proj's output (no "
                                                 "fused epilogue there)"] += 1
            return None
        return Match(node, dict(gx=gx, gz=gz, convs=convs, ws=ws, bias=bias))
    return match


def _build_in_proj_epilogue(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    lin = m.anchor
    x, s_n, qmin, qmax, wq_n, ws_n, b = lin.args
    gx, gz, convs, ws, bias = (m.fields[k] for k in ("gx", "gz", "convs", "ws", "bias"))
    d = ws.numel() // 2
    wsf, bf = ws.detach().float().reshape(-1), None if bias is None else bias.detach().float().reshape(-1)
    acc = gm.graph.call_function(int8_linear_decomposed_acc, (x, s_n, qmin, qmax, wq_n))
    ws_x = new_const(gm, f"{lin.name}_wscale_x", wsf[:d].clone(), lin)
    b_x = None if bf is None else new_const(gm, f"{lin.name}_bias_x", bf[:d].clone(), lin)
    tags = [(lin, acc, dict(kind=Kind.FUSED, op="int8_linear_decomposed_acc"))]
    for conv in convs:
        with gm.graph.inserting_after(conv):
            new = gm.graph.call_function(conv.target, (*conv.args, s_n, ws_x, b_x))
        new.meta.update({k: v for k, v in conv.meta.items() if k in ("val", "example_value", "tensor_meta")})
        conv.replace_all_uses_with(new)
        tags.append((conv, new, {}))
        gm.graph.erase_node(conv)
    if gz is not None and gz.users:
        ws_z = new_const(gm, f"{lin.name}_wscale_z", wsf[d:].clone(), lin)
        b_z = None if bf is None else new_const(gm, f"{lin.name}_bias_z", bf[d:].clone(), lin)
        with gm.graph.inserting_after(gz):
            z = gm.graph.call_function(int8_linear_epilogue_t, (gz, s_n, ws_z, b_z))
        z.meta.update({k: v for k, v in gz.meta.items() if k in ("val", "example_value", "tensor_meta")})
        gz.replace_all_uses_with(z, delete_user_cb=lambda u: u is not z)
    return Built(acc, tuple(tags), keep_tensor_meta=True)


# ---------------------------------------------------------------------------------------------
# fuse_z_epilogue

def _reads_as_gate(scan: fx.Node, z: fx.Node) -> bool:
    """Whether ``scan`` is a selective_scan_dt / _cl reading ``z`` as its gate only, positionally,
    with no epilogue of its own yet."""
    pos = _Z_ARG.get(scan.target) if scan.op == "call_function" else None
    return pos is not None and len(scan.args) > pos and scan.args[pos] is z and \
        all(a is not z for i, a in enumerate(scan.args) if i != pos) and z not in scan.kwargs.values() and \
        all(scan.kwargs.get(k) is None for k in ("z_scale", "z_wscale", "z_bias"))


def _match_z_epilogue(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    """``int8_linear_epilogue_t(z_acc, s, ws, b)`` (fuse_in_proj_epilogue's z half) whose every
    reader is a scan taking it as its gate."""
    if not is_call(node, int8_linear_epilogue_t) or len(node.args) != 4 or node.kwargs or not node.users:
        return None
    others = sorted({str(getattr(u.target, "__name__", u.target)) for u in node.users if not _reads_as_gate(u, node)})
    if others:
        state.setdefault("notes", Counter())[f"kept the z half's epilogue: read by {', '.join(others)} (only the "
                                             f"gates of selective_scan_dt / selective_scan_cl take the "
                                             f"accumulator)"] += 1
        return None
    return Match(node, dict(scans=list(node.users)))


def _build_z_epilogue(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    epi = m.anchor
    z_acc, s_n, ws_n, b_n = epi.args
    for scan in m.fields["scans"]:
        args = list(scan.args)
        args[_Z_ARG[scan.target]] = z_acc
        scan.args = tuple(args)
        extra = {"z_scale": s_n, "z_wscale": ws_n}
        if b_n is not None:
            extra["z_bias"] = b_n
        scan.kwargs = {**scan.kwargs, **extra}
    return Built(None)  # (the epilogue, unread now, goes with the cleanup)


# ---------------------------------------------------------------------------------------------
# inline_fake_quant

def _match_qdq_pair(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    src = qdq_source(gm, node)
    return None if src is None else Match(node, dict(src=src))


def _build_fake_quantize(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    q, s_n, z_n, qmin, qmax = m.fields["src"]
    new = gm.graph.call_function(fake_quantize, (q.args[0], s_n, z_n, qmin, qmax))
    return Built(new, ((q, new, dict(kind=Kind.FAKE_QUANT)),))


def _match_kept_quantize(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    return Match(node) if is_call(node, QUANTIZE_OP) else None


def _build_quantize_ref(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    # a quantize kept for its integers (feeding an integer op): the same formula in plain torch
    new = gm.graph.call_function(quantize_ref, tuple(m.anchor.args), dict(m.anchor.kwargs))
    return Built(new, ((m.anchor, new, {}),))


# ---------------------------------------------------------------------------------------------
# inline_mixed_fake_quant

def _match_mixed_site(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    return Match(node) if is_call(node, QUANTIZE_MIXED_OP) else None


def _build_mixed_site(fused: bool):
    def build(gm: fx.GraphModule, m: Match, state: dict) -> Built:
        node = m.anchor
        x, s_n, token_axis, channel_axis, bits, obits, k, n_refresh = _mixed_args(node)
        if fused and obits == 8 and 2 <= bits <= 8:  # one C++ pass on the CPU
            new = gm.graph.call_function(MIXED_FAKE_QUANT_OP, _mixed_args(node))
            return Built(new, ((node, new, dict(kind=Kind.FAKE_QUANT_MIXED)),))
        mask = gm.graph.call_function(OUTLIER_MASK_OP, (x, s_n, token_axis, channel_axis, bits, float(k), n_refresh))
        mask_n, step_n = (gm.graph.call_function(operator.getitem, (mask, i)) for i in (0, 1))
        new = gm.graph.call_function(mixed_fake_quant_decomposed, (x, mask_n, step_n, channel_axis, bits, obits))
        return Built(new, ((node, mask, dict(kind=Kind.OUTLIER_MASK)), (node, new, dict(kind=Kind.FAKE_QUANT_MIXED))))
    return build


# ---------------------------------------------------------------------------------------------
# fuse_linear_mixed_fake_quant

def _match_linear_then_mixed(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    """``mixed_fake_quant`` (8-bit outliers) of a ``w4a4o8_linear_rt`` output with fewer than
    ``SMALL_K`` input channels, directly or through one transpose (Vim's to (batch, N, L)), where
    the linear output has no other use. The op checks at run time that tokens and channels are
    its output's last two axes."""
    if not is_call(node, MIXED_FAKE_QUANT_OP) or len(node.args) < 8:
        return None
    x, _, token_axis, channel_axis, _, obits, _, _ = _mixed_args(node)
    if obits != 8 or not isinstance(x, fx.Node):
        return None
    lin, swap = x, None
    dims = transpose_dims(x)
    if dims is not None and len(x.users) == 1:
        lin, swap = x.args[0], dims
    if not is_call(lin, W4A4O8_DETECT_OP) or len(lin.users) != 1 or len(lin.args) < 8:
        return None
    k_in = lin.args[5]
    if not isinstance(k_in, int) or k_in >= SMALL_K or not isinstance(token_axis, int) or \
            not isinstance(channel_axis, int) or (swap is None and (token_axis < 0 or channel_axis < 0)):
        return None
    return Match(node, dict(lin=lin, swap=swap), erase=((x,) if swap is not None else ()) + (lin,))


def _build_linear_then_mixed(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    lin, swap = m.fields["lin"], m.fields["swap"]
    _, s_n, token_axis, channel_axis, bits, _, k, n_refresh = _mixed_args(m.anchor)
    # the site's axes, on the linear's output (seen through the transpose)
    if swap is not None:
        other = {swap[0]: swap[1], swap[1]: swap[0]}
        token_axis, channel_axis = other.get(token_axis, token_axis), other.get(channel_axis, channel_axis)
    new = gm.graph.call_function(W4A4O8_DETECT_REQUANT_OP,
                                 (*lin.args[:8], s_n, token_axis, channel_axis, bits, float(k), n_refresh))
    out = gm.graph.call_method("transpose", (new, *swap)) if swap is not None else new
    carry_spec(lin, new)  # the tag follows the re-quantization site (anchor); the spec is the linear's
    return Built(out, ((m.anchor, new, dict(kind=Kind.FUSED, op="w4a4o8_linear_mixed")),))


# ---------------------------------------------------------------------------------------------
# fold_weight_dequant

def _match_const_dequantize(gm: fx.GraphModule, node: fx.Node, state: dict) -> Match | None:
    if not is_call(node, DEQUANTIZE_OP) or not all(const(gm, a) is not None for a in node.args[:3]):
        return None
    return Match(node)


def _build_folded_weight(gm: fx.GraphModule, m: Match, state: dict) -> Built:
    node = m.anchor
    w = dequantize_ref(*(const(gm, a) for a in node.args[:3]))
    new = new_const(gm, f"{node.args[0].target}_f", w, node)
    return Built(new, ((node, new, dict(kind=Kind.WEIGHT_FOLDED)),))


# ---------------------------------------------------------------------------------------------

def lowering_rules(options: LoweringOptions = LoweringOptions()) -> list[Rule]:
    """The rules ``options`` selects, in order: linear rules first (they consume the
    quantize/dequantize pairs and weight dequantizations they fuse), then the scan, then what is
    left (see the module docstring)."""
    o = options
    rules = [Rule("lower_w8a8_linear", "linear(s)", (Pattern(_match_w8a8, _build_w8a8(o.int8_inline, o.target)),)),
             Rule("lower_w4a4o8_linear", "linear(s)",
                  (Pattern(_match_w4a4o8, _build_w4a4o8(o.mixed_fused, o.int4_inline, o.target)),))]
    if o.int8_conv2d:
        rules.append(Rule("lower_int8_conv2d", "conv2d(s)",
                          (Pattern(_match_int8_conv2d(o.target, o.conv2d_min_k), _build_int8_conv2d),)))
    if o.integer_scan:
        rules.append(Rule("lower_integer_scan", "scan(s)", (Pattern(_match_integer_scan, _build_integer_scan),)))
    if o.scan_cl:
        rules.append(Rule("channels_last_scan", "scan(s)",
                          (Pattern(_match_channels_last_scan, _build_channels_last_scan(o.fast_decay)),), cleanup=False))
    if o.conv_silu:
        rules.append(Rule("lower_conv1d_silu", "conv(s)", (Pattern(_match_conv1d_silu, _build_conv1d_silu),)))
        if o.conv_codes:
            rules.append(Rule("fuse_conv_codes", "conv(s)", (Pattern(_match_conv_codes(o.target), _build_conv_codes),)))
        if o.inproj_epilogue:
            rules.append(Rule("fuse_in_proj_epilogue", "linear(s)",
                              (Pattern(_match_in_proj_epilogue(o.target), _build_in_proj_epilogue),)))
    rules += [Rule("inline_fake_quant", "pair(s)", (Pattern(_match_qdq_pair, _build_fake_quantize),
                                                    Pattern(_match_kept_quantize, _build_quantize_ref))),
              Rule("inline_mixed_fake_quant", "site(s)",
                   (Pattern(_match_mixed_site, _build_mixed_site(o.mixed_fused)),))]
    if o.dt_scan:
        rules.append(Rule("fuse_dt_scan", "scan(s)", (Pattern(_match_dt_scan(o.target), _build_dt_scan),)))
    if o.scan_combine:
        rules += [Rule("reverse_scan_gate", "scan(s)", (Pattern(_match_reversed_gate, _build_reversed_gate),)),
                  Rule("fuse_scan_combine", "mixer(s)", (Pattern(_match_scan_combine(o.target), _build_scan_combine),))]
    if o.conv_silu and o.inproj_epilogue:
        # after reverse_scan_gate: the backward scan's gate is then the z half itself, not its flip
        rules.append(Rule("fuse_z_epilogue", "z half(s)", (Pattern(_match_z_epilogue, _build_z_epilogue),)))
    if o.mixed_fused:
        rules.append(Rule("fuse_linear_mixed_fake_quant", "linear(s)",
                          (Pattern(_match_linear_then_mixed, _build_linear_then_mixed),)))
    return rules + [Rule("fold_weight_dequant", "weight(s)", (Pattern(_match_const_dequantize, _build_folded_weight),))]
