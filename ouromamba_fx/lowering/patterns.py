"""Matching helpers of the lowering rules: what a node computes, read from graph structure and
from the values of constant inputs (``get_attr`` nodes), never from ``node.meta`` tags, so that
the rules also work on graphs Dynamo captured (where the backend first turns module parameters
and buffers into constants)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP, dequantize_ref

LINEAR_TARGETS = (F.linear, torch.ops.aten.linear.default)
CONV1D_TARGETS = (F.conv1d, torch.ops.aten.conv1d.default)
CONV2D_TARGETS = (F.conv2d, torch.ops.aten.conv2d.default)


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


def const_weight(gm: fx.GraphModule, node, dim: int = 2) -> tuple[fx.Node, Tensor, Tensor] | None:
    """If ``node`` is ``dequantize(w_q, w_scale, w_zp)`` of constants with int8 ``w_q`` of ``dim``
    dimensions (2: a linear's (N, K), 4: a conv's (N, C, KH, KW)), a scale per output channel and
    zero points all 0: (w_q node, w_q, w_scale (N,))."""
    if not is_call(node, DEQUANTIZE_OP):
        return None
    wq_n, ws_n, wz_n = node.args[:3]
    wq, ws, wz = const(gm, wq_n), const(gm, ws_n), const(gm, wz_n)
    if wq is None or ws is None or wq.dtype != torch.int8 or wq.dim() != dim or not all_zero(wz):
        return None
    if ws.numel() != wq.shape[0] or not ws.dtype.is_floating_point:
        return None
    return wq_n, wq, ws.reshape(-1)


def pair(v) -> tuple | None:
    """A conv's stride / padding / dilation as a pair of ints (an int, or a 1- or 2-sequence),
    else None (e.g. padding="same")."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return tuple(v) * (2 // len(v))
    return None


def linear_parts(node: fx.Node):
    """(input, weight, bias) of an ``F.linear`` call."""
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def bias_ok(gm: fx.GraphModule, b) -> bool:
    return b is None or const(gm, b) is not None or (isinstance(b, fx.Node) and b.op != "get_attr")


def ndim(node) -> int | None:
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


def flip_last(node) -> bool:
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
    return flat == [-1] or (flat == [2] and ndim(node.args[0]) == 3)


def single(v):
    """The element of a one-element tuple or list (conv strides and paddings), else ``v``."""
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
ELEMENTWISE_FNS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                    torch.mul, torch.div, torch.flip, torch.ops.aten.flip.default)
ELEMENTWISE_METHODS = ("add", "sub", "mul", "div", "neg", "flip")


def elementwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ELEMENTWISE_FNS) or \
        (node.op == "call_method" and node.target in ELEMENTWISE_METHODS)


def transpose_args(node: fx.Node) -> tuple | None:
    """The two dims of ``x.transpose(d0, d1)`` / ``torch.transpose(x, d0, d1)``, as given; None
    for any other node."""
    if node.op == "call_method" and node.target == "transpose":
        return tuple(node.args[1:3])
    if is_call(node, (torch.transpose, torch.ops.aten.transpose.int)):
        return arg(node, 1, "dim0"), arg(node, 2, "dim1")
    return None


def swaps_last_two(node: fx.Node) -> bool:
    """Whether ``node`` is ``x.transpose(1, 2)`` (or ``(-1, -2)``, either order) of a 3-d ``x``."""
    dims = transpose_args(node)
    return dims is not None and sorted(d % 3 if isinstance(d, int) else -9 for d in dims) == [1, 2]


def transpose_dims(node: fx.Node) -> tuple[int, int] | None:
    """The two dims of ``x.transpose(d0, d1)`` / ``torch.transpose(x, d0, d1)`` when both are
    non-negative ints (so that they name the same axes whatever the rank), else None."""
    dims = transpose_args(node)
    ok = dims is not None and len(dims) == 2 and all(isinstance(d, int) and d >= 0 for d in dims) and dims[0] != dims[1]
    return dims if ok else None
