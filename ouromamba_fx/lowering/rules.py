"""Lowering rules: each rewrites one pattern of the reference quantized graph into a fused op.

A rule is a :class:`~ouromamba_fx.passes.base.Pass` (so the pass manager lints, recompiles and
snapshots after it, and ``QuantizedModel.diff`` shows what it changed). Rules look only at graph
structure and at the *values* of constant inputs (``get_attr`` nodes: quantized weights, scales,
zero points), never at the ``node.meta`` tags, so they also work on graphs Dynamo captured from a
``QuantizedModel`` (where the backend first turns module parameters and buffers into constants).

Rules, in the order :func:`ouromamba_fx.lowering.lower.lowering_passes` runs them:

* :class:`LowerW8A8Linear` -- ``quantize -> dequantize -> F.linear(., dequantize(w_q))`` with
  symmetric activations (<= 8 bits) and a scale per token (or per tensor) becomes
  :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed` (quantize, ``torch._int_mm``,
  epilogue, in plain torch for Inductor to fuse); with ``inline=False`` the custom ops
  ``ouromamba::w8a8_linear`` (8 bits) or ``ouromamba::int8_linear`` on the kept ``quantize``.
* :class:`LowerW4A4O8Linear` -- ``quantize_mixed`` (4-bit inliers, 8-bit outliers, channels last)
  ``-> F.linear(., dequantize(w_q))`` with weights in [-8, 7] becomes, on weights packed two per
  byte, ``ouromamba::w4a4o8_linear_rt`` (default: outlier rule, split, quantization, int4 GEMM and
  sparse outlier term in one op, :mod:`ouromamba_fx.ops.w4a4o8_linear`), or with ``fused=False``
  ``ouromamba::outlier_mask`` + :func:`~ouromamba_fx.ops.w4a4o8_linear.w4a4o8_linear_masked_decomposed` (or,
  ``inline=False``, the op ``ouromamba::w4a4o8_linear``).
* :class:`LowerIntegerScan` -- ``dequantize`` of delta/B/C into ``ouromamba::selective_scan`` (or
  ``selective_scan_q``) becomes ``ouromamba::selective_scan_qi`` on the int8 codes.
* :class:`LowerConv1dSilu` -- ``[flip ->] quantize -> dequantize -> conv1d (depthwise, causal
  padding) -> [..., :L] -> silu`` becomes the C++ op ``ouromamba::causal_conv1d_silu``
  (:mod:`ouromamba_fx.ops.conv1d_silu`: one pass, input quantization fused, the flip read
  backwards instead of copied, channel-contiguous output).
* :class:`ChannelsLastScan` -- ``ouromamba::selective_scan`` feeding only lowered linears
  (through elementwise ops and the transpose to (batch, L, d_inner)) becomes
  ``ouromamba::selective_scan_cl``, the same output in channel-contiguous memory.
* :class:`InlineFakeQuant` -- any quantize/dequantize pair still left (in front of float ops)
  becomes :func:`~ouromamba_fx.ops.quant.fake_quantize`, and a ``quantize`` kept for its
  integers (feeding ``selective_scan_qi`` or ``int8_linear``) becomes ``quantize_ref``: plain
  torch with the same formula, which Inductor fuses into the kernel producing its input.
* :class:`InlineMixedFakeQuant` -- ``quantize_mixed`` sites left (feeding float ops) become the
  one-pass ``ouromamba::mixed_fake_quant`` (8-bit outliers), else ``ouromamba::outlier_mask`` +
  :func:`~ouromamba_fx.ops.mixed.mixed_fake_quant_decomposed`.
* :class:`FuseLinearMixedFakeQuant` -- ``mixed_fake_quant`` of a short-reduction
  ``w4a4o8_linear_rt`` (Vim's dt_proj feeding the scan's delta) becomes
  ``ouromamba::w4a4o8_linear_mixed``, one pass per row.
* :class:`FoldWeightDequant` -- ``dequantize`` of a constant weight (conv1d, or a linear no rule
  took) is computed once into a float constant (the same numbers).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx.ops.conv1d_silu import CONV1D_SILU_OP
from ouromamba_fx.ops.int4 import pack_int4
from ouromamba_fx.ops.int8_linear import INT8_LINEAR_OP, W8A8_LINEAR_OP, int8_linear_codes, int8_linear_decomposed
from ouromamba_fx.ops.mixed import (MIXED_FAKE_QUANT_OP, OUTLIER_MASK_OP, QUANTIZE_MIXED_OP,
                                    mixed_fake_quant_decomposed)
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP, dequantize_ref, fake_quantize, quantize_ref
from ouromamba_fx.ops.scan import SCAN_CHANNELS_LAST_OP, SCAN_OP
from ouromamba_fx.ops.scan_quant import SCAN_INT8_INPUTS_OP, SCAN_REPARAM_OP
from ouromamba_fx.ops.w4a4o8_linear import (SMALL_K, W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP, W4A4O8_MASKED_OP,
                                            w4a4o8_linear_masked_decomposed)
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.tags import META

LINEAR_TARGETS = (F.linear, torch.ops.aten.linear.default)
CONV1D_TARGETS = (F.conv1d, torch.ops.aten.conv1d.default)


# ---------------------------------------------------------------------------------------------
# Matching helpers

def const(gm: fx.GraphModule, node) -> Tensor | None:
    """The tensor a ``get_attr`` node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, Tensor) else None


def is_call(node, targets) -> bool:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def all_zero(t: Tensor | None) -> bool:
    return t is not None and not bool(t.count_nonzero())


def same_const(gm: fx.GraphModule, a, b) -> bool:
    """Same node, or two constants with equal values."""
    if a is b:
        return True
    ta, tb = const(gm, a), const(gm, b)
    return ta is not None and tb is not None and ta.shape == tb.shape and torch.equal(ta, tb)


def qdq_source(gm: fx.GraphModule, node) -> tuple[fx.Node, fx.Node, fx.Node, int, int] | None:
    """If ``node`` is ``dequantize(quantize(x, s, z, qmin, qmax), s, z)``: (quantize node, s, z,
    qmin, qmax); else None."""
    if not is_call(node, DEQUANTIZE_OP):
        return None
    q, s, z = node.args[:3]
    if not is_call(q, QUANTIZE_OP):
        return None
    _, qs, qz, qmin, qmax = q.args[:5]
    if not (same_const(gm, s, qs) and same_const(gm, z, qz)):
        return None
    return q, qs, qz, int(qmin), int(qmax)


def const_weight(gm: fx.GraphModule, node) -> tuple[fx.Node, Tensor, Tensor] | None:
    """If ``node`` is ``dequantize(w_q, w_scale, w_zp)`` of constants with int8 ``w_q`` (N, K), a
    scale per output channel and zero points all 0: (w_q node, w_q, w_scale (N,))."""
    if not is_call(node, DEQUANTIZE_OP):
        return None
    wq_n, ws_n, wz_n = node.args[:3]
    wq, ws, wz = const(gm, wq_n), const(gm, ws_n), const(gm, wz_n)
    if wq is None or ws is None or wq.dtype != torch.int8 or wq.dim() != 2 or not all_zero(wz):
        return None
    if ws.numel() != wq.shape[0] or not ws.dtype.is_floating_point:
        return None
    return wq_n, wq, ws.reshape(-1)


def linear_parts(node: fx.Node):
    """(input, weight, bias) of an ``F.linear`` call."""
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def bias_ok(gm: fx.GraphModule, b) -> bool:
    return b is None or const(gm, b) is not None or (isinstance(b, fx.Node) and b.op != "get_attr")


def new_const(gm: fx.GraphModule, base: str, value: Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` under a fresh name from ``base``; a get_attr node."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", base)
    i, cand = 0, name
    while hasattr(gm, cand):
        i += 1
        cand = f"{name}_{i}"
    gm.register_buffer(cand, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(cand)


def keep_tag(src: fx.Node, dst: fx.Node, **extra) -> None:
    t = dict(src.meta.get(META) or {})
    if t or extra:
        dst.meta[META] = {**t, **extra}


def cleanup(gm: fx.GraphModule) -> None:
    """Drop dead nodes, then the module buffers no ``get_attr`` reads any more (buffers of the
    modules the graph calls, such as a BatchNorm's running statistics, are theirs: kept)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    for name in [n for n, _ in gm.named_buffers()]:
        if name not in used and not name.startswith(called):
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)


def _flat_float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


# ---------------------------------------------------------------------------------------------
# Rules

class LowerW8A8Linear(Pass):
    """``inline=True`` (default) emits :func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed`
    (plain torch around ``torch._int_mm``, fused by Inductor); ``inline=False`` the opaque
    custom ops ``w8a8_linear`` / ``int8_linear``. Same integers, same epilogue order."""

    name = "lower_w8a8_linear"

    def __init__(self, inline: bool = True) -> None:
        self.inline = inline

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, LINEAR_TARGETS):
                continue
            x_dq, w_dq, b = linear_parts(node)
            src, w = qdq_source(gm, x_dq), const_weight(gm, w_dq)
            if src is None or w is None or not bias_ok(gm, b):
                continue
            q, s_n, z_n, qmin, qmax = src
            s, z = const(gm, s_n), const(gm, z_n)
            # symmetric, zero points 0, one scale per row (per token or per tensor)
            if s is None or not all_zero(z) or qmin != -qmax or qmax > 127:
                continue
            if s.numel() != 1 and s.shape[-1] != 1:
                continue
            wq_n, _, ws = w
            ws_n = new_const(gm, f"{wq_n.target}_wscale", ws.clone(), node)
            inline = self.inline and w[1].shape[1] >= 2
            with gm.graph.inserting_before(node):
                if inline:
                    new = gm.graph.call_function(int8_linear_decomposed, (q.args[0], s_n, qmin, qmax, wq_n, ws_n, b))
                elif qmax == 127:
                    new = gm.graph.call_function(W8A8_LINEAR_OP, (q.args[0], wq_n, ws_n, b, s_n))
                else:  # fewer bits: keep the quantize node's integers, int8 GEMM on them
                    new = gm.graph.call_function(int8_linear_codes, (q, s_n, wq_n, ws_n, b))
            op = "int8_linear_decomposed" if inline else "w8a8_linear" if qmax == 127 else "int8_linear"
            keep_tag(node, new, kind="fused", op=op, act_bits=qmax.bit_length() + 1)
            new.meta["tensor_meta"] = node.meta.get("tensor_meta")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} linear(s)")
        return bool(changed)


class LowerW4A4O8Linear(Pass):
    """``fused=True`` (default) emits ``ouromamba::w4a4o8_linear_rt``
    (:mod:`ouromamba_fx.ops.w4a4o8_linear`: the outlier rule, the split and the quantization in one
    C++ pass, then the inlier GEMM and each token's outlier channels added in the epilogue). Otherwise
    ``ouromamba::outlier_mask`` (the reference's code) and, with ``inline=True``,
    :func:`~ouromamba_fx.ops.w4a4o8_linear.w4a4o8_linear_masked_decomposed` (plain torch, two dense
    ``torch._int_mm``, fused by Inductor), with ``inline=False`` the opaque
    ``ouromamba::w4a4o8_linear``. Same integers, same epilogue (up to outlier channels sitting
    exactly on the threshold, which the summation order of the mean/std decides)."""

    name = "lower_w4a4o8_linear"

    def __init__(self, inline: bool = True, fused: bool = True) -> None:
        self.inline = inline
        self.fused = fused

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        packed: dict[str, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if not is_call(node, LINEAR_TARGETS):
                continue
            x_mq, w_dq, b = linear_parts(node)
            w = const_weight(gm, w_dq)
            if not is_call(x_mq, QUANTIZE_MIXED_OP) or w is None or not bias_ok(gm, b):
                continue
            x, s_n, token_axis, channel_axis, bits, obits, k, n_refresh = x_mq.args[:8]
            wq_n, wq, ws = w
            ndim = _ndim(x)
            # Channels must be the last axis (the one F.linear contracts). Without recorded
            # shapes, accept the (batch, L, C) layout the reference passes write for linear inputs.
            last = channel_axis == -1 or (channel_axis == ndim - 1 if ndim is not None
                                          else (token_axis, channel_axis) == (1, 2))
            if bits != 4 or obits != 8 or not last or int(wq.min()) < -8 or int(wq.max()) > 7:
                continue
            if wq_n.target not in packed:
                packed[wq_n.target] = new_const(gm, f"{wq_n.target}_int4", pack_int4(wq), x_mq)
            wp_n = packed[wq_n.target]
            ws_n = new_const(gm, f"{wq_n.target}_wscale", ws.clone(), node)
            # the fused op reads x as (..., L, C): time-steps on the second-to-last axis
            steps_ok = token_axis == -2 or (token_axis == ndim - 2 if ndim is not None else token_axis == 1)
            if self.fused and steps_ok:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(W4A4O8_DETECT_OP, (x, s_n, wp_n, ws_n, b, int(wq.shape[1]),
                                                                    float(k), n_refresh))
                keep_tag(node, new, kind="fused", op="w4a4o8_linear_rt")
            else:
                with gm.graph.inserting_before(node):
                    mask = gm.graph.call_function(OUTLIER_MASK_OP, (x, s_n, token_axis, channel_axis, bits, float(k),
                                                                    n_refresh))
                    m, step_s = (gm.graph.call_function(operator.getitem, (mask, i)) for i in (0, 1))
                    inline = self.inline and wq.shape[1] >= 2  # torch._int_mm is wrong for K == 1 on CPU
                    target = w4a4o8_linear_masked_decomposed if inline else W4A4O8_MASKED_OP
                    new = gm.graph.call_function(target, (x, m, step_s, wp_n, ws_n, b, int(wq.shape[1])))
                keep_tag(x_mq, mask, kind="outlier_mask")
                keep_tag(node, new, kind="fused", op=getattr(target, "__name__", "w4a4o8_linear"))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} linear(s)")
        return bool(changed)


def _ndim(node) -> int | None:
    """Rank of a node's value when the graph records it (FX tensor_meta or Dynamo example_value)."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if isinstance(v, Tensor):
            return v.dim()
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return len(tm.shape)
    return None


class LowerIntegerScan(Pass):
    """``selective_scan(u, dequantize(q_delta), A, dequantize(q_B), dequantize(q_C), ...)`` (or
    ``selective_scan_q`` with its reparameterization) -> ``ouromamba::selective_scan_qi`` on the
    int8 codes with the quantize nodes' scales and zero points (dequantized inside the kernel,
    where they are used). Inputs that are not quantize/dequantize pairs (``quantize_mixed``
    outputs, float inputs) are passed as floats. Scans with no integer input are left alone."""

    name = "lower_integer_scan"
    _SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")
    _Q_ARGS = ("r_c", "r_l", "r_n", "state_scale", "state_bits")

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, (SCAN_OP, SCAN_REPARAM_OP)):
                continue
            names = self._SCAN_ARGS + (self._Q_ARGS if node.target is SCAN_REPARAM_OP else ())
            v = dict(zip(names, node.args))
            v.update(node.kwargs)
            v.setdefault("delta_bias", None)
            v.setdefault("delta_softplus", False)
            ins = {}
            for key in ("delta", "B", "C"):
                src = qdq_source(gm, v[key])
                ins[key] = (src[0], src[1], src[2]) if src is not None else (v[key], None, None)
            if all(z is None for _, _, z in ins.values()):
                continue
            factors = tuple(v.get(k) for k in self._Q_ARGS[:4]) + (int(v.get("state_bits", 16)),)
            args = (v["u"], *ins["delta"], v["A"], *ins["B"], *ins["C"], v.get("D"), v.get("z"),
                    v["delta_bias"], v["delta_softplus"], *factors)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(SCAN_INT8_INPUTS_OP, args)
            keep_tag(node, new, kind="fused", op="selective_scan_qi")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} scan(s)")
        return bool(changed)


class LowerConv1dSilu(Pass):
    name = "lower_conv1d_silu"

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, F.silu) or not is_call(node.args[0], operator.getitem):
                continue
            sl = node.args[0]
            conv, index = sl.args
            if not is_call(conv, CONV1D_TARGETS) or len(conv.users) != 1 or len(sl.users) != 1:
                continue
            x_in, w_in, b_in = conv.args[0], arg(conv, 1, "weight"), arg(conv, 2, "bias")
            stride, padding, dilation, groups = (tuple(conv.args[3:7]) + (1, 0, 1, 1)[len(conv.args) - 3:])[:4]
            w = const_weight_any(gm, w_in)
            if w is None or w.dim() != 3 or w.shape[1] != 1 or groups != w.shape[0]:
                continue
            kk = w.shape[-1]
            if _one(stride) != 1 or _one(dilation) != 1 or _one(padding) != kk - 1:
                continue
            if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
                    and index[1] == slice(None, -(kk - 1), None)):
                continue
            src = qdq_source(gm, x_in)
            w_n = new_const(gm, f"{conv.name}_weight_f", w.contiguous(), node)
            if src is not None:
                q, s_n, z_n, qmin, qmax = src
                x_src, qargs = q.args[0], (s_n, z_n, qmin, qmax)
            else:
                x_src, qargs = x_in, (None, None, -127, 127)
            # conv(fq(flip(x))) reads x backwards inside the op: flip(x) is never materialised
            reverse = _flip_last(x_src)
            if reverse:
                x_src = x_src.args[0]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(CONV1D_SILU_OP, (x_src, w_n, b_in, *qargs, reverse))
            keep_tag(conv, new, kind="fused", op="causal_conv1d_silu")
            node.replace_all_uses_with(new)
            for n in (node, sl, conv):
                gm.graph.erase_node(n)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} conv(s)")
        return bool(changed)


def _flip_last(node) -> bool:
    """Whether ``node`` is ``x.flip(-1)`` / ``torch.flip(x, [-1])`` (the last axis: time, for a
    (B, D, L) conv input)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "flip":
        dims = node.args[1:] or (node.kwargs.get("dims"),)
    elif is_call(node, (torch.flip, torch.ops.aten.flip.default)):
        dims = (arg(node, 1, "dims"),)
    else:
        return False
    flat = [d for item in dims for d in (item if isinstance(item, (tuple, list)) else (item,))]
    return flat == [-1] or (flat == [2] and _ndim(node.args[0]) == 3)


def _one(v):
    return v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v


def const_weight_any(gm: fx.GraphModule, node) -> Tensor | None:
    """A constant float weight, or the dequantized value of ``dequantize(w_q, s, z)`` of constants."""
    t = const(gm, node)
    if t is not None:
        return t.detach()
    if is_call(node, DEQUANTIZE_OP):
        parts = [const(gm, a) for a in node.args[:3]]
        if all(p is not None for p in parts):
            return dequantize_ref(*parts)
    return None


# Ops that accept any strides and give values independent of them: a chain of them between the
# scan and the transpose in front of out_proj (Vim's (y_f + flip(y_b)) / 2) keeps the scan's layout.
_ELEMENTWISE_FNS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                    torch.mul, torch.div, torch.flip, torch.ops.aten.flip.default)
_ELEMENTWISE_METHODS = ("add", "sub", "mul", "div", "neg", "flip")


def _elementwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ELEMENTWISE_FNS) or \
        (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)


def _transpose_args(node: fx.Node) -> tuple | None:
    """The two dims of ``x.transpose(d0, d1)`` / ``torch.transpose(x, d0, d1)``, as given; None
    for any other node."""
    if node.op == "call_method" and node.target == "transpose":
        return tuple(node.args[1:3])
    if is_call(node, (torch.transpose, torch.ops.aten.transpose.int)):
        return arg(node, 1, "dim0"), arg(node, 2, "dim1")
    return None


def _swaps_last_two(node: fx.Node) -> bool:
    """Whether ``node`` is ``x.transpose(1, 2)`` (or ``(-1, -2)``, either order) of a 3-d ``x``."""
    dims = _transpose_args(node)
    return dims is not None and sorted(d % 3 if isinstance(d, int) else -9 for d in dims) == [1, 2]


def _transpose_dims(node: fx.Node) -> tuple[int, int] | None:
    """The two dims of ``x.transpose(d0, d1)`` / ``torch.transpose(x, d0, d1)`` when both are
    non-negative ints (so that they name the same axes whatever the rank), else None."""
    dims = _transpose_args(node)
    ok = dims is not None and len(dims) == 2 and all(isinstance(d, int) and d >= 0 for d in dims) and dims[0] != dims[1]
    return dims if ok else None


class ChannelsLastScan(Pass):
    """``ouromamba::selective_scan`` whose output reaches only lowered linears, through
    elementwise ops and one transpose to (batch, L, d_inner) (the out_proj of a Mamba mixer),
    becomes ``ouromamba::selective_scan_cl``: the same numbers in channel-contiguous memory, so
    that the transposed tensor the linear reads is contiguous. Without it, the W4A4O8 linear's
    outlier pass gathers each token's channels across time-contiguous rows (on a Vim-S out_proj
    input, (16, 197, 768): 4.6 ms against 1.9 ms contiguous, this CPU). Scans with any other use
    (a view, a reduction, a graph output) are left as they are."""

    name = "channels_last_scan"
    LINEARS = (W4A4O8_DETECT_OP, W4A4O8_MASKED_OP, W8A8_LINEAR_OP, INT8_LINEAR_OP, int8_linear_decomposed)

    def _only_feeds_linears(self, scan: fx.Node) -> bool:
        todo, seen = [scan], set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for user in node.users:
                if _elementwise(user):
                    todo.append(user)
                elif _swaps_last_two(user) and user.args[0] is node:
                    if not user.users or not all(is_call(u, self.LINEARS) and u.args[0] is user for u in user.users):
                        return False
                else:
                    return False
        return True

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if is_call(node, SCAN_OP) and node.users and self._only_feeds_linears(node):
                node.target = SCAN_CHANNELS_LAST_OP
                changed += 1
        ctx.log.append(f"{self.name}: {changed} scan(s)")
        return bool(changed)


class InlineFakeQuant(Pass):
    name = "inline_fake_quant"

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            src = qdq_source(gm, node)
            if src is None:
                continue
            q, s_n, z_n, qmin, qmax = src
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(fake_quantize, (q.args[0], s_n, z_n, qmin, qmax))
            keep_tag(q, new, kind="fake_quant")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        gm.graph.eliminate_dead_code()
        # Quantize nodes kept for their integers (feeding an integer op) become plain torch too:
        # the same formula, fused by Inductor into the kernel that produces x.
        for node in list(gm.graph.nodes):
            if is_call(node, QUANTIZE_OP):
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(quantize_ref, tuple(node.args), dict(node.kwargs))
                keep_tag(node, new)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} pair(s)")
        return bool(changed)


class InlineMixedFakeQuant(Pass):
    """``quantize_mixed`` sites no linear rule took (the scan's delta/B/C, W4A8O16 inputs) ->
    ``ouromamba::mixed_fake_quant`` (one C++ pass; ``fused=True`` and 8-bit outliers), else
    ``ouromamba::outlier_mask`` (the reference's code) + :func:`mixed_fake_quant_decomposed` (plain torch)."""

    name = "inline_mixed_fake_quant"

    def __init__(self, fused: bool = True) -> None:
        self.fused = fused

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, QUANTIZE_MIXED_OP):
                continue
            x, s_n, token_axis, channel_axis, bits, obits, k, n_refresh = node.args[:8]
            if self.fused and obits == 8 and 2 <= bits <= 8:  # one C++ pass on the CPU
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(MIXED_FAKE_QUANT_OP, tuple(node.args[:8]))
                keep_tag(node, new, kind="fake_quant_mixed")
            else:
                with gm.graph.inserting_before(node):
                    mask = gm.graph.call_function(OUTLIER_MASK_OP, (x, s_n, token_axis, channel_axis, bits, float(k),
                                                                    n_refresh))
                    m, step_s = (gm.graph.call_function(operator.getitem, (mask, i)) for i in (0, 1))
                    new = gm.graph.call_function(mixed_fake_quant_decomposed, (x, m, step_s, channel_axis, bits, obits))
                keep_tag(node, mask, kind="outlier_mask")
                keep_tag(node, new, kind="fake_quant_mixed")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} site(s)")
        return bool(changed)


class FuseLinearMixedFakeQuant(Pass):
    """``mixed_fake_quant`` (8-bit outliers) of a ``w4a4o8_linear_rt`` output with a short
    reduction (fewer than ``SMALL_K`` input channels), directly or through a transpose (Vim's
    to (batch, N, L)), becomes ``ouromamba::w4a4o8_linear_mixed`` with the site's axes mapped onto
    the linear's output: Vim's dt_proj and the quantization of the scan's delta in one pass per
    row, the product never written out. Only where the linear output has no other use; the op
    itself checks at run time that tokens and channels are its output's last two axes."""

    name = "fuse_linear_mixed_fake_quant"

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, MIXED_FAKE_QUANT_OP) or len(node.args) < 8:
                continue
            x, s_n, token_axis, channel_axis, bits, obits, k, n_refresh = node.args[:8]
            if obits != 8 or not isinstance(x, fx.Node):
                continue
            lin, swap = x, None
            dims = _transpose_dims(x)
            if dims is not None and len(x.users) == 1:
                lin, swap = x.args[0], dims
            if not is_call(lin, W4A4O8_DETECT_OP) or len(lin.users) != 1 or len(lin.args) < 8:
                continue
            k_in = lin.args[5]
            if not isinstance(k_in, int) or k_in >= SMALL_K or not isinstance(token_axis, int) or \
                    not isinstance(channel_axis, int) or (swap is None and (token_axis < 0 or channel_axis < 0)):
                continue
            # the site's axes, on the linear's output (seen through the transpose); the op runs its
            # one-pass kernel when they are the last two, else the two ops in turn
            ta, ca = token_axis, channel_axis
            if swap is not None:
                other = {swap[0]: swap[1], swap[1]: swap[0]}
                ta, ca = other.get(ta, ta), other.get(ca, ca)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(W4A4O8_DETECT_REQUANT_OP,
                                             (*lin.args[:8], s_n, ta, ca, bits, float(k), n_refresh))
                out = gm.graph.call_method("transpose", (new, *swap)) if swap is not None else new
            keep_tag(node, new, kind="fused", op="w4a4o8_linear_mixed")
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            if swap is not None:
                gm.graph.erase_node(x)
            gm.graph.erase_node(lin)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} linear(s)")
        return bool(changed)


class FoldWeightDequant(Pass):
    name = "fold_weight_dequant"

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, DEQUANTIZE_OP) or not all(const(gm, a) is not None for a in node.args[:3]):
                continue
            w = dequantize_ref(*(const(gm, a) for a in node.args[:3]))
            new = new_const(gm, f"{node.args[0].target}_f", w, node)
            keep_tag(node, new, kind="weight_folded")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed += 1
        cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} weight(s)")
        return bool(changed)
