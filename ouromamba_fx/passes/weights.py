"""Quantize the weights of the tagged linear and conv modules (mixers, MLP, attention, convs).

Each selected ``call_module`` node becomes explicit reference arithmetic:
``get_attr(w_q) -> dequantize(w_q, w_scale) -> F.linear / F.conv1d / F.conv2d(x, w, bias)``, with ``w_q``
stored as int8 in the GraphModule (4-bit values in [-7, 7]); the float module is removed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.numerics import qrange
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, quantize_ref
from ouromamba_fx.passes.annotate import site_spec
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.passes.qparams import weight_qparams
from ouromamba_fx.passes.spec import WeightSpec
from ouromamba_fx.tags import META, Kind, carry, op_nodes, tag


def attr_name(target: str, suffix: str) -> str:
    return target.replace(".", "_") + "_" + suffix


class QuantizeWeights(Pass):
    name = "quantize_weights"
    requires = ("annotated",)
    provides = ("weights_quantized",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = False
        for node in op_nodes(gm):
            spec = site_spec(node).weight
            if not isinstance(spec, WeightSpec):
                continue
            wspec = spec.quant
            mod = gm.get_submodule(node.target)
            if ctx.replay:  # rebuilding a saved model: its scales come from the file, skip the search
                wspec = dataclasses.replace(wspec, method="minmax")
            w2d = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            scale, zp = weight_qparams(w2d, wspec)
            qmin, qmax = qrange(wspec.bits, True)
            w_q = quantize_ref(w2d, scale, zp, qmin, qmax).reshape(mod.weight.shape)
            shape = (-1,) + (1,) * (mod.weight.ndim - 1)
            names = {k: attr_name(node.target, k) for k in ("weight_q", "weight_scale", "weight_zp", "bias")}
            gm.register_buffer(names["weight_q"], w_q)
            gm.register_buffer(names["weight_scale"], scale.reshape(shape).clone())
            gm.register_buffer(names["weight_zp"], zp.reshape(shape).clone())
            if mod.bias is not None:
                gm.register_buffer(names["bias"], mod.bias.detach().clone())
            ctx.quantized_weights[node.target] = (mod.weight.detach(), names["weight_q"], names["weight_scale"],
                                                  wspec)
            with gm.graph.inserting_before(node):
                g = gm.graph
                wq, ws, wz = (g.get_attr(names[k]) for k in ("weight_q", "weight_scale", "weight_zp"))
                w = g.call_function(DEQUANTIZE_OP, (wq, ws, wz))
                b = g.get_attr(names["bias"]) if mod.bias is not None else None
                if isinstance(mod, nn.Linear):
                    out = g.call_function(F.linear, (node.args[0], w, b))
                elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode == "zeros":
                    conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
                    out = g.call_function(conv, (node.args[0], w, b, mod.stride, mod.padding,
                                                 mod.dilation, mod.groups))
                else:
                    raise TypeError(f"{node.target}: cannot quantize weights of {type(mod).__name__}")
            t = tag(node)
            wtag = {k: t[k] for k in ("role", "direction", "layer", "module")}
            for n in (wq, ws, wz, w) + ((b,) if b is not None else ()):
                n.meta[META] = {**wtag, "kind": Kind.WEIGHT}
            carry(node, out, source=node.name, target=node.target, weight_bits=wspec.bits,
                  weight_granularity=wspec.granularity)
            out.meta["tensor_meta"] = node.meta.get("tensor_meta")
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            changed = True
        gm.delete_all_unused_submodules()
        return changed
