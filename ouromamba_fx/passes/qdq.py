"""Replace each observer with explicit quantization of its activation.

Plain sites become ``quantize -> dequantize``; OuroMamba mixed-precision sites become one
``quantize_mixed`` node (static per-step inlier scales, run-time outlier channels). The result is
the *reference quantized graph*: float ops fed by dequantized integers, runnable on any device,
numerically what the fused kernels compute.
"""

from __future__ import annotations

import torch.fx as fx

from ouromamba_fx.ops.mixed import QUANTIZE_MIXED_OP
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.tags import META


class QuantizeActivations(Pass):
    name = "quantize_activations"
    requires = ("act_scales",)
    provides = ("reference_graph",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = False
        g = gm.graph
        for node in list(g.nodes):
            if node.op != "call_module" or node.target not in ctx.observers:
                continue
            obs = ctx.observers[node.target]
            base = node.target.removesuffix("_obs")
            t = dict(node.meta[META])
            info = {"bits": obs.spec.quant.bits, "granularity": obs.granularity, "symmetric": obs.spec.quant.symmetric}
            kind, *qp = obs.qparams
            with g.inserting_before(node):
                if kind == "mixed":
                    s_in, bits, obits, k, n_refresh = qp
                    gm.register_buffer(base + "_inlier_scale", s_in)
                    s = g.get_attr(base + "_inlier_scale")
                    s.meta[META] = {**t, "kind": "act_qparam"}
                    out = g.call_function(QUANTIZE_MIXED_OP, (node.args[0], s, obs.token_axis,
                                                           obs.channel_axis, bits, obits, float(k), n_refresh))
                    out.meta[META] = {**t, **info, "kind": "quantize_mixed", "outlier_bits": obits,
                                      "k": float(k), "n_refresh": n_refresh}
                else:
                    scale, zp, qmin, qmax = qp
                    gm.register_buffer(base + "_scale", scale.clone())
                    gm.register_buffer(base + "_zp", zp.clone())
                    s, z = g.get_attr(base + "_scale"), g.get_attr(base + "_zp")
                    for n in (s, z):
                        n.meta[META] = {**t, "kind": "act_qparam"}
                    q = g.call_function(QUANTIZE_OP, (node.args[0], s, z, qmin, qmax))
                    q.meta[META] = {**t, **info, "kind": "quantize"}
                    out = g.call_function(DEQUANTIZE_OP, (q, s, z))
                    out.meta[META] = {**t, "kind": "dequantize"}
            node.replace_all_uses_with(out)
            g.erase_node(node)
            changed = True
        gm.delete_all_unused_submodules()
        return changed
