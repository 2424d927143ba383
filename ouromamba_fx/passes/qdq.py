"""Replace each observer with explicit ``quantize -> dequantize`` of its activation.

The result is the *reference quantized graph*: float ops fed by dequantized integers, runnable on
any device, numerically what the fused kernels compute.
"""

from __future__ import annotations

import torch.fx as fx

from ouromamba_fx.capture import META
from ouromamba_fx.lowering.quant import DEQUANTIZE, QUANTIZE
from ouromamba_fx.passes.base import Context, Pass


class QuantizeActivations(Pass):
    name = "quantize_activations"
    requires = ("act_scales",)
    provides = ("reference_graph",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in ctx.observers:
                continue
            obs = ctx.observers[node.target]
            scale, zp, qmin, qmax = obs.qparams
            base = node.target.removesuffix("_obs")
            gm.register_buffer(base + "_scale", scale.clone())
            gm.register_buffer(base + "_zp", zp.clone())
            t = dict(node.meta[META])
            with gm.graph.inserting_before(node):
                s = gm.graph.get_attr(base + "_scale")
                z = gm.graph.get_attr(base + "_zp")
                q = gm.graph.call_function(QUANTIZE, (node.args[0], s, z, qmin, qmax))
                dq = gm.graph.call_function(DEQUANTIZE, (q, s, z))
            for n in (s, z):
                n.meta[META] = {**t, "kind": "act_qparam"}
            q.meta[META] = {**t, "kind": "quantize", "bits": obs.spec.bits,
                            "granularity": obs.spec.granularity, "symmetric": obs.spec.symmetric}
            dq.meta[META] = {**t, "kind": "dequantize"}
            node.replace_all_uses_with(dq)
            gm.graph.erase_node(node)
            changed = True
        gm.delete_all_unused_submodules()
        return changed
