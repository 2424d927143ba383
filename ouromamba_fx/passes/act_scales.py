"""Choose static activation scales from what the observers recorded."""

from __future__ import annotations

import torch.fx as fx

from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.qparams import act_qparams


class ChooseActScales(Pass):
    """Per observer: scale and zero point per tensor or per token position (config granularity,
    min-max or MSE-searched clipping). Results are stored on the observer (``obs.qparams``)."""

    name = "choose_act_scales"
    requires = ("calibrated",)
    provides = ("act_scales",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        for obs in ctx.observers.values():
            if obs.tok_min is None:
                raise RuntimeError(f"observer {obs.site} saw no data")
            sample = obs.sampled() if obs.spec.method == "mse" else None
            scale, zp, qmin, qmax = act_qparams(obs.tok_min, obs.tok_max, obs.spec, sample)
            # Shape the scale to broadcast against the observed tensor (batch, *obs.shape).
            shape = [1] * (len(obs.shape) + 1)
            if scale.numel() > 1:
                shape[obs.token_axis] = scale.numel()
            obs.qparams = (scale.reshape(shape), zp.reshape(shape), qmin, qmax)
        return False
